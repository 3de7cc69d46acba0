"""Losses are token means over a whole optimizer step, on every rank and across accumulated micro-batches.

Eight padded rows of uneven length train one step as 1 process x batch 8, 2 gloo processes x batch 4, and
1 process x 2 accumulated micro-batches x batch 4; the gradients the optimizer sees must agree. A mean per micro-batch
would not: the two halves of the rows hold different numbers of scored tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from undo_lightning.data.steps import STEP_TOKENS, with_step_tokens
from undo_lightning.losses import IGNORE_INDEX

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import sys
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from undo_lightning import PretrainModule, UnlearnModule, MaxEnt
    from undo_lightning.cli import close_process_group
    from undo_lightning.data.steps import with_step_tokens
    from undo_lightning.data.tokenizers import build_arithmetic_tokenizer

    torch.set_num_threads(1)
    stage, devices, batch_size, accumulate, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
        sys.argv[5]
    LENGTHS = {{"a": [12, 3, 5, 12, 2, 4, 3, 6], "b": [7, 12, 2, 9, 12, 12, 11, 4]}}

    def rows(split):
        g = torch.Generator().manual_seed(len(split))
        ids = torch.randint(5, 40, (8, 12), generator=g)
        labels, mask = ids.clone(), torch.ones_like(ids)
        for i, n in enumerate(LENGTHS[split]):
            labels[i, n:], mask[i, n:] = {ignore}, 0
        return ids, labels, mask

    class Data(L.LightningDataModule):
        tokenizer = build_arithmetic_tokenizer()

        def train_dataloader(self):
            rank = self.trainer.global_rank
            order = range(rank * batch_size, 8, devices * batch_size)  # rank r: rows r*b .. r*b + b - 1 of each 8
            def batch(split, start):
                ids, labels, mask = (t[start:start + batch_size] for t in rows(split))
                return {{"input_ids": ids, "labels": labels, "attention_mask": mask, "split": split}}
            if stage == "pretrain":
                batches = [batch("a", s) for s in order]
            else:
                batches = [{{"forget": {{**batch("a", s), "split": "forget"}}, "retain": {{**batch("b", s), "split": "retain"}}}}
                           for s in order]
            # batch_size=None: the loader yields the prepared batches as they are (each rank already has its rows)
            return DataLoader(list(with_step_tokens(batches, accumulate)), batch_size=None)

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            if trainer.global_rank == 0:
                torch.save({{n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}},
                           root + "/grads.pt")

    L.seed_everything(0, verbose=False)
    module = (PretrainModule(model="gemma2-micro", export=False) if stage == "pretrain" else
              UnlearnModule(model="gemma2-micro", method=MaxEnt(retain_weight=2.0), export=False))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        accumulate_grad_batches=accumulate, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=root, callbacks=[Grads()], use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data())
    close_process_group()
""")


def _grads(script: Path, stage: str, devices: int, batch_size: int, accumulate: int, root: Path) -> dict:
    root.mkdir()
    proc = subprocess.run([sys.executable, str(script), stage, str(devices), str(batch_size), str(accumulate),
                           str(root)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "grads.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("stage", ["pretrain", "unlearn"])
def test_gradients_do_not_depend_on_how_a_step_is_split(tmp_path, stage):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT.format(ignore=IGNORE_INDEX))
    single = _grads(script, stage, 1, 8, 1, tmp_path / "single")
    for name, (devices, batch_size, accumulate) in {"ddp": (2, 4, 1), "accumulated": (1, 4, 2)}.items():
        other = _grads(script, stage, devices, batch_size, accumulate, tmp_path / name)
        assert other.keys() == single.keys()
        for key, grad in single.items():
            torch.testing.assert_close(other[key], grad, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def _batch(lengths):
    labels = torch.zeros(len(lengths), 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        labels[i, n:] = IGNORE_INDEX
    return {"labels": labels}


def test_with_step_tokens_counts_each_step_of_accumulated_micro_batches():
    # scored tokens per batch: positions t with labels[t + 1] kept -> (length - 1) per row
    batches = [_batch([6, 2]), _batch([3, 3]), _batch([1, 6]), _batch([4, 4]), _batch([2, 2])]
    out = list(with_step_tokens(batches, accumulate=2))
    assert out == batches  # the same objects, in order
    assert [int(b[STEP_TOKENS]) for b in out] == [5 + 1 + 2 + 2] * 2 + [0 + 5 + 3 + 3] * 2 + [1 + 1]  # last: shorter
    paired = [{"forget": _batch([6]), "retain": _batch([2])}, {"forget": _batch([3]), "retain": _batch([6])}]
    out = list(with_step_tokens(paired, accumulate=2))
    assert [int(b["forget"][STEP_TOKENS]) for b in out] == [7, 7]
    assert [int(b["retain"][STEP_TOKENS]) for b in out] == [6, 6]
    with pytest.raises(ValueError, match="accumulate=0"):
        list(with_step_tokens(batches, accumulate=0))
    with pytest.raises(ValueError, match="expected batches with 'labels'"):
        list(with_step_tokens([{"input_ids": 1}], accumulate=1))
