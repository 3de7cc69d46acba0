"""The shared base of every stage: model construction, optimizer/schedule, validation, compute accounting, export.

Stages subclass :class:`UndoModule` and implement ``training_step`` only (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from undo_lightning.data.module import BatchKind
from undo_lightning.data.steps import STEP_TOKENS
from undo_lightning.data.tokenizers import load_tokenizer
from undo_lightning.eval.mcq import mcq_correct
from undo_lightning.eval.metrics import ValidationMetrics, answer_correct, lm_nll
from undo_lightning.io import check_choice, settings_from
from undo_lightning.losses import OutputHead, scored_tokens
from undo_lightning.models import build_model, count_parameters, is_hf_folder
from undo_lightning.sharding import is_sharded, shard, shard_from_rank0, tensor_parallel_size

#: learning-rate schedules of every stage (see :func:`lr_factor`)
Schedule = Literal["cosine", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule: the ``optimizer`` group of every stage's config.

    In YAML: ``model: {init_args: {optimizer: {lr: 3e-4, schedule: constant}}}``; keys left out keep the stage's
    defaults (each stage documents its own, e.g. the attack's constant LR after a 1-step warm-up).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay (applied to all parameters, as the authors' code does).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        schedule: ``cosine`` decays to ``min_lr_ratio * lr`` at ``max_steps``; ``constant`` keeps ``lr``.
        min_lr_ratio: final LR as a fraction of ``lr`` for the cosine schedule.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr > 0:  # also rejects NaN
            raise ValueError(f"optimizer.lr={self.lr}: expected a positive learning rate")
        if not self.weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay}: expected >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas={self.betas}: expected two values in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps}: expected >= 0")
        check_choice("optimizer.schedule", self.schedule, Schedule)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio={self.min_lr_ratio}: expected a value in [0, 1]")

    @classmethod
    def of(cls, value: OptimizerConfig | Mapping, default: OptimizerConfig) -> OptimizerConfig:
        """``value`` as an :class:`OptimizerConfig`: an instance as it is; a mapping (a Python dict, a checkpoint's
        ``hparams``) overrides only the fields it names, over ``default`` (the stage's defaults)."""
        if isinstance(value, Mapping):  # YAML and checkpoints give lists
            value = {k: tuple(v) if k == "betas" else v for k, v in value.items()}
        return settings_from(cls, value, "optimizer", default)


class UndoModule(L.LightningModule):
    """Base LightningModule holding one Hugging Face causal LM.

    Hooks implemented here: ``configure_model`` (builds/loads the model once, idempotent), ``configure_optimizers``
    (AdamW + warm-up and cosine/constant schedule), ``validation_step`` / ``on_validation_epoch_*`` (shared retain and
    forget metrics), ``configure_callbacks`` (last-checkpoint saving, the Hugging Face export, a step-labelled
    progress bar),
    ``on_save_checkpoint`` / ``on_load_checkpoint`` (compute counters).

    Args:
        model: preset name (``gemma2-tiny``, ``gemma2-0.1b``, ``gemma2-0.3b``), a local HF folder, or a hub id.
        optimizer: AdamW and learning-rate schedule (:class:`OptimizerConfig`); a mapping sets only the fields it
            names over the stage's :attr:`default_optimizer`.
        seed: seed of a preset's random initialisation.
        checkpoint_every: save ``checkpoints/last.ckpt`` every this many optimizer steps (0 = only at the end).
        export: write ``<default_root_dir>/hf`` (save_pretrained + tokenizer) and ``metrics.json`` when training ends.
    """

    #: which training data the stage needs from ``RetainForgetDataModule`` (see its docstring)
    train_data: str = "mixture"
    #: ``__init__`` arguments kept out of ``hparams`` (objects: checkpoints hold plain values only)
    hparams_ignore: tuple[str, ...] = ()
    #: the stage's optimizer defaults: the ``optimizer`` argument's default, and what a partial mapping overrides
    default_optimizer = OptimizerConfig()

    def __init__(
        self,
        model: str = "gemma2-tiny",
        optimizer: OptimizerConfig = default_optimizer,
        seed: int = 0,
        checkpoint_every: int = 0,
        export: bool = True,
    ) -> None:
        super().__init__()
        self.optimizer_config = OptimizerConfig.of(optimizer, self.default_optimizer)
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={checkpoint_every}: expected >= 0")
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        # plain values only: checkpoints are loaded with weights_only=True, which refuses arbitrary classes
        self.hparams["optimizer"] = dataclasses.asdict(self.optimizer_config)
        self.model_name = model
        self._frozen: list[str] = []  # attributes holding frozen models, see freeze
        self.model = None
        self._tokenizer = None
        self._validation_metrics: ValidationMetrics | None = None
        self._counts: dict[str, int | torch.Tensor] = {}  # token counters, see count_tokens
        self.wall_time_s = 0.0
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step = -1
        self._fit_started: float | None = None

    # ------------------------------------------------------------------------------------------------- model
    @property
    def tokenizer(self):
        """The data module's tokenizer, or the model folder's when the module is used without one."""
        if self._tokenizer is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is not None and hasattr(datamodule, "tokenizer"):
                self._tokenizer = datamodule.tokenizer
            elif is_hf_folder(self.model_name):
                self._tokenizer = load_tokenizer(self.model_name)
            else:
                raise ValueError(f"model={self.model_name!r}: no tokenizer available; fit with a "
                                 "RetainForgetDataModule (or any datamodule with a .tokenizer) or set module.tokenizer")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def build(self, name: str, seed: int | None = None):
        """Builds/loads a model by name with this module's tokenizer (shared by stages that hold several models).

        When the models will be sharded over several processes (:attr:`loads_on_rank0_only`), only rank 0 reads the
        weights; the others build the architecture on the meta device and receive their shards from rank 0 in
        :meth:`prepare_models`.
        """
        return build_model(name, self.tokenizer, seed=self.hparams.seed if seed is None else seed,
                           empty=self.loads_on_rank0_only and self.global_rank != 0)

    @property
    def loads_on_rank0_only(self) -> bool:
        """Whether models are loaded on rank 0 alone and broadcast into the other ranks' shards: under
        ``ModelParallelStrategy`` (FSDP2) with more than one process, so no rank but the first holds a full copy."""
        return self._trainer is not None and self.device_mesh is not None and self.trainer.world_size > 1

    def freeze(self, name: str, model: torch.nn.Module) -> torch.nn.Module:
        """Holds ``model`` as the frozen attribute ``name`` (a distillation teacher, a frozen starting copy).

        A frozen model stays in eval mode whatever mode Lightning sets (no dropout), has no gradients (so no optimizer
        state), and is never written to checkpoints: it is rebuilt from its folder in ``configure_model`` on resume.
        Checkpoints then lack its keys, so loading is non-strict and :meth:`on_load_checkpoint` checks instead that
        every trained tensor is restored.
        """
        model.eval().requires_grad_(False)
        setattr(self, name, model)
        if name not in self._frozen:
            self._frozen.append(name)
        self.strict_loading = False
        return model

    def train(self, mode: bool = True):
        """Sets the trained model's mode; frozen models (:meth:`freeze`) stay in eval mode regardless."""
        super().train(mode)
        for name in getattr(self, "_frozen", ()):
            getattr(self, name).eval()
        return self

    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Lightning may call it once per trainer entry point
            return
        self.check_strategy()
        # from_pretrained returns eval mode; a stage trains its model (Lightning keeps submodule modes as found)
        self.model = self.build_trained().train()
        self.prepare_models()

    def build_trained(self) -> torch.nn.Module:
        """The model this stage trains, before sharding (a stage that adapts it, e.g. with LoRA, overrides this)."""
        return self.build(self.model_name)

    #: whether the stage holds a frozen model beside the trained one (a teacher, a frozen copy); see check_strategy
    holds_frozen_model: bool = False

    def check_strategy(self) -> None:
        """Refuses, before any model loads, a Lightning strategy this stage cannot train under.

        * DeepSpeed ZeRO stage 3 with a frozen model beside the trained one: Lightning's DeepSpeed integration
          partitions one model per engine, and a second model crashes it (Lightning-AI/pytorch-lightning#17319).
        * FSDP1 (``strategy: fsdp``) with a frozen model and ``use_orig_params`` off: FSDP1 flattens each wrapped
          unit into one tensor, which must be all-frozen or all-trainable.
        * ``ModelParallelStrategy`` with tensor parallelism: the stages shard over data-parallel ranks only.

        Raises:
            ValueError: naming the strategy setting and what works instead.
        """
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        kind = type(strategy).__name__
        fix = ("use ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) (FSDP2: each model "
               "sharded on its own: configs/strategies/fsdp.yaml) or ddp")
        if self.holds_frozen_model and kind == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
            raise ValueError(f"strategy={kind}(stage=3): {type(self).__name__} holds a frozen model beside the trained "
                             f"one, which Lightning's DeepSpeed ZeRO-3 cannot partition; {fix}")
        if self.holds_frozen_model and kind == "FSDPStrategy" and not strategy.kwargs.get("use_orig_params", True):
            raise ValueError(f"strategy={kind}(use_orig_params=False): {type(self).__name__} holds a frozen model "
                             "beside the trained one, and FSDP1 units must then mix frozen and trainable parameters; "
                             f"set use_orig_params=True, or {fix}")
        tensor_parallel = tensor_parallel_size(self.device_mesh) if kind == "ModelParallelStrategy" else 1
        if tensor_parallel != 1:
            raise ValueError(f"strategy=ModelParallelStrategy(tensor_parallel_size={tensor_parallel}): the stages "
                             "shard models over data-parallel ranks only; set tensor_parallel_size=1 and "
                             "data_parallel_size to the number of processes (its 'auto' means tensor parallelism "
                             "over the devices of a node)")

    def prepare_models(self) -> None:
        """Checks each held model's output head (:meth:`~undo_lightning.losses.OutputHead.of`: one tiny forward on
        full parameters) and, under ``ModelParallelStrategy``, shards it on its own
        (:func:`~undo_lightning.sharding.shard`).

        Idempotent; a stage calls it at the end of ``configure_model``, after building every model it holds and
        before anything keeps references to their parameters (sharding replaces them).
        """
        mesh = self.device_mesh
        for model in (self.model, *(getattr(self, name) for name in self._frozen)):
            if model is None or is_sharded(model):
                continue
            if not self.loads_on_rank0_only:
                OutputHead.of(model)
                if mesh is not None:
                    shard(model, mesh)
                continue
            self._check_head_on_rank0(model)
            shard_from_rank0(model, mesh, self.trainer.strategy.root_device)

    def _check_head_on_rank0(self, model: torch.nn.Module) -> None:
        """:meth:`OutputHead.of` on rank 0, which holds the weights; every rank learns the outcome (one all-reduce),
        so all of them stop on a refused head instead of waiting for rank 0 in the next collective."""
        error = None
        if self.global_rank == 0:
            try:
                OutputHead.of(model)
            except ValueError as err:
                error = err
        failed = self.trainer.strategy.reduce(torch.tensor(float(error is not None)), reduce_op="sum")
        if error is not None:
            raise error
        if failed.item() > 0:
            raise ValueError(f"{type(model).__name__}: rank 0 refused the model's output head (see its error)")
        OutputHead.checked_on_another_rank(model)

    def exported_model(self):
        """The model :class:`~undo_lightning.callbacks.HFExport` saves once training is over (the trained one)."""
        return self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: ``6 N`` for forward + backward of the trained model (docs/reference.md §10)."""
        return 6.0 * count_parameters(self.model)

    # ------------------------------------------------------------------------------------------ optimization
    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.optimizer_config
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, betas=hp.betas,
                                      weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, total, hp.schedule, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def count_tokens(self, *batches: dict, counter: str = "tokens") -> None:
        """Adds the scored tokens of this step's batches (all ranks) to a compute counter.

        The sum stays a device tensor until it is read (:meth:`counted`), so counting never forces a host sync in the
        training step.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        per_batch = [b["attention_mask"].sum() * world for b in batches]
        self._counts[counter] = self._counts.get(counter, 0) + sum(per_batch)
        if counter != "tokens":
            return
        for b, tokens in zip(batches, per_batch):  # per split as well: what the report states for its anchors
            if "forget_tokens" in b:  # mixture blocks: each row says how many of its tokens are forget data
                forget = b["forget_tokens"].sum()
                if world > 1:  # ranks hold different rows: one all-reduce of a scalar, no host sync
                    forget = self.trainer.strategy.reduce(forget.to(self.device), reduce_op="sum")
                parts = {"retain": tokens - forget, "forget": forget}
            elif b.get("split") in ("retain", "forget"):
                parts = {b["split"]: tokens}
            else:
                continue
            for split, count in parts.items():
                self._counts[f"tokens_{split}"] = self._counts.get(f"tokens_{split}", 0) + count

    def token_divisor(self, batch: dict) -> torch.Tensor | None:
        """What a per-token loss summed over ``batch`` is divided by, so that each optimizer step follows the mean over
        every scored token of the step: all ranks, all accumulated micro-batches (however padding falls).

        DDP averages gradients over ``W`` ranks and Lightning divides each micro-batch's loss by ``K``
        (``accumulate_grad_batches``), so the divisor is ``N / (W K)`` with ``N`` the scored tokens of the whole step:
        ``batch["step_tokens"]`` (:func:`~undo_lightning.data.steps.with_step_tokens`) summed over ranks, else ``K``
        times this micro-batch's count summed over ranks, exact when a step's micro-batches hold equal counts (packed
        blocks) or ``K = 1``. One all-reduce of a scalar per call (none on one process). A mean per micro-batch would
        weigh a token by the padding of its rank and micro-batch, so results would change with the GPU count at the
        same effective batch.

        Args:
            batch: a training batch with ``labels`` ``[B, T]``.

        Returns:
            a float32 scalar tensor, or ``None`` outside a trainer (the losses then take the batch's own token mean).
        """
        if self._trainer is None:
            return None
        accumulate = self.trainer.accumulate_grad_batches if self.automatic_optimization else 1
        local = batch.get(STEP_TOKENS)
        if local is None:
            local = scored_tokens(batch["labels"]) * accumulate
        total = self.sum_over_ranks(torch.as_tensor(local, device=self.device))
        return total.clamp(min=1).float() / (self.trainer.world_size * accumulate)

    def counted(self, counter: str = "tokens") -> int:
        """The value of a token counter (read on the host)."""
        value = int(self._counts.get(counter, 0))
        self._counts[counter] = value
        return value

    @property
    def tokens_seen(self) -> int:
        """Training tokens of the trained model so far, all ranks, accumulated across resumes."""
        return self.counted("tokens")

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self._counts["tokens"] = value

    def tokens_by_split(self) -> dict[str, int]:
        """Trained tokens per data split (``retain``/``forget``; blocks of a mixture counted by their documents)."""
        return {split: self.counted(f"tokens_{split}") for split in ("retain", "forget")}

    def compute_summary(self) -> dict[str, float]:
        return {"tokens": self.tokens_seen, "tokens_by_split": self.tokens_by_split(),
                "flops": self.tokens_seen * self.flops_per_token()}

    # -------------------------------------------------------------------------------------------- validation
    def validation_metrics(self) -> ValidationMetrics:
        """The accumulator of the shared validation metrics (keys fixed by the data module's evaluation sets)."""
        if self._validation_metrics is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            self._validation_metrics = ValidationMetrics(getattr(datamodule, "eval_set_split", {}),
                                                         getattr(datamodule, "mcq_set_split", {}),
                                                         getattr(datamodule, "eval_set_group", {}))
        return self._validation_metrics

    def on_validation_epoch_start(self) -> None:
        self.validation_metrics().reset()

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the DDP ranks (unchanged on one process or without a trainer)."""
        if self._trainer is None:
            return t
        return self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        metrics = self.validation_metrics()
        if batch["kind"] == BatchKind.EMPTY:  # this rank's share of the set ran out (DDP padding, see data.EvalShard)
            return
        if batch["kind"] == BatchKind.LM:
            metrics.update_lm(batch["split"], *lm_nll(self.model, batch["input_ids"], batch["attention_mask"],
                                                      batch["labels"]))
        elif batch["kind"] == BatchKind.MCQ:
            metrics.update_mcq(batch["sets"], mcq_correct(self.model, self.tokenizer, batch))
        else:
            metrics.update_answers(batch["sets"], answer_correct(self.model, self.tokenizer, batch))

    def on_validation_epoch_end(self) -> None:
        values = self.validation_metrics().compute(self.sum_over_ranks)
        if self.trainer.sanity_checking:
            return
        values.update({"compute/tokens": float(self.tokens_seen), "compute/flops": self.compute_summary()["flops"]})
        self.last_val_metrics, self.last_val_step = values, self.global_step
        self.log_reduced(values)

    def log_reduced(self, values: dict[str, float]) -> None:
        """Logs validation values that are already reduced over ranks (identical on every rank).

        ``sync_dist=True`` costs one small all-reduce per value and averages identical numbers, which leaves them
        unchanged; with ``False`` Lightning warns under DDP for every epoch-level value.
        """
        self.log_dict(values, sync_dist=True, add_dataloader_idx=False)

    # --------------------------------------------------------------------------------- callbacks / checkpoints
    def configure_callbacks(self):
        root = self.trainer.default_root_dir
        every = self.hparams.checkpoint_every or None
        from undo_lightning.callbacks import AtomicModelCheckpoint, HFExport, StepProgressBar

        callbacks = [AtomicModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), filename="step{step}",
                                           save_last=True, save_top_k=0, every_n_train_steps=every,
                                           save_on_train_epoch_end=False, auto_insert_metric_name=False,
                                           enable_version_counter=False)]
        if self.hparams.export:
            callbacks.append(HFExport())
        if type(self.trainer.progress_bar_callback) is RichProgressBar:  # Lightning's default: "Epoch 7/-2"
            callbacks.append(StepProgressBar.like(self.trainer.progress_bar_callback))
        return callbacks

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def elapsed_s(self) -> float:
        """Wall time of this stage, accumulated across resumes."""
        return self.wall_time_s + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["undo_state"] = {"wall_time_s": self.elapsed_s(),
                                    **{f"{name}_seen": self.counted(name) for name in ("tokens", *self._counts)}}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.split(".", 1)[0] in self._frozen]:
            del state[key]  # frozen models are rebuilt from their folders (see freeze)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("undo_state", {})
        self._counts = {key[: -len("_seen")]: value for key, value in state.items() if key.endswith("_seen")}
        self.wall_time_s = state.get("wall_time_s", 0.0)
        if self._frozen and self.model is not None:  # non-strict loading must still restore every trained tensor
            expected = {"model." + k for k in self.model.state_dict()}
            missing = sorted(expected - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"the checkpoint lacks {len(missing)} tensors of the trained model (e.g. "
                                 f"{missing[:3]}); it was not written by this {type(self).__name__} configuration")

    def summary(self) -> dict:
        """What ``metrics.json`` records about this stage (subclasses add their own fields)."""
        return {"model": self.model_name, "parameters": count_parameters(self.model)}


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier: linear warm-up ``(step + 1) / warmup``, then constant or cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # clamp: never rises again past the end
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
