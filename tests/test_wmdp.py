"""The WMDP setting: the MaxEnt + KL-retain loss (docs/reference.md §11.2) checked against independent computations,
the frozen original model's handling, the multiple-choice validation metric, and the three shipped WMDP stage configs
run end to end on a micro model with local stand-in corpus and multiple-choice files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from undo_lightning import RMU, GradDiff, MaxEnt, RetainForgetDataModule, TextSource, UnlearnModule
from undo_lightning.data.bpe import train_bpe_tokenizer
from undo_lightning.data.mcq import MCQSpec, build_prompt, limit_records, load_mcq
from undo_lightning.eval.mcq import mcq_accuracy
from undo_lightning.models import build_model, export_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
WMDP = FIXTURES / "wmdp"
ENGLISH = str(FIXTURES / "language" / "english.jsonl")
CYBER, MMLU, MMLU_DEV = str(WMDP / "wmdp_cyber.jsonl"), str(WMDP / "mmlu_test.jsonl"), str(WMDP / "mmlu_dev.jsonl")


@pytest.fixture(scope="module")
def tok():
    """A BPE over the stand-in corpora and solved questions (so the choice letters are single tokens)."""
    texts = [r["text"] for f in ("forget_corpus", "retain_corpus") for r in _jsonl(WMDP / f"{f}.jsonl")]
    texts += TextSource(ENGLISH).corpus()
    texts += [build_prompt(r, [r]) for f in (CYBER, MMLU, MMLU_DEV) for r in load_mcq(f)] * 3
    return train_bpe_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="module")
def original(tok, tmp_path_factory):
    """The stand-in for gemma-2-2b: a micro Gemma-2 with the BPE, exported like a downloaded model folder.

    Seed 6 gives varied predictions on both stand-in sets (WMDP 4/7, MMLU 2/6 correct), so a scoring bug shows.
    """
    return export_model(build_model("gemma2-micro", tok, seed=6), tok, str(tmp_path_factory.mktemp("m") / "orig"))


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _paired(tok, n: int = 4, t: int = 32) -> tuple[dict, dict]:
    dm = RetainForgetDataModule(retain=TextSource(str(WMDP / "retain_corpus.jsonl"), val_documents=1),
                                forget=TextSource(str(WMDP / "forget_corpus.jsonl"), val_documents=1),
                                tokenizer="bpe", block_size=t, batch_size=n)
    dm._tokenizer = tok
    out = []
    for split in ("forget", "retain"):
        ids = dm.train_blocks(split)[:n]
        labels = ids.clone()
        labels[0, 5:9] = -100  # ignored positions must not count
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "split": split})
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------ the objective
def test_maxent_with_kl_retain_term_and_convex_weights_matches_an_independent_computation(tok, original):
    forget, retain = _paired(tok)
    # chunks of 7 positions do not divide the positions
    module = UnlearnModule(model=original, method=MaxEnt(retain_loss="kl", convex=True, retain_weight=0.3,
                                                         kl_chunk_size=7))
    module.tokenizer = tok
    module.configure_model()
    assert module.frozen is not None and not module.frozen.training
    assert not any(p.requires_grad for p in module.frozen.parameters())
    with torch.no_grad():  # move the trained model away from the frozen original so the KL is not zero
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    terms = module.compute_losses(forget, retain)

    def scored(labels):  # position t is scored iff labels[:, t + 1] != -100
        return labels[:, 1:] != -100

    with torch.no_grad():
        logp_f = module.model(forget["input_ids"]).logits[:, :-1].float().log_softmax(-1)
        vocab = logp_f.shape[-1]
        maxent = (-math.log(vocab) - logp_f.mean(-1))[scored(forget["labels"])].mean()  # KL(uniform || p)
        logp = module.model(retain["input_ids"]).logits[:, :-1].float().log_softmax(-1)
        logq = module.frozen(retain["input_ids"]).logits[:, :-1].float().log_softmax(-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)[scored(retain["labels"])].mean()  # KL(frozen || model)
    assert kl > 1e-3
    torch.testing.assert_close(terms["forget_loss"], maxent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["retain_loss"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], 0.7 * maxent + 0.3 * kl, rtol=1e-5, atol=1e-6)
    # the gradient flows into the trained model only
    terms["loss"].backward()
    assert all(p.grad is None for p in module.frozen.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert module.frozen_tokens_seen == retain["attention_mask"].numel()


def test_graddiff_convex_ce_weights(tok, original):
    forget, retain = _paired(tok)
    module = UnlearnModule(model=original, method=GradDiff(convex=True, retain_weight=0.25))
    module.tokenizer = tok
    module.configure_model()
    assert module.frozen is None  # a CE retain term needs no frozen copy
    from undo_lightning.losses import causal_lm_loss

    with torch.no_grad():
        ce_f = causal_lm_loss(module.model(forget["input_ids"]).logits, forget["labels"])
        ce_r = causal_lm_loss(module.model(retain["input_ids"]).logits, retain["labels"])
    torch.testing.assert_close(module.compute_losses(forget, retain)["loss"], -0.75 * ce_f + 0.25 * ce_r)


@pytest.mark.parametrize("method, kwargs, message", [
    (MaxEnt, dict(retain_loss="mse"), "retain_loss='mse'"),
    (GradDiff, dict(convex=True, retain_weight=1.0), "0 < w < 1"),
    (MaxEnt, dict(convex=True, retain_weight=0.0), "0 < w < 1"),
    (RMU, dict(convex=True, retain_weight=0.0), "0 < w < 1"),
    (MaxEnt, dict(kl_chunk_size=0), "kl_chunk_size=0"),
])
def test_bad_retain_term_arguments(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        method(**kwargs)


# --------------------------------------------------------------------------------------- multiple-choice metric
def mcq_data(tok, **mcq) -> RetainForgetDataModule:
    dm = RetainForgetDataModule(retain=TextSource(str(WMDP / "retain_corpus.jsonl"), val_documents=1),
                                forget=TextSource(str(WMDP / "forget_corpus.jsonl"), val_documents=1),
                                tokenizer="bpe", block_size=32, batch_size=4, mcq=mcq, mcq_batch_size=3)
    dm._tokenizer = tok
    return dm


def test_mcq_validation_metric_equals_mcq_accuracy(tok, original, tmp_path):
    import lightning as L

    from undo_lightning import PretrainModule

    specs = {"cyber": MCQSpec(CYBER, side="forget", limit=7),
             "mmlu": MCQSpec(MMLU, side="retain", k_shot=2, fewshot=MMLU_DEV, limit=3)}
    dm = mcq_data(tok, **specs)
    module = PretrainModule(model=original)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    values = trainer.validate(module, datamodule=dm, verbose=False)[0]
    model = build_model(original, tok)
    cyber = mcq_accuracy(model, tok, load_mcq(CYBER)[:7])
    mmlu_records = load_mcq(MMLU)
    mmlu_records = [r for r in mmlu_records if r.subject == "astronomy"][:3] + \
        [r for r in mmlu_records if r.subject == "high_school_geography"][:3]  # the limit applies per subject
    assert limit_records(load_mcq(MMLU), 3) == mmlu_records
    mmlu = mcq_accuracy(model, tok, mmlu_records, k_shot=2, fewshot_records=load_mcq(MMLU_DEV))
    assert (cyber["n"], mmlu["n"], cyber["correct"], mmlu["correct"]) == (7, 6, 4, 2)
    assert values["val/cyber_mcq_acc"] == pytest.approx(cyber["accuracy"])
    assert values["val/mmlu_mcq_acc"] == pytest.approx(mmlu["accuracy"])
    # no arithmetic sets: the per-side accuracies are the multiple-choice ones
    assert values["val/forget_acc"] == pytest.approx(cyber["accuracy"])
    assert values["val/retain_acc"] == pytest.approx(mmlu["accuracy"])
    assert {k for k in values if k.startswith("val/")} == {"val/retain_ce", "val/forget_ce", "val/cyber_mcq_acc",
                                                            "val/mmlu_mcq_acc", "val/retain_acc", "val/forget_acc"}


def test_bad_multiple_choice_sets_name_the_set_record_and_line(tok, tmp_path, monkeypatch):
    good = {"question": "Q?", "choices": ["a", "b"], "answer": 0}
    for name, record, match in [("missing", {"question": "Q?", "choices": ["a", "b"]}, r"no field 'answer'"),
                                ("range", {**good, "answer": 2}, r"answer index 2 is out of range for 2 choices")]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in (good, good, record)) + "\n")
        with pytest.raises(ValueError, match=rf"mcq\['bad'\]: .*{name}\.jsonl:3: {match}"):
            mcq_data(tok, bad=MCQSpec(str(path))).setup()
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"mcq\['wmdp'\]: path='cais/wmdp'.*pass a local path"):
        mcq_data(tok, wmdp=MCQSpec("cais/wmdp", name="wmdp-cyber")).setup()
    for kwargs, match in [(dict(path=CYBER, side="both"), "side='both'"), (dict(path=CYBER, limit=0), "limit=0"),
                          (dict(path=CYBER, k_shot=-1), "k_shot=-1"),
                          (dict(path=CYBER, fewshot="dev"), "names a split of a hub dataset")]:
        with pytest.raises(ValueError, match=match):
            MCQSpec(**kwargs)
    with pytest.raises(ValueError, match="multiple-choice set name 'a/b'"):
        mcq_data(tok, **{"a/b": MCQSpec(CYBER)})


# ------------------------------------------------------------------------------------ the shipped WMDP configs
_CORPORA = {"cyber-forget-corpus": str(WMDP / "forget_corpus.jsonl"),
            "cyber-retain-corpus": str(WMDP / "retain_corpus.jsonl")}
_MCQ = {"wmdp-cyber": {"path": CYBER}, "all": {"path": MMLU, "fewshot": MMLU_DEV}}


def _localize(node, responses: str):
    """Replaces every hub id of a config with a local stand-in file (corpora, multiple-choice sets)."""
    if isinstance(node, list):
        return [_localize(x, responses) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _localize(v, responses) for k, v in node.items()}
    if node.get("class_path") == "undo_lightning.TextSource":
        args = node["init_args"]
        local = _CORPORA.get(args.get("name"), responses if args.get("text_field") == "response" else ENGLISH)
        node["init_args"] = {"path": local, "text_field": args.get("text_field", "text"), "val_documents": 1}
    if "side" in node and "path" in node:  # a multiple-choice set
        node = {"side": node["side"], "k_shot": min(node.get("k_shot", 0), 2), "limit": node.get("limit"),
                **_MCQ[node["name"]]}
    return node


def stage_variant(name: str, tmp_path: Path, original: str, model_key: str, model: str, root: Path) -> str:
    with open(ROOT / "configs" / "wmdp" / f"{name}.yaml") as f:
        cfg = yaml.safe_load(f)
    responses = tmp_path / "responses.jsonl"  # Magpie records hold their text in "response"
    if not responses.is_file():
        responses.write_text("".join(json.dumps({"response": r["text"]}) + "\n" for r in _jsonl(ENGLISH)))
    cfg["data"] = _localize(cfg["data"], str(responses))
    cfg["data"].update(tokenizer=original, block_size=32, batch_size=4, eval_batch_size=8, mcq_batch_size=4)
    cfg["model"]["init_args"][model_key] = model
    cfg["model"]["init_args"].pop("checkpoint_every", None)
    cfg["trainer"].update(default_root_dir=str(root), max_steps=4, accumulate_grad_batches=2, val_check_interval=4,
                          precision="32-true", accelerator="cpu", enable_progress_bar=False, logger=False)
    if name == "relearn":
        cfg["trainer"].update(accumulate_grad_batches=1, val_check_interval=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_wmdp_stage_configs_run_on_a_micro_model(original, tmp_path):
    from undo_lightning.cli import _lightning_cli

    unlearn, undo, relearn = tmp_path / "unlearn", tmp_path / "undo", tmp_path / "relearn"
    _lightning_cli(["fit", "-c", stage_variant("unlearn_maxent", tmp_path, original, "model", original, unlearn)])
    _lightning_cli(["fit", "-c", stage_variant("undo", tmp_path, original, "teacher", str(unlearn / "hf"), undo)])
    _lightning_cli(["fit", "-c", stage_variant("relearn", tmp_path, original, "model", str(undo / "hf"), relearn)])

    teacher = json.loads((unlearn / "metrics.json").read_text())
    assert teacher["method"] == "maxent" and teacher["method_hparams"] == {
        "retain_weight": 0.2, "convex": True, "retain_loss": "kl"}
    assert teacher["compute"]["frozen_tokens"] == 4 * 2 * 4 * 32  # one frozen forward per retain block
    for folder in (unlearn, undo):
        val = json.loads((folder / "metrics.json").read_text())["val"]
        assert val["val/forget_acc"] == val["val/wmdp_cyber_mcq_acc"]
        assert val["val/retain_acc"] == val["val/mmlu_mcq_acc"]
        assert math.isfinite(val["val/forget_ce"]) and math.isfinite(val["val/retain_ce"])
    student = json.loads((undo / "metrics.json").read_text())
    assert student["alpha"] == 0.25 and student["beta"] == 0.0 and student["teacher"] == str(unlearn / "hf")
    assert "val/mmlu_mcq_acc" in student["teacher_val"]
    ckpt = torch.load(unlearn / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("frozen.") for k in ckpt["state_dict"])  # the original is never checkpointed
    curve = json.loads((relearn / "curve.json").read_text())
    assert curve["steps"] == [0, 2, 4] and len(curve["metrics"]["val/forget_acc"]) == 3
    assert "val/mmlu_mcq_acc" not in curve["metrics"]  # the paper evaluates WMDP only while relearning


def test_side_accuracy_prefers_answer_sets_and_falls_back_to_multiple_choice():
    from undo_lightning.eval.metrics import ValidationMetrics

    m = ValidationMetrics({"mul_equation": "forget"}, {"wmdp": "forget", "mmlu": "retain", "mmlu2": "retain"})
    m.update_answers(["mul_equation", "mul_equation"], [True, False])
    m.update_mcq(["wmdp", "mmlu", "mmlu", "mmlu2"], [True, True, False, True])
    out = m.compute(lambda t: 3 * t)  # a cross-rank sum scales sums and counts alike
    assert out["val/mul_equation_acc"] == 0.5 and out["val/wmdp_mcq_acc"] == 1.0
    assert out["val/mmlu_mcq_acc"] == 0.5 and out["val/mmlu2_mcq_acc"] == 1.0
    assert out["val/forget_acc"] == 0.5  # the arithmetic set, not WMDP: one kind of metric per side
    assert out["val/retain_acc"] == 0.75  # no answer-scored retain set: the mean of the multiple-choice sets


@pytest.mark.slow
def test_wmdp_pipeline_config_runs_on_a_micro_model(tok, original, tmp_path):
    """configs/wmdp/pipeline.yaml, shrunk and with local stand-ins: an existing model evaluated (not pretrained), no
    oracle, no full distillation; the report's forget metric is the WMDP multiple-choice accuracy."""
    from undo_lightning.experiment.pipeline import load_config, plan, run_pipeline

    cfg = load_config(ROOT / "configs" / "wmdp" / "pipeline.yaml")
    assert [s.name for s in plan(cfg)] == ["reference", "unlearn", "undo_a0.25"]
    responses = tmp_path / "responses.jsonl"  # Magpie records hold their text in "response"
    responses.write_text("".join(json.dumps({"response": r["text"]}) + "\n" for r in _jsonl(ENGLISH)))
    small = dict(block_size=32, batch_size=4, eval_batch_size=8)
    for section in ("reference", "unlearn", "undo", "relearn"):
        cfg[section]["data"] = {**_localize(cfg[section]["data"], str(responses)), **small}
    cfg["data"].update(tokenizer=original, mcq_batch_size=4)
    cfg["reference"]["model"] = original
    cfg["trainer"].update(precision="32-true", accelerator="cpu", enable_progress_bar=False)
    for section in ("unlearn", "undo"):
        cfg[section]["trainer"] = {"max_steps": 2, "accumulate_grad_batches": 2, "val_check_interval": 4}
    cfg["undo"]["model"].pop("checkpoint_every")
    cfg["relearn"].update(lrs=[1e-3, 1e-4], seeds=[42], steps=2, eval_every=1, batch_size=4)
    cfg["report"] = {"steps": [1, 2]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    report = run_pipeline(str(path), out_dir=str(out))

    rows = {m["name"]: m for m in report["models"]}
    assert set(rows) == {"reference", "unlearn", "undo_a0.25"} and report["anchors"]["oracle"] is None
    original_val = json.loads((out / "reference" / "metrics.json").read_text())["val"]
    assert rows["reference"]["forget_before"] == original_val["val/wmdp_cyber_mcq_acc"]
    assert rows["reference"]["retain_before"] == original_val["val/mmlu_mcq_acc"]
    # the evaluated original scores what mcq_accuracy gives on the whole stand-in WMDP set (no limit, 0-shot)
    expected = mcq_accuracy(build_model(original, tok), tok, load_mcq(CYBER))
    assert expected["n"] == 8 and original_val["val/wmdp_cyber_mcq_acc"] == pytest.approx(expected["accuracy"])
    teacher = json.loads((out / "unlearn" / "metrics.json").read_text())
    assert teacher["model"] == original and teacher["method_hparams"]["retain_loss"] == "kl"
    student = json.loads((out / "undo_a0.25" / "metrics.json").read_text())
    assert student["alpha"] == 0.25 and student["beta"] == 0.0 and student["global_step"] == 2
    for name in rows:
        curve = json.loads((out / "relearn" / name / "lr=0.001_seed=42" / "curve.json").read_text())
        assert curve["steps"] == [0, 1, 2] and "val/mmlu_mcq_acc" not in curve["metrics"]
