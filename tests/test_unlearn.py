"""UnlearnModule: GradDiff / MaxEnt / NPO / SimNPO / RMU, RepNoise and SAM, checked against losses recomputed here."""

import copy
import json
import math

import lightning as L
import pytest
import torch
from conftest import small_datamodule, tiny_trainer
from torch import nn

from undo_lightning import ArithmeticSource, DocumentSource, PretrainModule, RetainForgetDataModule
from undo_lightning.losses import (
    causal_lm_loss,
    lm_hidden_states,
    maxent_loss,
    npo_loss,
    repnoise_loss,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_nll,
    simnpo_loss,
)
from undo_lightning.models import build_model
from undo_lightning.modules import NPO, RMU, SAM, GradDiff, MaxEnt, RepNoise, SimNPO, UnlearnModule


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """A gemma2-micro reference that knows easy multiplication (confident forget predictions), exported to hf/."""
    root = tmp_path_factory.mktemp("reference")
    dm = small_datamodule(tokenizer, docs=3000, add_sub_range=(1, 4), mul_div_range=(1, 4), batch_size=16)
    module = PretrainModule(model="gemma2-micro", optimizer={"lr": 5e-3, "warmup_steps": 10}, seed=0)
    tiny_trainer(root, max_steps=120, val_check_interval=120).fit(module, datamodule=dm)
    return str(root / "hf")


def paired(tokenizer, n: int = 8, block_size: int = 32) -> tuple[dict, dict]:
    """One forget and one retain batch, built by hand from the data module's packed blocks."""
    dm = small_datamodule(tokenizer, block_size=block_size)
    dm.setup()
    out = []
    for split in ("forget", "retain"):
        ids = dm.train_blocks(split)[:n]
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "split": split})
    return out[0], out[1]


def built(tokenizer, **kwargs) -> UnlearnModule:
    module = UnlearnModule(**{"model": "gemma2-micro", "export": False, **kwargs})
    module.tokenizer = tokenizer
    module.configure_model()
    return module


def truncated(model: nn.Module, block: int) -> nn.Module:
    """The model cut after decoder block ``block`` with the final norm removed: its last hidden state is that
    block's output, computed by HF's own forward and independently of any hook."""
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[: block + 1]
    cut.model.norm = nn.Identity()
    cut.config.num_hidden_layers = block + 1
    return cut


def block_output(model, block: int, batch: dict) -> torch.Tensor:
    return truncated(model, block).model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state


class KeepFirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = {k: dict(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------- MaxEnt
def test_maxent_raises_forget_entropy_and_exports(reference, tokenizer, tmp_path):
    dm = small_datamodule(tokenizer, docs=3000, add_sub_range=(1, 4), mul_div_range=(1, 4), batch_size=16)
    dm.setup()
    val = dm._blocks["forget/val"][:16]

    def forget_entropy(model) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(val).logits[:, :-1].float(), dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    before = forget_entropy(build_model(reference, tokenizer).eval())
    module = UnlearnModule(model=reference, method="maxent", optimizer={"lr": 3e-3})
    root = tmp_path / "unlearn_maxent"
    tiny_trainer(root, max_steps=12, val_check_interval=12).fit(module, datamodule=dm)
    after = forget_entropy(module.model.eval())
    log_v = math.log(module.model.config.vocab_size)
    # The reference is far from uniform on forget data (0.50 log V with transformers 5.24; the bound leaves room for
    # numerics across library versions); MaxEnt must move it most of the way to uniform.
    assert before < 0.6 * log_v and after > before + 1.0 and after > 0.8 * log_v, (before, after, log_v)

    record = json.loads((root / "metrics.json").read_text())
    assert record["method"] == "maxent" and record["method_hparams"] == {"retain_weight": 1.0, "retain_loss": "ce",
                                                                         "convex": False}
    assert not record["repnoise"] and not record["sam"]
    assert record["compute"]["tokens"] == 12 * 2 * 16 * 32  # forget + retain tokens
    assert record["compute"]["tokens_by_split"] == {"retain": 12 * 16 * 32, "forget": 12 * 16 * 32}
    assert record["compute"]["flops"] == 6 * record["parameters"] * record["compute"]["tokens"]
    assert record["val"]["val/forget_ce"] > 2.0
    exported = build_model(str(root / "hf"), tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), module.model.state_dict().values()))


# ------------------------------------------------------------------------------------------------------------- RMU
def test_rmu_trains_only_selected_parameters_frozen_copy_fixed_and_not_checkpointed(tokenizer, tmp_path):
    initial = build_model("gemma2-micro", tokenizer, seed=0).state_dict()
    module = UnlearnModule(model="gemma2-micro", method=RMU(layer=1, train_layers=[1], retain_weight=1.0, coefficient=6.0),
                           optimizer={"lr": 1e-2}, export=False)
    tiny_trainer(tmp_path, max_steps=3).fit(module, datamodule=small_datamodule(tokenizer))
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    assert [n for n, p in module.model.named_parameters() if p.requires_grad] == changed
    assert not module.frozen.training and not any(p.requires_grad for p in module.frozen.parameters())
    assert all(torch.equal(v, initial[k]) for k, v in module.frozen.state_dict().items())
    assert module.frozen_tokens_seen == 3 * 8 * 32  # the frozen copy sees the retain batches only

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("frozen")] and "model.model.layers.1.mlp.down_proj.weight" in state
    # resuming rebuilds the frozen copy from `model` and loads the rest non-strictly
    resumed = UnlearnModule(model="gemma2-micro", method=RMU(layer=1, train_layers=[1]),
                            optimizer={"lr": 1e-2}, export=False)
    tiny_trainer(tmp_path, max_steps=4).fit(resumed, datamodule=small_datamodule(tokenizer), ckpt_path=str(ckpt))
    assert resumed.global_step == 4 and resumed.frozen_tokens_seen == 4 * 8 * 32
    assert all(torch.equal(v, initial[k]) for k, v in resumed.frozen.state_dict().items())


@pytest.mark.parametrize("layer", [0, 1])
def test_rmu_hook_targets_the_block_and_loss_matches(tokenizer, layer):
    forget, retain = paired(tokenizer)
    module = built(tokenizer, method=RMU(layer=layer, retain_weight=3.0, coefficient=5.0), seed=7)
    with torch.no_grad():  # make the trained model differ from the frozen copy so the retain term is not zero
        for p in module.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        terms = module.compute_losses(forget, retain)
        with module.method.recorder.record() as hooked:
            module.model(input_ids=forget["input_ids"])
        expected = block_output(module.model, layer, forget)
        assert torch.equal(hooked["block"], expected)
        other = block_output(module.model, 1 - layer, forget)
        assert not torch.allclose(expected, other, atol=1e-3)  # the comparison can tell the blocks apart

        control = rmu_control_vector(64, 5.0, seed=7)
        forget_loss = rmu_forget_loss(expected, control)
        retain_loss = rmu_retain_loss(block_output(module.model, layer, retain),
                                      block_output(module.frozen, layer, retain))
    assert retain_loss > 1e-6
    torch.testing.assert_close(terms["forget_loss"], forget_loss)
    torch.testing.assert_close(terms["retain_loss"], retain_loss)
    torch.testing.assert_close(terms["loss"], forget_loss + 3.0 * retain_loss)


def test_rmu_without_retain_term_builds_no_frozen_copy(tokenizer):
    module = built(tokenizer, method=RMU(layer=1, retain_weight=0.0))
    forget, retain = paired(tokenizer)
    terms = module.compute_losses(forget, retain)
    assert module.frozen is None and set(terms) == {"forget_loss", "loss"}
    # default trained blocks: layer - 2 .. layer, down_proj only (docs/reference.md §5.4)
    assert module.method.config()["params"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]


# ------------------------------------------------------------------------------------------------------------- SAM
def test_sam_step_equals_a_plain_step_with_the_perturbed_gradient(tokenizer, tmp_path):
    rho, lr, clip, w = 0.05, 1e-3, 0.5, 2.0
    keep = KeepFirstBatch()
    module = UnlearnModule(model="gemma2-micro", method=MaxEnt(retain_weight=w), sam=SAM(rho=rho, clip_val=clip),
                           optimizer={"lr": lr}, export=False)
    tiny_trainer(tmp_path, max_steps=1, callbacks=[keep]).fit(module, datamodule=small_datamodule(tokenizer))
    forget, retain = keep.batch["forget"], keep.batch["retain"]

    def loss_of(model):
        # the module's loss path, in its order (the order of the graph's nodes decides how gradients are summed)
        forget_loss = maxent_loss(lm_hidden_states(model, forget["input_ids"], forget["attention_mask"]),
                                  forget["labels"])
        out_r = lm_hidden_states(model, retain["input_ids"], retain["attention_mask"])
        return forget_loss + w * causal_lm_loss(out_r, retain["labels"])

    def grads_at(model):
        model.zero_grad()
        loss_of(model).backward()
        return [p.grad.clone() for p in model.parameters()]

    def stepped(grads):
        model = build_model("gemma2-micro", tokenizer, seed=0)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0).step()
        return model, norm

    start = build_model("gemma2-micro", tokenizer, seed=0)
    g = grads_at(start)
    g_norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))
    perturbed = copy.deepcopy(start)
    with torch.no_grad():
        for p, gi in zip(perturbed.parameters(), g):
            p.add_(gi * (rho / (g_norm + 1e-12)))
    sam, clipped_norm = stepped(grads_at(perturbed))
    plain, _ = stepped(g)
    assert clipped_norm > clip  # clipping is part of what is compared
    for (name, a), b, c in zip(module.model.named_parameters(), sam.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert max(float((a - c).abs().max()) for a, c in zip(sam.parameters(), plain.parameters())) > 1e-5
    assert module.tokens_seen == 2 * 8 * 32 and module.compute_summary()["flops"] == 12 * 2 * 8 * 32 * sum(
        p.numel() for p in start.parameters())


# -------------------------------------------------------------------------------------------------------- GradDiff
def test_graddiff_loss_and_guard_on_a_constructed_case(tokenizer):
    forget, retain = paired(tokenizer)
    module = built(tokenizer, method=GradDiff(retain_weight=2.0, max_forget_ce=1e3))
    with torch.no_grad():
        ce_f = causal_lm_loss(module.model(forget["input_ids"]).logits, forget["labels"])
        ce_r = causal_lm_loss(module.model(retain["input_ids"]).logits, retain["labels"])
    terms = module.compute_losses(forget, retain)
    torch.testing.assert_close(terms["loss"], -ce_f + 2.0 * ce_r)
    assert terms["guard_active"] == 0
    module.method.max_forget_ce = float(ce_f) / 2  # forget CE above the ceiling: the forget term is dropped
    terms = module.compute_losses(forget, retain)
    assert terms["guard_active"] == 1
    torch.testing.assert_close(terms["loss"], 2.0 * ce_r)
    terms["loss"].backward()
    grads = [p.grad.clone() for p in module.trainable_parameters()]
    module.model.zero_grad()
    (2.0 * causal_lm_loss(lm_hidden_states(module.model, retain["input_ids"]), retain["labels"])).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(grads, module.trainable_parameters()))


class ForgetCE(L.Callback):
    def __init__(self):
        self.values, self.guard = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train/forget_loss"]))
        self.guard.append(float(trainer.callback_metrics.get("train/guard_active", 0)))


def test_graddiff_guard_stops_divergence(reference, tokenizer, tmp_path):
    def run(max_forget_ce):
        log = ForgetCE()
        module = UnlearnModule(model=reference, method=GradDiff(retain_weight=0.0, max_forget_ce=max_forget_ce),
                               optimizer={"lr": 2e-2}, export=False)
        tiny_trainer(tmp_path, max_steps=25, callbacks=[log], log_every_n_steps=1).fit(
            module, datamodule=small_datamodule(tokenizer))
        return log

    free, guarded = run(None), run(6.0)
    assert max(free.values) > 30  # plain gradient ascent runs away (CE ~46 after 25 steps)
    # guarded: ascent stops at the ceiling; Adam's momentum alone carries it a little further (~10)
    assert max(guarded.values) < 15 and guarded.guard[0] == 0 and sum(guarded.guard) >= 10


def test_nonfinite_loss_raises_and_writes_nothing(tokenizer, tmp_path):
    class Poison(L.Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    module = UnlearnModule(model="gemma2-micro", method="graddiff")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0.*max_forget_ce"):
        tiny_trainer(tmp_path, max_steps=2, callbacks=[Poison()]).fit(module, datamodule=small_datamodule(tokenizer))
    assert not (tmp_path / "hf").exists() and not (tmp_path / "metrics.json").exists()
    assert not list(tmp_path.rglob("*.ckpt"))


# -------------------------------------------------------------------------------------------------------- RepNoise
def test_repnoise_terms_match_an_independent_computation(tokenizer):
    forget, retain = paired(tokenizer)
    module = built(tokenizer, method="maxent", repnoise=RepNoise(alpha=0.5, beta=0.1), seed=3)
    terms = module.compute_losses(forget, retain)
    model = module.model
    acts = []
    handles = [layer.mlp.register_forward_hook(lambda m, a, out: acts.append(out)) for layer in model.model.layers]
    out = model(forget["input_ids"], output_hidden_states=True)
    for h in handles:
        h.remove()
    cap = model.config.final_logit_softcapping

    def lens(hidden):
        return cap * torch.tanh(model.lm_head(model.model.norm(hidden)) / cap)

    # lens of the embeddings and block 0; block 1's (the last) lens is the final logits, normed once
    lenses = [lens(out.hidden_states[0]), lens(block_output(model, 0, forget)), out.logits]
    torch.testing.assert_close(lens(block_output(model, 1, forget)), out.logits)
    rep = repnoise_loss(acts, lenses, forget["labels"], torch.Generator().manual_seed(3), alpha=0.5, beta=0.1)
    ce_r = causal_lm_loss(model(retain["input_ids"]).logits, retain["labels"])
    f = maxent_loss(out.logits, forget["labels"])
    torch.testing.assert_close(terms["repnoise_noise"], rep.noise)
    torch.testing.assert_close(terms["repnoise_harmful"], rep.harmful)
    torch.testing.assert_close(terms["loss"], f + ce_r + ce_r + rep.loss)


def test_repnoise_hooks_are_registered_once_and_removed(tokenizer, tmp_path):
    counts = []

    def hooks(module):
        # Transformers adds its own hooks to decoder layers for output_hidden_states: count ours relative to them
        return [len(layer.mlp._forward_hooks) for layer in module.model.model.layers] + [
            len(module.model.model.layers[1]._forward_hooks)]

    class CountHooks(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counts.append(hooks(pl_module))

    module = UnlearnModule(model="gemma2-micro", method=RMU(layer=1), repnoise=RepNoise(), export=False)
    tiny_trainer(tmp_path, max_steps=3, callbacks=[CountHooks()]).fit(module, datamodule=small_datamodule(tokenizer))
    assert counts[0][:2] == [1, 1] and counts == [counts[0]] * 3  # one RepNoise hook per MLP, not one per step
    assert hooks(module) == [0, 0, counts[0][2] - 1]  # all removed at teardown, the RMU block hook included


# ---------------------------------------------------------------------------------------------------- bf16-mixed
@pytest.mark.parametrize("kwargs", [dict(method=RMU(layer=1, retain_weight=1.0), repnoise=RepNoise()),
                                    dict(method="maxent", sam=SAM(rho=0.05))], ids=["rmu+repnoise", "maxent+sam"])
def test_bf16_mixed_steps(tokenizer, tmp_path, kwargs):
    initial = build_model("gemma2-micro", tokenizer, seed=0).state_dict()
    module = UnlearnModule(model="gemma2-micro", optimizer={"lr": 1e-3}, export=False, **kwargs)
    trainer = tiny_trainer(tmp_path, max_steps=2, precision="bf16-mixed")
    trainer.fit(module, datamodule=small_datamodule(tokenizer))
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/"))
    state = module.model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())  # fp32 master weights
    assert any(not torch.equal(state[k], initial[k]) for k in state)
    module.configure_model()  # hooks are removed at teardown; configure_model registers them again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = module.compute_losses(*paired(tokenizer))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# ------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, message", [
    (lambda: UnlearnModule(method="gradient_ascent"), "method='gradient_ascent'"),
    (lambda: MaxEnt(retain_weight=-1.0), "retain_weight=-1.0"),
    (lambda: GradDiff(max_forget_ce=0.0), "max_forget_ce=0.0"),
    (lambda: SAM(rho=-0.1), "rho=-0.1"),
    (lambda: RMU(layer=-1), "layer=-1"),
    (lambda: RMU(layer=1, train_layers=[2]), r"train_layers=\[2\]"),
    (lambda: UnlearnModule(repnoise=True), "repnoise=True: expected RepNoise"),
    (lambda: NPO(beta=0.0), "beta=0.0: NPO's inverse temperature must be > 0"),
    (lambda: SimNPO(beta=-2.0), "beta=-2.0: SimNPO's inverse temperature must be > 0"),
    (lambda: SimNPO(gamma=-1.0), "gamma=-1.0: SimNPO's reward margin must be >= 0"),
])
def test_bad_arguments_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_rmu_layer_out_of_range_names_the_layer_count(tokenizer):
    with pytest.raises(ValueError, match="has 2 decoder layers"):
        built(tokenizer, method=RMU(layer=5))


def test_rmu_pattern_matching_nothing_lists_real_names(tokenizer):
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.nope' matches no parameter.*model.embed_tokens.weight"):
        built(tokenizer, method=RMU(layer=0, params=["model.layers.{i}.mlp.nope"]))


def test_empty_forget_split_is_a_clear_error(tokenizer, tmp_path):
    class Empty(DocumentSource):
        def documents(self, split, seed):
            return [] if split == "train" else ["3 * 4 = 12"] * 20

    dm = RetainForgetDataModule(retain=ArithmeticSource(("add",), train_documents=50, val_documents=10),
                                forget=Empty(), block_size=16, batch_size=4)
    with pytest.raises(ValueError, match="forget source has an empty train split"):
        tiny_trainer(tmp_path, max_steps=1).fit(UnlearnModule(model="gemma2-micro"), datamodule=dm)


@pytest.mark.parametrize("trainer_kwargs, message", [(dict(accumulate_grad_batches=2), "accumulate_grad_batches=2"),
                                                     (dict(gradient_clip_val=1.0), "clip_val")])
def test_sam_rejects_what_it_cannot_honour(tokenizer, tmp_path, trainer_kwargs, message):
    module = UnlearnModule(model="gemma2-micro", sam=SAM(rho=0.05))
    with pytest.raises(ValueError, match=message):
        tiny_trainer(tmp_path, max_steps=1, **trainer_kwargs).fit(module, datamodule=small_datamodule(tokenizer))


# ----------------------------------------------------------------------------------------------------- NPO, SimNPO
def test_npo_objective_reads_the_frozen_copy_and_equals_the_losses_recomputed_here(tokenizer):
    forget, retain = paired(tokenizer, n=4)
    npo = built(tokenizer, method=NPO(beta=0.2, retain_weight=2.0))
    simnpo = built(tokenizer, method=SimNPO(beta=1.5, gamma=0.3))
    assert npo.frozen is not None and simnpo.frozen is None  # only NPO needs the reference likelihoods
    start = build_model("gemma2-micro", tokenizer).eval()  # the starting point, built independently of the module
    # a step away from the starting point, so that the frozen copy and the trained model differ
    with torch.no_grad():
        for p in npo.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    terms = npo.compute_losses(forget, retain)
    with torch.no_grad():
        start = lm_hidden_states(start, forget["input_ids"], forget["attention_mask"])
        out = lm_hidden_states(npo.model, forget["input_ids"], forget["attention_mask"])
        retain_out = lm_hidden_states(npo.model, retain["input_ids"], retain["attention_mask"])
        expected_forget = npo_loss(out, forget["labels"], sequence_nll(start, forget["labels"]), 0.2)
        expected = expected_forget + 2.0 * causal_lm_loss(retain_out, retain["labels"])
    assert terms["forget_loss"].item() == pytest.approx(expected_forget.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected_forget.item() != pytest.approx(2 / 0.2 * math.log(2), rel=1e-3)  # not at the reference

    terms = simnpo.compute_losses(forget, retain)
    with torch.no_grad():
        out = lm_hidden_states(simnpo.model, forget["input_ids"], forget["attention_mask"])
        expected_forget = simnpo_loss(out, forget["labels"], 1.5, 0.3)
    assert terms["forget_loss"].item() == pytest.approx(expected_forget.item(), rel=1e-5)


def test_npo_unlearning_lowers_the_forget_likelihood_and_records_its_settings(reference, tokenizer, tmp_path):
    dm = small_datamodule(tokenizer, docs=3000, add_sub_range=(1, 4), mul_div_range=(1, 4), batch_size=16)
    module = UnlearnModule(model=reference, method=NPO(beta=0.1), optimizer={"lr": 3e-3})
    root = tmp_path / "unlearn_npo"
    tiny_trainer(root, max_steps=12, val_check_interval=12).fit(module, datamodule=dm)
    record = json.loads((root / "metrics.json").read_text())
    start = build_model(reference, tokenizer).eval()
    dm.setup()
    val = dm._blocks["forget/val"][:16]
    batch = {"input_ids": val, "labels": val, "attention_mask": torch.ones_like(val)}
    with torch.no_grad():
        nll = [sequence_nll(lm_hidden_states(m.eval(), val, batch["attention_mask"]), val).mean().item()
               for m in (start, module.model)]
    assert nll[1] > nll[0] + 5.0, nll  # the forget sequences became much less likely
    assert record["method"] == "npo" and record["method_hparams"]["beta"] == 0.1
    assert record["compute"]["frozen_tokens"] == 12 * 16 * 32  # the reference pass: forget batches only
