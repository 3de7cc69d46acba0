"""DistillModule (full distillation, UNDO, oracle matching) and the RetainGapStop rule, on gemma2-micro."""

import glob
import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import small_datamodule, tiny_trainer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2ForCausalLM

from undo_lightning.callbacks import RetainGapStop, retain_gap
from undo_lightning.data.tokenizers import build_arithmetic_tokenizer
from undo_lightning.models import build_model, export_model, preset_config
from undo_lightning.modules.distill import DistillModule
from undo_lightning.noise import shrink_and_perturb


@pytest.fixture(scope="module")
def teacher_dir(tokenizer, tmp_path_factory):
    """A gemma2-micro 'teacher' with non-zero norm weights (so shrinking them is visible), exported with its tokenizer."""
    model = build_model("gemma2-micro", tokenizer, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    return export_model(model, tokenizer, str(tmp_path_factory.mktemp("teacher") / "hf"))


def built(tokenizer, **kwargs) -> DistillModule:
    module = DistillModule(export=False, **kwargs)
    module.tokenizer = tokenizer
    module.configure_model()
    return module


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class FrozenTeacherProbe(L.Callback):
    """Records, at every training step, whether the teacher is in eval mode with no trainable or optimised tensor."""

    def __init__(self):
        self.checks = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.checks.append(not module.teacher.training and module.model.training
                           and not any(p.requires_grad or id(p) in optimised for p in module.teacher.parameters())
                           and optimised == {id(p) for p in module.model.parameters()})


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step >= self.step


def test_fit_keeps_teacher_frozen_out_of_checkpoints_and_resumes_exactly(tokenizer, teacher_dir, tmp_path):
    saved_teacher = load_file(f"{teacher_dir}/model.safetensors")

    def module():
        return DistillModule(teacher=teacher_dir, student_init="teacher", alpha=0.6, beta=0.1, noise_seed=7,
                             optimizer={"lr": 3e-3}, export=False, checkpoint_every=4)

    def assert_teacher_untouched(m):
        state = m.teacher.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved_teacher.items())
        assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())

    probe = FrozenTeacherProbe()
    full = module()
    tiny_trainer(tmp_path / "full", max_steps=8, val_check_interval=4, callbacks=[probe]).fit(
        full, datamodule=small_datamodule(tokenizer))
    assert len(probe.checks) == 8 and all(probe.checks)
    assert_teacher_untouched(full)
    assert any(k.startswith("teacher.") for k in full.state_dict())  # registered (moves with the module) ...
    assert full.teacher_metrics()["val/retain_ce"] > 0

    part = module()  # the same 8-step run (same LR schedule), interrupted after its step-4 checkpoint
    tiny_trainer(tmp_path / "part", max_steps=8, val_check_interval=4, callbacks=[StopAt(4)]).fit(
        part, datamodule=small_datamodule(tokenizer))
    ckpts = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert len(ckpts) >= 2
    for path in ckpts:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert not [k for k in state if "teacher" in k]  # ... but never written to a checkpoint
        assert set(state) == {"model." + k for k in full.model.state_dict()}

    resumed = module()
    tiny_trainer(tmp_path / "part", max_steps=8, val_check_interval=4).fit(
        resumed, datamodule=small_datamodule(tokenizer), ckpt_path=str(tmp_path / "part" / "checkpoints" / "last.ckpt"))
    assert_teacher_untouched(resumed)  # re-loaded from its folder, not from the checkpoint
    assert resumed.tokens_seen == full.tokens_seen
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k  # re-applying the noise on resume would break this
    moved = max((v - saved_teacher[k]).abs().max() for k, v in params(full.model).items())
    assert moved > 1e-3


def test_student_init_teacher_applies_the_noise_once_and_exactly(tokenizer, teacher_dir):
    teacher = params(AutoModelForCausalLM.from_pretrained(teacher_dir))
    copy0 = built(tokenizer, teacher=teacher_dir, student_init="teacher", alpha=0.0, beta=0.5)
    assert all(torch.equal(v, teacher[k]) for k, v in params(copy0.model).items())
    assert all(p.requires_grad for p in copy0.model.parameters())
    copy0.train()  # what Lightning and final_evaluation call: the student trains, the teacher stays in eval mode
    assert copy0.model.training and not copy0.teacher.training
    assert not {p.data_ptr() for p in copy0.model.parameters()} & {p.data_ptr() for p in copy0.teacher.parameters()}

    expected = AutoModelForCausalLM.from_pretrained(teacher_dir)
    shrink_and_perturb(expected, 0.6, 0.1, seed=11)
    noised = built(tokenizer, teacher=teacher_dir, student_init="teacher", alpha=0.6, beta=0.1, noise_seed=11)
    assert all(torch.equal(v, params(expected)[k]) for k, v in params(noised.model).items())
    assert all(torch.equal(v, teacher[k]) for k, v in params(noised.teacher).items())  # the teacher is not noised
    noised.configure_model()  # idempotent: a second call must not noise again
    assert all(torch.equal(v, params(expected)[k]) for k, v in params(noised.model).items())

    # targeted noise: only the selected parameters move
    layer0 = built(tokenizer, teacher=teacher_dir, student_init="teacher", alpha=0.6, noise_include=r"layers\.0\.")
    changed = {k for k, v in params(layer0.model).items() if not torch.equal(v, teacher[k])}
    assert changed and all("layers.0." in k for k in changed)
    assert layer0.summary()["noise"]["fraction_updated"] < 0.5


def test_random_student_is_a_seeded_fresh_init_of_the_teachers_architecture(tokenizer, teacher_dir):
    a = built(tokenizer, teacher=teacher_dir, student_init="random", seed=4)
    b = built(tokenizer, teacher=teacher_dir, student_init="random", seed=4)
    c = built(tokenizer, teacher=teacher_dir, student_init="random", seed=5)
    pa, pb, pc, pt = params(a.model), params(b.model), params(c.model), params(a.teacher)
    assert a.model.config.to_dict() == a.teacher.config.to_dict()
    assert list(pa) == list(pt) and all(pa[k].shape == pt[k].shape for k in pa)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    two_d = [k for k in pa if pa[k].dim() == 2]
    assert all(not torch.equal(pa[k], pc[k]) and not torch.equal(pa[k], pt[k]) for k in two_d)
    state = torch.get_rng_state()
    built(tokenizer, teacher=teacher_dir, student_init="random", seed=4)
    assert torch.equal(state, torch.get_rng_state())  # the init does not consume the global RNG


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step called outside a Trainer
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_training_loss_is_the_forward_kl_of_teacher_and_student(tokenizer, teacher_dir, temperature):
    module = built(tokenizer, teacher=teacher_dir, student_init="teacher", alpha=0.6, kl_chunk_size=7,
                   teacher_temperature=temperature)
    dm = small_datamodule(tokenizer)
    batch = next(iter(dm.train_dataloader()))
    batch["labels"][:, :5] = -100  # ignored targets must not count
    loss = module.training_step(batch, 0)

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        q = F.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1].double() / temperature, -1)
        p = F.log_softmax(module.model(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
    scored = batch["labels"][:, 1:] != -100
    expected = (q.exp() * (q - p)).sum(-1)[scored].mean()
    assert scored.sum() == batch["labels"].shape[0] * (batch["labels"].shape[1] - 1 - 4)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-4)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.model.parameters())


def test_flops_count_six_n_student_plus_two_n_teacher(tokenizer, tmp_path):
    # a 1-layer teacher and a 2-layer preset student, so N_student != N_teacher
    teacher_dir = export_model(build_model("gemma2-micro", tokenizer, num_hidden_layers=1), tokenizer,
                               str(tmp_path / "teacher"))
    module = DistillModule(teacher=teacher_dir, student_init="gemma2-micro", export=False)
    tiny_trainer(tmp_path / "run", max_steps=2).fit(module, datamodule=small_datamodule(tokenizer))
    n_s, n_t = n_params(module.model), n_params(module.teacher)
    assert n_s > n_t
    assert module.tokens_seen == 2 * 8 * 32
    assert module.compute_summary()["flops"] == module.tokens_seen * (6 * n_s + 2 * n_t)


def test_stop_rule_is_checked_after_the_first_step(tokenizer, teacher_dir, tmp_path):
    # alpha = 0: the student starts as the teacher, so the gap is 0 already at step 1 (the authors' first check),
    # long before the first scheduled validation (step 3)
    module = DistillModule(teacher=teacher_dir, student_init="teacher", alpha=0.0, stop_threshold=0.05)
    trainer = tiny_trainer(tmp_path / "run", max_steps=9, val_check_interval=3)
    trainer.fit(module, datamodule=small_datamodule(tokenizer))
    assert trainer.global_step == 1
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["global_step"] == 1 and record["val"]["val/retain_gap"] == 0.0
    assert (record["stopped_at_step"], record["budget_hit"]) == (1, False)
    assert record["teacher_val"]["val/retain_ce"] == module.teacher_metrics()["val/retain_ce"]
    assert record["student_init"] == "teacher" and record["alpha"] == 0.0 and record["teacher"] == teacher_dir
    assert record["compute"]["flops"] == record["compute"]["tokens"] * 8 * n_params(module.model)
    split = record["compute"]["tokens_by_split"]  # a 50/50 mixture, counted per document
    assert split["retain"] + split["forget"] == record["compute"]["tokens"]
    assert 0 < split["forget"] < split["retain"] * 2


def test_a_student_that_never_meets_the_rule_is_flagged_budget_hit(tokenizer, teacher_dir, tmp_path, monkeypatch):
    import undo_lightning.callbacks as callbacks

    evaluations = []
    real = callbacks.final_evaluation
    monkeypatch.setattr(callbacks, "final_evaluation", lambda m, loaders: evaluations.append(m.global_step)
                        or real(m, loaders))
    monkeypatch.setattr(RetainGapStop, "within", lambda self, gap, metric: False)  # a student that never catches up
    module = DistillModule(teacher=teacher_dir, student_init="random", stop_threshold=0.05)
    trainer = tiny_trainer(tmp_path / "run", max_steps=4, val_check_interval=2)
    trainer.fit(module, datamodule=small_datamodule(tokenizer))
    assert trainer.global_step == 4
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (record["stopped_at_step"], record["budget_hit"]) == (None, True)
    assert 1 in evaluations  # the step-1 check ran (and training went on)
    # with validation at every step Lightning's own validation is the step-1 check: no second evaluation
    evaluations.clear()
    module = DistillModule(teacher=teacher_dir, student_init="random", stop_threshold=0.05, export=False)
    tiny_trainer(tmp_path / "run2", max_steps=2, val_check_interval=1).fit(
        module, datamodule=small_datamodule(tokenizer))
    assert 1 not in evaluations


@pytest.mark.parametrize("metric, teacher, students, fires_at", [
    ("acc", {"val/retain_acc": 0.90}, [0.50, 0.84, 0.85, 0.95], 2),  # 0.05 absolute is within
    ("ce", {"val/retain_ce": 2.0}, [2.5, 2.1, 2.099, 2.0], 2),  # relative 0.05 is not (< 0.05), 0.0495 is
])
def test_stop_rule_decisions_on_a_sequence_of_validations(metric, teacher, students, fires_at):
    callback = RetainGapStop(threshold=0.05)
    module = SimpleNamespace(gap_metric=lambda: metric, last_val_metrics={}, last_val_step=0)
    trainer = SimpleNamespace(sanity_checking=False, global_step=0, should_stop=False, datamodule=object(),
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d))
    callback.on_fit_start(trainer, module)
    for i, value in enumerate(students):
        trainer.global_step = module.last_val_step = 10 * (i + 1)
        student = {f"val/retain_{metric}": value}
        module.last_val_metrics = {**student, "val/retain_gap": retain_gap(student, teacher, metric)}
        callback.on_validation_end(trainer, module)
        assert trainer.should_stop == (i == fires_at), (i, module.last_val_metrics)
        if trainer.should_stop:
            break
    assert callback.stopped_at_step == 10 * (fires_at + 1)


def test_retain_gap_definitions_and_stop_rule_arguments():
    teacher = {"val/retain_acc": 0.8, "val/retain_ce": 2.0}
    assert retain_gap({"val/retain_acc": 0.6}, teacher, "acc") == pytest.approx(0.2)
    assert retain_gap({"val/retain_acc": 0.9}, teacher, "acc") == pytest.approx(-0.1)  # better than the teacher
    assert retain_gap({"val/retain_ce": 2.5}, teacher, "ce") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="RetainGapStop needs a module"):
        RetainGapStop().on_fit_start(None, SimpleNamespace())
    with pytest.raises(ValueError, match="datamodule"):
        RetainGapStop().on_fit_start(SimpleNamespace(datamodule=None), SimpleNamespace(gap_metric=None))
    with pytest.raises(ValueError, match="threshold=-1"):
        RetainGapStop(-1)


def test_gap_metric_must_be_measured_by_the_validation(tokenizer, teacher_dir, tmp_path):
    # no answer-scored prompts: there is no val/retain_acc, so the accuracy gap is a clear error before training
    module = DistillModule(teacher=teacher_dir, gap_metric="acc", export=False)
    with pytest.raises(ValueError, match="gap_metric='acc' needs 'val/retain_acc'"):
        tiny_trainer(tmp_path, max_steps=1).fit(module, datamodule=small_datamodule(tokenizer, prompts=0))
    assert module.tokens_seen == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), r"alpha=1\.5"), (dict(beta=-0.1), r"beta=-0\.1"), (dict(alpha=float("nan")), "alpha=nan"),
    (dict(noise_include="layers.(0"), "noise_include"), (dict(kl_chunk_size=0), "kl_chunk_size=0"),
    (dict(stop_threshold=-1.0), "stop_threshold"), (dict(gap_metric="x"), "gap_metric='x'"),
    (dict(teacher_temperature=0.0), "teacher_temperature=0.0"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillModule(teacher="runs/x/hf", **kwargs)


def test_missing_teacher_and_unmatched_noise_filter_are_clear_errors(tokenizer, teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher=.*nope.*no Hugging Face model folder"):
        built(tokenizer, teacher=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="matches no parameter"):
        built(tokenizer, teacher=teacher_dir, student_init="teacher", noise_include="no_such_layer")


def test_teacher_and_student_must_share_the_datas_tokenizer(tokenizer, tmp_path):
    other = build_arithmetic_tokenizer(extra_texts=["zebra giraffe"])
    shipped_other = export_model(build_model("gemma2-micro", other), other, str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"teacher=.*other.* ships a tokenizer .* differs from the data's tokenizer "
                                         r"'arithmetic'"):
        tiny_trainer(tmp_path / "run", max_steps=1).fit(DistillModule(teacher=shipped_other),
                                                        datamodule=small_datamodule(tokenizer))
    # no tokenizer shipped, but a larger vocabulary than the preset student built for the data's tokenizer
    bigger = export_model(build_model("gemma2-micro", other), None, str(tmp_path / "bigger"))
    with pytest.raises(ValueError, match=r"student_init='gemma2-micro' has vocab_size=\d+ but teacher=.*bigger"):
        built(tokenizer, teacher=bigger, student_init="gemma2-micro")
    # a teacher whose vocabulary is smaller than the data's tokenizer
    config = preset_config("gemma2-micro", tokenizer)
    config.vocab_size = len(tokenizer) - 5
    smaller = export_model(Gemma2ForCausalLM(config), None, str(tmp_path / "smaller"))
    with pytest.raises(ValueError, match="vocab_size"):
        built(tokenizer, teacher=smaller)
    # a student folder with another tokenizer
    same_dir = export_model(build_model("gemma2-micro", tokenizer), tokenizer, str(tmp_path / "same"))
    with pytest.raises(ValueError, match="student_init=.*other.* ships a tokenizer"):
        built(tokenizer, teacher=same_dir, student_init=shipped_other)
