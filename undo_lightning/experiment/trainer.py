"""The Trainer every experiment run starts from: one set of defaults for pipeline stages and attack runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Trainer defaults of every pipeline stage and attack run: steps, not epochs, decide when to validate; gradients are
#: clipped at 1.0 as in the authors' code (docs/reference.md §5.1, §8); no sanity validation, no model summary.
TRAINER_DEFAULTS: dict[str, Any] = dict(accelerator="auto", devices=1, precision="32-true", gradient_clip_val=1.0,
                                        check_val_every_n_epoch=None, num_sanity_val_steps=0,
                                        enable_model_summary=False)


def tensorboard_logger(root: str | Path):
    """TensorBoard events in ``<root>/tb`` (no version sub-folder), next to the run's other outputs."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(str(root), name="tb", version="", default_hp_metric=False)
