"""Shared fixtures: the offline arithmetic tokenizer and small, fast data modules (everything offline, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Micro models gain nothing from a second intra-op thread, and two OpenMP threads on a busy 2-core machine spin-wait
# on each other (measured: 4.6x slower stage under load). One thread keeps the suite's time predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from undo_lightning.data.tokenizers import build_arithmetic_tokenizer

    return build_arithmetic_tokenizer()


def small_datamodule(tokenizer=None, *, docs: int = 600, add_sub_range=(1, 50), mul_div_range=(1, 20),
                     block_size: int = 32, batch_size: int = 8, prompts: int = 8, **kwargs):
    """A RetainForgetDataModule small enough for unit tests (shares the session tokenizer when given)."""
    from undo_lightning import ArithmeticSource, RetainForgetDataModule

    dm = RetainForgetDataModule(
        retain=ArithmeticSource(("add", "sub"), train_documents=docs, val_documents=60, add_sub_range=add_sub_range),
        forget=ArithmeticSource(("mul", "div"), train_documents=docs, val_documents=60, mul_div_range=mul_div_range),
        block_size=block_size, batch_size=batch_size, eval_prompts_per_set=prompts, **kwargs)
    if tokenizer is not None:
        dm._tokenizer = tokenizer
    return dm


def tiny_trainer(root, max_steps: int = 4, **kwargs):
    import lightning as L

    defaults = dict(max_steps=max_steps, val_check_interval=max_steps, check_val_every_n_epoch=None,
                    default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False, logger=False,
                    num_sanity_val_steps=0, accelerator="cpu", devices=1)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The seconds-scale pipeline (configs/arithmetic/smoke.yaml), run once per session: ``(out_dir, report)``."""
    from pathlib import Path

    from undo_lightning.experiment.pipeline import run_pipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "arithmetic" / "smoke.yaml"
    out = tmp_path_factory.mktemp("smoke") / "arithmetic-smoke"
    return out, run_pipeline(str(config), out_dir=str(out))
