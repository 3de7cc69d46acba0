"""``RelearnAttackModule``: the relearning attack that tests whether unlearning is robust (docs/reference.md §8).

The attacker fine-tunes the model under attack with plain next-token cross-entropy on **forget** data and watches
whether the forget capability comes back. The :class:`~undo_lightning.callbacks.RelearnCurve` callback the module
adds records forget and retain metrics at step 0 (before any update), at every validation and at the last step, and
writes ``<default_root_dir>/curve.json`` (model, LR, seed, attack, steps, metrics) when training ends: its presence
marks a finished attack run.

``attack="retain"`` is a different attack, the **retain-only** attack of "From Dormant to Deleted" (arXiv 2505.22310):
fine-tune on RETAIN data only and measure whether the forget capability returns anyway (suppressed knowledge
resurfacing under benign fine-tuning). ``attack="mixture"`` fine-tunes on the data module's retain/forget ``mixture``:
the authors' default attack trains on their pretraining mix, in which forget data is about 12.5 % of the tokens, so
per step it is weaker than the forget-only attack. A curve records its attack *setting* name (``"attack"``, e.g.
``forget`` or ``heldout``) and what it trained on (``"train_on"``); settings are never mixed in one aggregate.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from undo_lightning.callbacks import RelearnCurve
from undo_lightning.io import check_choice
from undo_lightning.losses import causal_lm_loss, lm_hidden_states
from undo_lightning.modules.base import OptimizerConfig, UndoModule
from undo_lightning.modules.lora import LoraAdapters, LoraSettings

#: the data an attack fine-tunes on: forget data (the paper's arithmetic attack), retain data only (arXiv
#: 2505.22310), or a retain/forget mixture (the authors' default attack: their pretraining mix)
Attack = Literal["forget", "retain", "mixture"]
ATTACK_DESCRIPTIONS = {
    "forget": "relearning attack: fine-tuning on FORGET data only (the paper's attack, docs/reference.md §8)",
    "retain": "RETAIN-ONLY attack ('From Dormant to Deleted', arXiv 2505.22310): fine-tuning on RETAIN data only, "
              "measuring whether the forget capability returns",
    "mixture": "MIXTURE attack: fine-tuning on the data's retain/forget mixture (the authors' default attack trains "
               "on their pretraining mix, about 12.5 % forget tokens; docs/reference.md §8)",
}
_SETTING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_setting_name(setting: str) -> None:
    """An attack setting's name ends up in run-folder and file names: letters, digits, ``_``, ``.``, ``-``."""
    if not isinstance(setting, str) or not _SETTING_NAME.match(setting):
        raise ValueError(f"attack setting name {setting!r}: expected letters, digits, '_', '.' or '-' (it names run "
                         "folders and files), e.g. 'forget', 'heldout', 'mixture'")


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
        optimizer: AdamW and schedule (:class:`~undo_lightning.modules.base.OptimizerConfig`); default
            :attr:`default_optimizer`, the paper's: constant LR after a 1-step warm-up, weight decay 0 (its LR grid:
            1e-3 ... 1e-6).
        seed: seed recorded with the curve (the sweep also uses it as the data module's seed).
        checkpoint_every: save ``checkpoints/last.ckpt`` every this many steps; 0 (default) saves none.
        export: also write ``metrics.json`` and the attacked model to ``<default_root_dir>/hf`` (default: no).
        setting: name of the attack setting recorded as ``curve.json["attack"]`` (default: ``attack``); the sweep
            names settings such as ``heldout`` (forget data with held-out facts) this way.
        lora: train LoRA adapters (:class:`~undo_lightning.modules.lora.LoraSettings`: rank, alpha, target modules)
            instead of every weight; ``None`` (default): full fine-tuning.
    """

    #: the paper's attack (docs/reference.md §8): constant LR after a 1-step warm-up, weight decay 0
    default_optimizer = OptimizerConfig(lr=1e-3, warmup_steps=1, schedule="constant", min_lr_ratio=1.0)

    def __init__(
        self,
        model: str = "gemma2-tiny",
        attack: Attack = "forget",
        name: str | None = None,
        optimizer: OptimizerConfig = default_optimizer,
        seed: int = 0,
        checkpoint_every: int = 0,
        export: bool = False,
        setting: str | None = None,
        lora: LoraSettings | None = None,
    ) -> None:
        check_choice("attack", attack, Attack)
        check_setting_name(setting or attack)
        lora = LoraSettings.of(lora)
        super().__init__(model=model, optimizer=optimizer, seed=seed, checkpoint_every=checkpoint_every,
                         export=export)
        # plain values only in hparams (checkpoints are loaded with weights_only=True)
        self.hparams["lora"] = None if lora is None else dataclasses.asdict(lora)
        self.lora = None if lora is None else LoraAdapters(lora)
        self.attack = attack
        self.setting = setting or attack
        self.train_data = attack  # what RetainForgetDataModule serves
        self.name = name or model_label(model)
        self.relearn_curve = RelearnCurve()

    # ------------------------------------------------------------------------------------------------ training
    def build_trained(self) -> torch.nn.Module:
        """The attacked model, with LoRA adapters when ``lora`` is set (injected before sharding: the adapters are
        parameters of the sharded units)."""
        model = super().build_trained()
        return model if self.lora is None else self.lora.inject(model)

    def exported_model(self):
        """With LoRA, the adapters merged into the weights (or the adapter alone, ``lora.merge=False``)."""
        return self.model if self.lora is None else self.lora.exported()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        split = batch.get("split")
        if split != self.attack:
            raise ValueError(f"{ATTACK_DESCRIPTIONS[self.attack]} received a training batch from split {split!r}; "
                             f"expected only {self.attack!r} batches. Fit with a RetainForgetDataModule (it serves "
                             f"module.train_data={self.train_data!r}) or a loader whose batches carry "
                             f"split={self.attack!r}")
        out = lm_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        loss = causal_lm_loss(out, batch["labels"], divisor=self.token_divisor(batch))
        self.count_tokens(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # -------------------------------------------------------------------------------------------------- curve
    def curve_info(self) -> dict:
        """What :class:`~undo_lightning.callbacks.RelearnCurve` records about the run beside the curve."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return {"model": self.name, "model_path": self.model_name, "lr": float(self.optimizer_config.lr),
                "seed": int(self.hparams.seed), "data_seed": getattr(datamodule, "seed", None),
                "attack": self.setting, "train_on": self.attack,
                "attack_description": ATTACK_DESCRIPTIONS[self.attack], "lora": self.hparams.get("lora"),
                "few_shot": getattr(datamodule, "few_shot", None)}

    def curve(self) -> dict:
        """The relearning curve as written to ``curve.json`` (see :class:`~undo_lightning.callbacks.RelearnCurve`)."""
        return self.relearn_curve.curve(self._trainer, self)

    def on_train_start(self) -> None:
        rank_zero_info(f"attack setting {self.setting!r}, {ATTACK_DESCRIPTIONS[self.attack]}; model {self.name} "
                       f"({self.model_name}), lr={self.optimizer_config.lr}, seed={self.hparams.seed}")

    # -------------------------------------------------------------------------------- callbacks / checkpoints
    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        if not self.hparams.checkpoint_every:  # attacked models are not kept (docs/reference.md §8): no last.ckpt
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return [*callbacks, self.relearn_curve]  # after HFExport, whose final evaluation it reuses

    def summary(self) -> dict:
        lora = self.hparams.get("lora")
        return {**super().summary(), "attack": self.setting, "train_on": self.attack,
                "attack_description": ATTACK_DESCRIPTIONS[self.attack], "lora": lora,
                "trainable_parameters": sum(p.numel() for p in self.trainable_parameters())}
