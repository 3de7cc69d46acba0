import json
import os

import lightning as L
import pytest
import torch
from conftest import small_datamodule, tiny_trainer
from transformers import AutoModelForCausalLM

from undo_lightning import PretrainModule
from undo_lightning.callbacks import final_evaluation


def test_short_pretraining_learns_and_exports(tokenizer, tmp_path):
    # easy operands so a micro model learns addition within ~150 steps
    dm = small_datamodule(tokenizer, docs=3000, add_sub_range=(1, 4), mul_div_range=(1, 4), batch_size=16,
                          block_size=32, prompts=20, mixture={"retain": 1.0})
    module = PretrainModule(model="gemma2-micro", optimizer={"lr": 5e-3, "warmup_steps": 10}, seed=0)
    root = tmp_path / "reference"
    trainer = tiny_trainer(root, max_steps=150, val_check_interval=150)
    module.tokenizer = tokenizer
    module.configure_model()
    dm.setup()
    from undo_lightning.eval.metrics import ValidationMetrics

    module._validation_metrics = ValidationMetrics(dm.eval_set_split)  # no trainer yet to take the sets from
    before = final_evaluation(module, dm.val_dataloader())
    trainer.fit(module, datamodule=dm)
    after = module.last_val_metrics
    assert after["val/retain_ce"] < before["val/retain_ce"] - 0.5
    eq = (after["val/add_equation_acc"] + after["val/sub_equation_acc"]) / 2
    eq0 = (before["val/add_equation_acc"] + before["val/sub_equation_acc"]) / 2
    assert eq > eq0 + 0.2, (before, after)
    # compute accounting: every training token counted once, FLOPs = 6 N tokens
    assert module.tokens_seen == 150 * 16 * 32
    record = json.loads((root / "metrics.json").read_text())
    assert record["compute"]["tokens"] == 150 * 16 * 32
    assert record["compute"]["tokens_by_split"] == {"retain": 150 * 16 * 32, "forget": 0}  # the oracle's mixture
    assert record["compute"]["flops"] == 6 * record["parameters"] * record["compute"]["tokens"]
    assert record["val"]["val/retain_acc"] == after["val/retain_acc"] and record["global_step"] == 150
    assert (root / "checkpoints" / "last.ckpt").is_file()
    # the export is the trained model: same logits through plain transformers
    loaded = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    ids = tokenizer(["3 + 4 = 7"], return_tensors="pt")["input_ids"]
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(module.model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert not [p for p in os.listdir(root) if ".tmp" in p]


def test_same_seed_same_numbers(tokenizer, tmp_path):
    def run(name):
        dm = small_datamodule(tokenizer, seed=5)
        module = PretrainModule(model="gemma2-micro", optimizer={"lr": 1e-3}, seed=5, export=False)
        tiny_trainer(tmp_path / name, max_steps=6).fit(module, datamodule=dm)
        return module.last_val_metrics, module.model.state_dict()

    (m1, w1), (m2, w2) = run("a"), run("b")
    assert m1 == m2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_resume_continues_with_the_same_batches(tokenizer, tmp_path):
    """A run interrupted at step 4 and resumed from its checkpoint ends with the weights of an uninterrupted run."""
    def module():
        return PretrainModule(model="gemma2-micro", optimizer={"lr": 1e-3}, seed=1, export=False,
                              checkpoint_every=4)

    full = module()
    tiny_trainer(tmp_path / "full", max_steps=8, val_check_interval=4).fit(full, datamodule=small_datamodule(tokenizer))
    class StopAt4(L.Callback):  # the same run (max_steps=8) stopped after step 4, as a kill would
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 4

    part = module()
    tiny_trainer(tmp_path / "part", max_steps=8, val_check_interval=4, callbacks=[StopAt4()]).fit(
        part, datamodule=small_datamodule(tokenizer))
    assert part.global_step == 4
    resumed = module()
    tiny_trainer(tmp_path / "part", max_steps=8, val_check_interval=4).fit(
        resumed, datamodule=small_datamodule(tokenizer), ckpt_path=str(tmp_path / "part" / "checkpoints" / "last.ckpt"))
    assert resumed.tokens_seen == full.tokens_seen
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_progress_bar_counts_steps_not_epochs(tokenizer, tmp_path):
    """Step-bounded runs (max_epochs=-1) show "Epoch 1 · step 6/6", not Lightning's "Epoch 1/-2"."""
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    from undo_lightning.callbacks import StepProgressBar

    module = PretrainModule(model="gemma2-micro", optimizer={"lr": 1e-3}, export=False)
    trainer = tiny_trainer(tmp_path, max_steps=6, enable_progress_bar=True,
                           callbacks=[RichProgressBar(leave=True, refresh_rate=5)])
    trainer.fit(module, datamodule=small_datamodule(tokenizer, docs=100))
    bar = trainer.progress_bar_callback
    assert type(bar) is StepProgressBar and (bar.refresh_rate, bar._leave) == (5, True)  # the user's settings kept
    assert trainer.current_epoch >= 1  # 6 steps span more than one epoch of this small data set
    assert bar._get_train_description(1).strip() == "Epoch 1 · step 6/6"
    assert "/-" not in bar._get_train_description(trainer.current_epoch)
