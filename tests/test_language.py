"""The language setting: English (retain) vs Korean (forget) text, the offline BPE tokenizer option, and the whole
pipeline of configs/language/local.yaml run on small fixture texts we wrote ourselves, with a micro model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from undo_lightning import RetainForgetDataModule, TextSource
from undo_lightning.data.bpe import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "language"
ENGLISH, KOREAN = str(FIXTURES / "english.jsonl"), str(FIXTURES / "korean.jsonl")


def language_data(**kwargs) -> RetainForgetDataModule:
    defaults = dict(retain=TextSource(ENGLISH, val_documents=2), forget=TextSource(KOREAN, val_documents=2),
                    tokenizer="bpe", bpe_vocab_size=400, block_size=32, batch_size=4)
    return RetainForgetDataModule(**{**defaults, **kwargs})


def test_bpe_tokenizer_is_trained_on_the_seed0_train_documents_for_every_data_seed():
    a, b = language_data(seed=0), language_data(seed=7)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()  # every stage and relearning seed: one tokenizer
    docs = TextSource(ENGLISH, val_documents=2).documents("train", 0) + \
        TextSource(KOREAN, val_documents=2).documents("train", 0)
    assert a.tokenizer.get_vocab() == train_bpe_tokenizer(docs, vocab_size=400).get_vocab()
    a.setup()
    for text in (TextSource(ENGLISH).corpus()[0], TextSource(KOREAN).corpus()[0]):  # exact round trip, no <unk>
        ids = a.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert a.tokenizer.decode(ids) == text and a.tokenizer.unk_token_id not in ids
    # documents are packed with a <bos> separator, the Korean blocks hold Korean text
    forget = a.train_blocks("forget")
    assert (forget == a.tokenizer.bos_token_id).sum() >= 10
    assert any("\uac00" <= ch <= "\ud7a3" for ch in a.tokenizer.decode(forget[0]))


def test_bad_language_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="bpe_vocab_size=100"):
        language_data(bpe_vocab_size=100)
    with pytest.raises(ValueError, match=r"english\.jsonl:1: no field 'body'.*has fields \['text'\]"):
        language_data(retain=TextSource(ENGLISH, text_field="body")).setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="holds no non-empty documents"):
        language_data(forget=TextSource(str(empty))).setup()


def local_variant(out_dir: Path) -> dict:
    """configs/language/local.yaml pointed at the fixtures, with a BPE tokenizer, a micro model and a few steps."""
    with open(ROOT / "configs" / "language" / "local.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["out_dir"] = str(out_dir)
    cfg["seed"] = 0
    data = cfg["data"]
    data["retain"]["init_args"].update(path=ENGLISH, val_documents=2)
    data["forget"]["init_args"].update(path=KOREAN, val_documents=2)
    data.update(tokenizer="bpe", bpe_vocab_size=400, block_size=32, batch_size=8, eval_batch_size=32)
    cfg["trainer"].update(precision="32-true", accelerator="cpu", enable_progress_bar=False, log_every_n_steps=2)
    cfg["pretrain"]["model"].update(model="gemma2-micro", checkpoint_every=0)
    cfg["pretrain"]["model"]["optimizer"].update(lr=0.005, warmup_steps=2)
    cfg["pretrain"]["trainer"] = {"max_steps": 16, "val_check_interval": 8}
    cfg["unlearn"]["model"]["optimizer"]["lr"] = 0.003
    cfg["unlearn"]["trainer"] = {"max_steps": 4, "val_check_interval": 2}
    for stage in ("distill", "undo"):
        cfg[stage]["model"].update(checkpoint_every=0)
        cfg[stage]["model"]["optimizer"].update(lr=0.005, warmup_steps=2)
        cfg[stage]["trainer"] = {"max_steps": 6, "val_check_interval": 3}
        cfg[stage]["data"] = {"batch_size": 8}
    cfg["undo"]["alphas"] = [0.5]
    cfg["relearn"].update(lrs=[0.001, 0.003], seeds=[0], steps=4, eval_every=2, batch_size=8)
    cfg["report"]["steps"] = [2, 4]
    return cfg


@pytest.mark.slow
def test_language_pipeline_end_to_end(tmp_path):
    from undo_lightning.experiment.pipeline import run_pipeline

    out = tmp_path / "run"
    config = tmp_path / "language.yaml"
    config.write_text(yaml.safe_dump(local_variant(out)))
    report = run_pipeline(str(config))

    stages = ["reference", "oracle", "unlearn", "distill", "undo_a0.5"]
    metrics = {s: json.loads((out / s / "metrics.json").read_text()) for s in stages}
    for s in stages:
        for key in ("val/retain_ce", "val/forget_ce"):
            assert math.isfinite(metrics[s]["val"][key]), (s, key)
        assert not any(k.endswith("_acc") for k in metrics[s]["val"]), "CE-only setting: no accuracy metrics"
    # every exported model ships the same BPE tokenizer (the hand-off between stages)
    vocabs = [json.loads((out / s / "hf" / "tokenizer.json").read_text())["model"]["vocab"] for s in stages]
    assert all(v == vocabs[0] for v in vocabs) and len(vocabs[0]) == 400
    # the reference learned both languages; MaxEnt pushed the Korean CE of the teacher up, English stays learned
    uniform = math.log(400)
    assert metrics["reference"]["val"]["val/forget_ce"] < uniform
    assert metrics["unlearn"]["val"]["val/forget_ce"] > metrics["reference"]["val"]["val/forget_ce"]
    assert metrics["unlearn"]["val"]["val/retain_ce"] < uniform
    # the relearning attack on Korean: CE curves at steps 0, 2, 4 for every model and LR
    for s in stages:
        for lr in ("0.001", "0.003"):
            curve = json.loads((out / "relearn" / s / f"lr={lr}_seed=0" / "curve.json").read_text())
            assert curve["steps"] == [0, 2, 4] and len(curve["metrics"]["val/forget_ce"]) == 3
    # the report ranks by the worst-case (lowest) Korean CE
    assert report["metric"] == "val/forget_ce" and report["mode"] == "min"
    assert {m["name"] for m in report["models"]} == set(stages)
    assert (out / "report.md").is_file() and (out / "relearn_curves.png").is_file()
