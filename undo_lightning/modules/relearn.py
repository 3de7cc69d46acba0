"""``RelearnAttackModule``: the relearning attack that tests whether unlearning is robust (docs/reference.md §8).

The attacker fine-tunes the model under attack with plain next-token cross-entropy on **forget** data and watches
whether the forget capability comes back. Forget and retain metrics are recorded at step 0 (before any update) and at
every validation (``trainer.val_check_interval``), and written to ``<default_root_dir>/curve.json``:

    {"model": name, "lr": lr, "seed": seed, "attack": "forget" | "retain", "steps": [0, k, 2k, ...],
     "metrics": {"val/forget_acc": [...], "val/retain_acc": [...], "val/forget_ce": [...], ...}, ...}

which is the format :func:`undo_lightning.experiment.robustness.load_curves` reads. ``curve.json`` is written atomically after
training and after the loggers are flushed: its presence marks a finished attack run.

``attack="retain"`` is a different attack, the **retain-only** attack of "From Dormant to Deleted" (arXiv 2505.22310):
fine-tune on RETAIN data only and measure whether the forget capability returns anyway (suppressed knowledge
resurfacing under benign fine-tuning). Its curves carry ``"attack": "retain"`` and are never mixed with forget attacks.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from undo_lightning.callbacks import final_evaluation
from undo_lightning.data.arithmetic import FORMS
from undo_lightning.io import write_json_atomic
from undo_lightning.losses import causal_lm_loss
from undo_lightning.modules.base import UndoModule

ATTACKS = ("forget", "retain")
ATTACK_DESCRIPTIONS = {
    "forget": "relearning attack: fine-tuning on FORGET data only (the paper's attack, docs/reference.md §8)",
    "retain": "RETAIN-ONLY attack ('From Dormant to Deleted', arXiv 2505.22310): fine-tuning on RETAIN data only, "
              "measuring whether the forget capability returns",
}


def model_label(path: str) -> str:
    """Short name of a model folder: the parent's name for ``<stage>/hf`` exports, else the folder's own name."""
    path = os.path.normpath(path)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base == "hf" else base


class RelearnAttackModule(UndoModule):
    """Cross-entropy fine-tuning of a trained model on one data split, recording a relearning curve.

    The training data is verified by construction: every batch must carry ``batch["split"] == attack``, otherwise
    training stops with a ``ValueError`` (the reference's "forget-only" arithmetic attack silently trained on the
    retain file, docs/reference.md §13). Defaults follow the paper (docs/reference.md §8): constant LR after a
    1-step warm-up, weight decay 0; gradient clipping (1.0 in the paper) is the Trainer's ``gradient_clip_val``.
    Attacked models are not kept: ``export=False`` and no checkpoint unless ``checkpoint_every > 0``.

    Args:
        model: the model under attack: a local Hugging Face folder (e.g. ``runs/arithmetic/unlearn_maxent/hf``), a hub
            id, or a preset (random init; only useful in tests).
        attack: ``"forget"`` fine-tunes on forget data (the paper's relearning attack); ``"retain"`` fine-tunes on
            retain data only (the retain-only attack of arXiv 2505.22310). Forget metrics are measured either way.
        name: model name recorded in ``curve.json`` (default: :func:`model_label` of ``model``).
        lr: constant learning rate of the attack (paper grid: 1e-3 ... 1e-6).
        weight_decay: AdamW weight decay (paper: 0).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (paper: 1).
        schedule: ``constant`` (paper) or ``cosine``.
        min_lr_ratio: final LR fraction for ``cosine``.
        seed: seed recorded with the curve (the sweep also uses it as the data module's seed).
        checkpoint_every: save ``checkpoints/last.ckpt`` every this many steps; 0 (default) saves none.
        export: also write ``metrics.json`` and the attacked model to ``<default_root_dir>/hf`` (default: no).
    """

    def __init__(
        self,
        model: str = "gemma2-tiny",
        attack: Literal["forget", "retain"] = "forget",
        name: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1,
        schedule: Literal["cosine", "constant"] = "constant",
        min_lr_ratio: float = 1.0,
        seed: int = 0,
        checkpoint_every: int = 0,
        export: bool = False,
    ) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"attack={attack!r}: expected 'forget' (fine-tune on forget data) or 'retain' "
                             "(retain-only attack, arXiv 2505.22310)")
        super().__init__(model=model, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         schedule=schedule, min_lr_ratio=min_lr_ratio, seed=seed, checkpoint_every=checkpoint_every,
                         export=export)
        self.attack = attack
        self.train_data = attack  # what RetainForgetDataModule serves
        self.name = name or model_label(model)
        self.curve_steps: list[int] = []
        self.curve_metrics: dict[str, list[float]] = {}

    # ------------------------------------------------------------------------------------------------ training
    def configure_model(self) -> None:
        super().configure_model()
        self.model.train()  # from_pretrained returns eval mode; the attack fine-tunes in train mode

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        split = batch.get("split")
        if split != self.attack:
            raise ValueError(f"{ATTACK_DESCRIPTIONS[self.attack]} received a training batch from split {split!r}; "
                             f"expected only {self.attack!r} batches. Fit with a RetainForgetDataModule (it serves "
                             f"module.train_data={self.train_data!r}) or a loader whose batches carry "
                             f"split={self.attack!r}")
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, batch["labels"])
        self.count_tokens(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ----------------------------------------------------------------------------------------- curve recording
    def _record(self, step: int, values: dict[str, float]) -> None:
        """Appends one evaluation to the curve (a step already recorded, e.g. after a resume, is not repeated)."""
        if self.curve_steps and step <= self.curve_steps[-1]:
            return
        for key in set(self.curve_metrics) | set(values):
            # a key that appears or disappears mid-run is padded with None (JSON null = "no value", read as NaN)
            self.curve_metrics.setdefault(key, [None] * len(self.curve_steps)).append(values.get(key))
        self.curve_steps.append(step)

    def _per_form(self, values: dict[str, float]) -> dict[str, float]:
        """Mean accuracy per split and problem form, e.g. ``val/forget_equation_acc`` (mul and div equations).

        Equations in the evaluation prompts overlap the training pool while word problems use held-out templates
        (docs/reference.md §3.1), so the two forms separate memorised answers from recovered capability.
        """
        out = {}
        for split in ("retain", "forget"):
            for form in FORMS:
                accs = [values[f"val/{name}_acc"] for name, s in self.validation_metrics().set_split.items()
                        if s == split and name.endswith(f"_{form}") and f"val/{name}_acc" in values]
                if accs:
                    out[f"val/{split}_{form}_acc"] = sum(accs) / len(accs)
        return out

    def _evaluate_now(self) -> dict[str, float]:
        """The shared validation metrics (plus per-form accuracies) of the current weights, outside Lightning's loop."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("RelearnAttackModule needs a datamodule (RetainForgetDataModule) for its step-0 and final "
                             "evaluations")
        with self.trainer.precision_plugin.val_step_context():  # same autocast as Lightning's validation
            values = final_evaluation(self, datamodule.val_dataloader())
        return {**values, **self._per_form(values)}

    def on_train_start(self) -> None:
        rank_zero_info(f"{ATTACK_DESCRIPTIONS[self.attack]}; model {self.name} ({self.model_name}), "
                       f"lr={self.hparams.lr}, seed={self.hparams.seed}")
        if self.global_step == 0 and not self.curve_steps:  # step 0: the untouched model, before any update
            values = self._evaluate_now()
            self._record(0, values)
            for logger in self.loggers:
                logger.log_metrics(values, step=0)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        per_form = self._per_form(self.last_val_metrics)
        self.log_reduced(per_form)
        self.last_val_metrics.update(per_form)
        self._record(self.global_step, self.last_val_metrics)

    def on_train_end(self) -> None:
        """Records the final step when it was not a validation step (``max_steps`` not a multiple of the interval)."""
        if self.curve_steps and self.curve_steps[-1] == self.global_step:
            return
        if self.last_val_step != self.global_step:
            self.last_val_metrics, self.last_val_step = self._evaluate_now(), self.global_step
        else:  # HFExport (export=True, runs first) already evaluated the final weights
            self.last_val_metrics.update(self._per_form(self.last_val_metrics))
        self._record(self.global_step, self.last_val_metrics)

    def curve(self) -> dict:
        """The relearning curve as written to ``curve.json`` (read by :func:`undo_lightning.experiment.robustness.load_curves`)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return {"model": self.name, "model_path": self.model_name, "lr": float(self.hparams.lr),
                "seed": int(self.hparams.seed), "data_seed": getattr(datamodule, "seed", None),
                "attack": self.attack, "attack_description": ATTACK_DESCRIPTIONS[self.attack],
                "max_steps": int(self.trainer.max_steps) if self._trainer is not None else None,
                "steps": list(self.curve_steps), "metrics": self.curve_metrics,
                "compute": self.compute_summary(), "wall_time_s": round(self.elapsed_s(), 3)}

    def on_fit_end(self) -> None:
        """Writes ``curve.json`` last (after the loggers are flushed): its presence marks a finished run."""
        if self.trainer.global_rank != 0 or self.trainer.interrupted:
            return
        for logger in self.loggers:
            logger.save()
            flush = getattr(getattr(logger, "experiment", None), "flush", None)
            if callable(flush):
                flush()
        os.makedirs(self.trainer.default_root_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.trainer.default_root_dir, "curve.json"), self.curve())

    # -------------------------------------------------------------------------------- callbacks / checkpoints
    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        if not self.hparams.checkpoint_every:  # attacked models are not kept (docs/reference.md §8): no last.ckpt
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["relearn_curve"] = {"steps": self.curve_steps, "metrics": self.curve_metrics}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        curve = checkpoint.get("relearn_curve", {})
        self.curve_steps = list(curve.get("steps", []))
        self.curve_metrics = {k: list(v) for k, v in curve.get("metrics", {}).items()}

    def summary(self) -> dict:
        return {**super().summary(), "attack": self.attack, "attack_description": ATTACK_DESCRIPTIONS[self.attack]}
