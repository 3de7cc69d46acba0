"""Callbacks shared by the stages: the HF export hand-off (docs/architecture.md) and the retain-gap stop rule."""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from undo_lightning.io import write_json_atomic
from undo_lightning.models import export_model
from undo_lightning.sharding import full_state_dict


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes each file under a temporary name and renames it into place.

    A process killed while saving (the pipeline's resume test uses SIGKILL) leaves the previous ``last.ckpt`` intact
    instead of a truncated file that the next run would fail to resume from.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.partial"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled for training bounded by steps: ``Epoch 7 · step 315/1200``.

    With ``max_steps`` set and no epoch bound Lightning runs with ``max_epochs=-1`` and its bar reads ``Epoch 7/-2``.
    :meth:`like` copies a bar's display settings (``UndoModule.configure_callbacks`` swaps Lightning's default bar).
    """

    @classmethod
    def like(cls, bar: RichProgressBar) -> StepProgressBar:
        return cls(refresh_rate=bar.refresh_rate, leave=bar._leave, theme=bar.theme, console_kwargs=bar._console_kwargs)

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if (trainer.max_epochs is not None and trainer.max_epochs > 0) or trainer.max_steps <= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch} · step {trainer.global_step}/{trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}"  # as Lightning pads it: no flicker against "Validation"


class HFExport(L.Callback):
    """At the end of training: final metrics, then ``<root>/metrics.json`` and ``<root>/hf`` (written atomically).

    ``metrics.json`` holds the last validation metrics at the final step (evaluated here if the last validation was
    earlier), the compute counters (tokens, FLOPs), wall time and whatever the stage's ``summary()`` adds. The model
    folder is written last: its presence means the stage finished.

    Args:
        dirname: folder name under ``trainer.default_root_dir`` for the export.
    """

    def __init__(self, dirname: str = "hf") -> None:
        self.dirname = dirname

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if pl_module.last_val_step != trainer.global_step and trainer.datamodule is not None:
            pl_module.last_val_metrics = final_evaluation(pl_module, trainer.datamodule.val_dataloader())
            pl_module.last_val_step = trainer.global_step
        state_dict = full_state_dict(pl_module.model)  # a collective when sharded: before the rank-0 return
        if trainer.global_rank != 0:
            return
        root = trainer.default_root_dir
        os.makedirs(root, exist_ok=True)
        record = {"stage": os.path.basename(os.path.normpath(root)), "global_step": trainer.global_step,
                  "val": pl_module.last_val_metrics, "compute": pl_module.compute_summary(),
                  "wall_time_s": round(pl_module.elapsed_s(), 3), **pl_module.summary()}
        write_json_atomic(os.path.join(root, "metrics.json"), record)
        export_model(pl_module.exported_model(), pl_module.tokenizer, os.path.join(root, self.dirname),
                     state_dict=state_dict)


@torch.no_grad()
def final_evaluation(pl_module, loaders) -> dict[str, float]:
    """Runs the shared validation over ``loaders``: each rank scores its share, the counts are summed over ranks.

    Call it on every rank (it is a collective under DDP), e.g. from ``on_train_start`` / ``on_train_end``.

    Args:
        pl_module: an ``UndoModule`` with its model built.
        loaders: validation loaders of ``RetainForgetDataModule.val_dataloader()``.
    """
    metrics = pl_module.validation_metrics()
    metrics.reset()
    pl_module.model.eval()
    for loader in loaders:
        for batch in loader:
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pl_module.validation_step(batch, 0)
    pl_module.model.train()
    values = metrics.compute(pl_module.sum_over_ranks)
    values.update({"compute/tokens": float(pl_module.tokens_seen),
                   "compute/flops": pl_module.compute_summary()["flops"]})
    return values


def retain_gap(student: dict[str, float], teacher: dict[str, float], metric: Literal["acc", "ce"]) -> float:
    """How far the student's retain performance is behind the teacher's (docs/reference.md §7.4); <= 0 means caught up.

    Args:
        student: the student's validation metrics.
        teacher: the teacher's validation metrics.
        metric: ``acc``: ``acc_teacher − acc_student`` on ``val/retain_acc`` (absolute); ``ce``:
            ``(ce_student − ce_teacher) / max(ce_teacher, 1e-6)`` on ``val/retain_ce`` (relative).
    """
    if metric == "acc":
        return teacher["val/retain_acc"] - student["val/retain_acc"]
    return (student["val/retain_ce"] - teacher["val/retain_ce"]) / max(teacher["val/retain_ce"], 1e-6)


class RetainGapStop(L.Callback):
    """Stops distilling once the student's retain score is within ``threshold`` of its teacher (docs/reference.md §7.4).

    Reads ``val/retain_gap``, which :class:`DistillModule` computes at every validation against the teacher's metrics
    (evaluated once at fit start): with ``gap_metric: acc`` (arithmetic) training stops when
    ``acc_teacher − acc_student <= threshold`` (the reference's ``mean(acc_s − acc_t) > −0.05``, with the boundary
    counted as caught up); with ``gap_metric: ce`` (language) when ``(ce_s − ce_t) / ce_t < threshold``. The rule is
    checked after the first optimizer step (the authors' cadence: a small-alpha student is often caught up at once,
    and waiting for the first interval would overstate its compute) and after every validation, so its cadence is
    the trainer's ``val_check_interval`` and the budget ``trainer.max_steps``. A run that ends without meeting it
    has ``budget_hit`` set (``DistillModule.summary`` puts it in ``metrics.json``; the report flags the model). The
    decision is reduced over ranks (any rank stopping stops all); the metrics are already all-reduced, so ranks
    agree.

    Use it through ``DistillModule(stop_threshold=...)`` (LightningCLI configs, the pipeline) or pass it to
    ``Trainer(callbacks=[...])`` yourself.

    Args:
        threshold: gap at which training stops (0.05 in the paper for both settings).
    """

    def __init__(self, threshold: float = 0.05) -> None:
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold}: expected >= 0")
        self.threshold = threshold
        self.stopped_at_step: int | None = None

    def within(self, gap: float, metric: Literal["acc", "ce"]) -> bool:
        """The stop condition for a gap (see the class docstring)."""
        return gap <= self.threshold + 1e-12 if metric == "acc" else gap < self.threshold

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not hasattr(pl_module, "gap_metric"):
            raise ValueError(f"RetainGapStop needs a module that measures val/retain_gap against a teacher "
                             f"(DistillModule), got {type(pl_module).__name__}")
        if getattr(trainer, "datamodule", None) is None:
            raise ValueError("RetainGapStop needs trainer.fit(..., datamodule=...): the teacher is evaluated on the "
                             "data module's validation loaders")

    @property
    def budget_hit(self) -> bool:
        """Whether training ended without meeting the rule (read it after ``fit``)."""
        return self.stopped_at_step is None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The step-1 check: after the first optimizer step, unless Lightning validates at this batch anyway (its rule
        # for step-based validation) or the run resumed past it.
        if trainer.global_step != 1 or pl_module.last_val_step == 1 or self.stopped_at_step is not None:
            return
        if (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % trainer.val_check_batch == 0:
            return
        values = final_evaluation(pl_module, trainer.datamodule.val_dataloader())
        values["val/retain_gap"] = pl_module.retain_gap(values)
        pl_module.last_val_metrics, pl_module.last_val_step = values, 1
        if trainer.logger is not None:
            trainer.logger.log_metrics(values, step=1)
        self._decide(trainer, values["val/retain_gap"], pl_module.gap_metric())

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        # Runs after the module's on_validation_epoch_end, which computed this validation's gap.
        gap = pl_module.last_val_metrics.get("val/retain_gap")
        if trainer.sanity_checking or gap is None or pl_module.last_val_step != trainer.global_step:
            return
        self._decide(trainer, gap, pl_module.gap_metric())

    def _decide(self, trainer: L.Trainer, gap: float, metric: Literal["acc", "ce"]) -> None:
        if trainer.strategy.reduce_boolean_decision(self.within(gap, metric), all=False):
            self.stopped_at_step = trainer.global_step
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"stopped_at_step": self.stopped_at_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stopped_at_step = state_dict.get("stopped_at_step")


class RelearnCurve(L.Callback):
    """Records a relearning curve and writes it to ``<default_root_dir>/<filename>`` when training ends.

    The shared validation metrics are recorded at step 0 (the untouched model, before any update), at every
    validation (``trainer.val_check_interval``) and at the last step::

        {..., "steps": [0, k, 2k, ...], "metrics": {"val/forget_acc": [...], "val/retain_acc": [...], ...}}

    together with what the module says about the run (``pl_module.curve_info()``: model, LR, seed, attack). This is
    the format :func:`undo_lightning.experiment.robustness.load_curves` reads. The file is written atomically after
    the loggers are flushed, so its presence marks a finished run; the curve so far travels in checkpoints.

    Args:
        filename: the file under ``default_root_dir``.
    """

    def __init__(self, filename: str = "curve.json") -> None:
        self.filename = filename
        self.steps: list[int] = []
        self.metrics: dict[str, list[float | None]] = {}

    def record(self, step: int, values: dict[str, float]) -> None:
        """Appends one evaluation (a step already recorded, e.g. after a resume, is not repeated)."""
        if self.steps and step <= self.steps[-1]:
            return
        for key in set(self.metrics) | set(values):
            # a key that appears or disappears mid-run is padded with None (JSON null = "no value", read as NaN)
            self.metrics.setdefault(key, [None] * len(self.steps)).append(values.get(key))
        self.steps.append(step)

    @staticmethod
    def _evaluate(trainer: L.Trainer, pl_module) -> dict[str, float]:
        if trainer.datamodule is None:
            raise ValueError(f"{type(pl_module).__name__} needs a datamodule (RetainForgetDataModule) for its step-0 "
                             "and final evaluations")
        with trainer.precision_plugin.val_step_context():  # same autocast as Lightning's validation
            return final_evaluation(pl_module, trainer.datamodule.val_dataloader())

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step == 0 and not self.steps:
            values = self._evaluate(trainer, pl_module)
            self.record(0, values)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=0)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking and pl_module.last_val_step == trainer.global_step:
            self.record(trainer.global_step, pl_module.last_val_metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        """The last step when it was not a validation step (``max_steps`` not a multiple of the interval)."""
        if self.steps and self.steps[-1] == trainer.global_step:
            return
        if pl_module.last_val_step != trainer.global_step:  # HFExport (export=True, earlier in the list) evaluates too
            pl_module.last_val_metrics = self._evaluate(trainer, pl_module)
            pl_module.last_val_step = trainer.global_step
        self.record(trainer.global_step, pl_module.last_val_metrics)

    def curve(self, trainer: L.Trainer | None, pl_module) -> dict:
        """The curve as written to the file."""
        return {**pl_module.curve_info(), "max_steps": int(trainer.max_steps) if trainer is not None else None,
                "steps": list(self.steps), "metrics": self.metrics, "compute": pl_module.compute_summary(),
                "wall_time_s": round(pl_module.elapsed_s(), 3)}

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.interrupted:
            return
        for logger in trainer.loggers:
            logger.save()
            flush = getattr(getattr(logger, "experiment", None), "flush", None)
            if callable(flush):
                flush()
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        write_json_atomic(os.path.join(trainer.default_root_dir, self.filename), self.curve(trainer, pl_module))

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "metrics": {k: list(v) for k, v in self.metrics.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.metrics = {k: list(v) for k, v in state_dict.get("metrics", {}).items()}
