"""``DistillModule``: distil a frozen teacher's outputs into a student (the "Distill" of UNDO,
docs/reference.md §7); its stop rule is :class:`~undo_lightning.callbacks.RetainGapStop` (docs/reference.md §7.4).

One module covers three experiments (docs/reference.md §7), chosen by ``student_init``:

* full distillation — ``student_init: random``: a freshly initialised copy of the teacher's architecture;
* UNDO — ``student_init: teacher``: a copy of the (unlearned) teacher, shrunk and perturbed once (``alpha``,
  ``beta``, docs/reference.md §6) before training;
* oracle matching — ``student_init: <folder or preset>``: e.g. the reference model distilled from the oracle.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from typing import Literal

import torch
from transformers import AutoModelForCausalLM

from undo_lightning.callbacks import RetainGapStop, final_evaluation, retain_gap
from undo_lightning.data.tokenizers import load_tokenizer
from undo_lightning.io import check_choice
from undo_lightning.losses import check_temperature, forward_kl, lm_hidden_states
from undo_lightning.models import count_parameters, is_hf_folder
from undo_lightning.modules.base import OptimizerConfig, UndoModule
from undo_lightning.noise import shrink_and_perturb
from undo_lightning.sharding import is_empty

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


#: what ``val/retain_gap`` measures (``auto``: ``acc`` when the data has answer-scored retain sets, else ``ce``)
GapMetric = Literal["auto", "acc", "ce"]

class DistillModule(UndoModule):
    """Forward-KL distillation of a frozen teacher into a student on the retain + forget mixture.

    The paper distils on retain **and** forget inputs (docs/reference.md §3.3): the teacher's forget outputs carry its
    suppression, so the data module's ``mixture`` should include both splits.

    The base class's ``model`` argument is not an argument here: the student is fully described by ``student_init``
    (its architecture is the teacher's unless ``student_init`` names another model).

    Hooks implemented (on top of :class:`~undo_lightning.modules.base.UndoModule`): ``configure_model`` (loads the
    teacher, builds and noises the student once, checks they share the data's vocabulary), ``training_step``,
    ``on_fit_start`` (evaluates the teacher once), ``on_validation_epoch_end`` (adds ``val/retain_gap``),
    ``configure_callbacks`` (adds :class:`RetainGapStop` when ``stop_threshold`` is set). The teacher is held with
    :meth:`~undo_lightning.modules.base.UndoModule.freeze`: eval mode whatever Lightning toggles, no gradients, never
    in checkpoints (resume re-loads it from its folder).

    Resume: the student is rebuilt (and noised) in ``configure_model`` exactly as at the first start, then Lightning
    overwrites it with the checkpoint's student, so a resumed run continues from the trained student and the noise is
    never applied to it a second time. ``strict_loading`` is off because checkpoints lack the teacher's keys; the
    student's keys are checked explicitly instead.

    Sharding: the noise is applied in ``configure_model``, on full tensors, before any strategy wraps the module. Under
    ``ModelParallelStrategy`` (``configs/strategies/fsdp.yaml``) teacher and student are then sharded as separate FSDP2
    units (:meth:`~undo_lightning.modules.base.UndoModule.prepare_models`); FSDP1 needs ``use_orig_params=True``.

    Args:
        teacher: the frozen teacher, a Hugging Face folder written by ``save_pretrained`` (e.g.
            ``runs/arithmetic/unlearn_maxent/hf``); checked when the model is built (a config may name a folder an
            earlier stage has not written yet).
        student_init: ``random`` (fresh init of the teacher's architecture, seeded by ``seed``), ``teacher`` (a copy
            of the teacher, then shrink-and-perturb: UNDO), or a preset name / HF folder / hub id (e.g. the reference
            model for oracle matching). Its vocabulary must be the teacher's.
        alpha: shrink/noise mix in [0, 1] for ``student_init: teacher`` (0 = exact copy of the teacher; 1 with
            ``beta`` 1 = Xavier re-initialisation); unused for other inits.
        beta: noise scale in [0, 1] for ``student_init: teacher``; unused for other inits.
        noise_seed: seed of the noise draw (independent of ``seed``).
        noise_include: regex of parameter names to noise (``re.search``; e.g. ``layers\\.[01]\\.``); ``None`` = all.
        kl_chunk_size: positions per float32 chunk of the forward KL; ``None``: 64 MiB per chunk
            (:func:`~undo_lightning.losses.auto_chunk_size`, 65 positions at a 256k vocabulary).
        teacher_temperature: the target is ``softmax(teacher logits / teacher_temperature)``; 1 (the paper) distils
            the teacher's own distribution, > 1 a softer one (:func:`~undo_lightning.losses.forward_kl`). The
            arithmetic demo's controls (``configs/arithmetic/controls.yaml``) measure what it does to robustness.
        stop_threshold: stop at the first validation where ``val/retain_gap`` is within this threshold
            (:class:`RetainGapStop`, docs/reference.md §7.4); ``None`` trains for ``trainer.max_steps``.
            Validation cadence is the trainer's ``val_check_interval``.
        gap_metric: what ``val/retain_gap`` (logged at every validation of a fit) measures: ``acc`` = teacher −
            student ``val/retain_acc`` (absolute; arithmetic), ``ce`` = relative ``val/retain_ce`` gap (language),
            ``auto`` = ``acc`` when the data has answer-scored retain sets, else ``ce``.
        optimizer: AdamW and schedule (:class:`~undo_lightning.modules.base.OptimizerConfig`; default: LR 1e-3,
            cosine to 0.1 × LR, no warm-up).
        checkpoint_every, export: see :class:`~undo_lightning.modules.base.UndoModule`.
        seed: seed of a random student initialisation.
    """

    train_data = "mixture"
    holds_frozen_model = True

    def __init__(
        self,
        teacher: str,
        student_init: str = "random",
        alpha: float = 0.6,
        beta: float = 0.1,
        noise_seed: int = 0,
        noise_include: str | None = None,
        kl_chunk_size: int | None = None,
        teacher_temperature: float = 1.0,
        stop_threshold: float | None = None,
        gap_metric: GapMetric = "auto",
        optimizer: OptimizerConfig = UndoModule.default_optimizer,
        seed: int = 0,
        checkpoint_every: int = 0,
        export: bool = True,
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{name}={value!r}: expected a value in [0, 1]")
        if not teacher:
            raise ValueError("teacher='': expected the Hugging Face folder of the teacher model")
        if not student_init:
            raise ValueError("student_init='': expected 'random', 'teacher', a preset name or a model folder")
        if noise_include is not None:
            try:
                re.compile(noise_include)
            except re.error as err:
                raise ValueError(f"noise_include={noise_include!r} is not a valid regex ({err})") from None
        if kl_chunk_size is not None and kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size={kl_chunk_size}: expected a positive integer, or null (chosen from the "
                             "vocabulary size)")
        check_temperature(teacher_temperature)
        if stop_threshold is not None and stop_threshold < 0:
            raise ValueError(f"stop_threshold={stop_threshold}: expected >= 0 or None (no stop rule)")
        check_choice("gap_metric", gap_metric, GapMetric)
        # The base's `model` names where the architecture (and a fallback tokenizer) comes from.
        super().__init__(model=teacher if student_init in ("random", "teacher") else student_init, optimizer=optimizer,
                         seed=seed, checkpoint_every=checkpoint_every, export=export)
        self.teacher_path = teacher
        self.teacher = None
        self.stop_rule: RetainGapStop | None = None  # set in configure_callbacks when stop_threshold is given
        self.noise_summary: dict | None = None
        self._teacher_metrics: dict[str, float] | None = None
        self.strict_loading = False  # checkpoints hold the student only (see UndoModule.freeze)

    # ------------------------------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: the noise is applied once, at the first build
            return
        self.check_strategy()
        hp = self.hparams
        if not is_hf_folder(self.teacher_path):
            raise ValueError(f"teacher={self.teacher_path!r}: no Hugging Face model folder there (no config.json); "
                             "expected the hf/ folder an earlier stage exported (e.g. runs/arithmetic/unlearn/hf)")
        tokenizer = self.tokenizer
        self._check_shipped_tokenizer("teacher", self.teacher_path, tokenizer)
        teacher = self.build(self.teacher_path)
        if hp.student_init == "random":
            config = copy.deepcopy(teacher.config)
            empty = is_empty(teacher)  # a rank that receives its shards from rank 0 (see UndoModule.build)
            with torch.random.fork_rng(devices=[]), torch.device("meta") if empty else contextlib.nullcontext():
                torch.manual_seed(hp.seed)
                student = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                           attn_implementation=config._attn_implementation)
        elif hp.student_init == "teacher":
            student = copy.deepcopy(teacher)  # before freezing, so the copy stays trainable
            self.noise_summary = shrink_and_perturb(student, hp.alpha, hp.beta, hp.noise_seed,
                                                    include=hp.noise_include)
            if self.noise_summary["elements_updated"] == 0:
                raise ValueError(f"noise_include={hp.noise_include!r} matches no parameter of the student")
        else:
            if is_hf_folder(hp.student_init):
                self._check_shipped_tokenizer("student_init", hp.student_init, tokenizer)
            student = self.build(hp.student_init)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"student_init={hp.student_init!r} has vocab_size={student.config.vocab_size} but "
                             f"teacher={self.teacher_path!r} has vocab_size={teacher.config.vocab_size}; distillation "
                             "compares full-vocabulary distributions, so both must use the same tokenizer")
        self.freeze("teacher", teacher)
        self.model = student.train()
        self.prepare_models()

    def _check_shipped_tokenizer(self, what: str, folder: str, tokenizer) -> None:
        """Raises if ``folder`` ships a tokenizer whose vocabulary or special tokens differ from the data's."""
        if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
            return
        shipped = load_tokenizer(folder)
        if shipped.get_vocab() != tokenizer.get_vocab() or shipped.all_special_tokens != tokenizer.all_special_tokens:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            data_name = getattr(datamodule, "tokenizer_name", None) or tokenizer.name_or_path or "?"
            raise ValueError(f"{what}={folder!r} ships a tokenizer ({len(shipped)} tokens) that differs from the "
                             f"data's tokenizer {data_name!r} ({len(tokenizer)} tokens); teacher, student and data "
                             "must share one tokenizer")

    def flops_per_token(self) -> float:
        """``6 N_student`` (forward + backward) ``+ 2 N_teacher`` (forward only) per token (docs/reference.md §10)."""
        return 6.0 * count_parameters(self.model) + 2.0 * count_parameters(self.teacher)

    # -------------------------------------------------------------------------------------------------- train
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Hidden states, not logits: the KL builds both models' logits one chunk of positions at a time.
        with torch.no_grad():
            teacher = lm_hidden_states(self.teacher, batch["input_ids"], batch["attention_mask"])
        student = lm_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        loss = forward_kl(student, teacher, batch["labels"], chunk_size=self.hparams.kl_chunk_size,
                          divisor=self.token_divisor(batch), teacher_temperature=self.hparams.teacher_temperature)
        self.count_tokens(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # --------------------------------------------------------------------------------------------- the teacher
    def teacher_metrics(self) -> dict[str, float]:
        """The teacher's shared validation metrics (``val/retain_ce``, ``val/retain_acc``, ...), computed once.

        Runs the same validation as the student (``final_evaluation``) with the teacher swapped in, on the data
        module's validation loaders.
        """
        if self._teacher_metrics is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "val_dataloader"):
                raise ValueError("evaluating the teacher needs a datamodule with val_dataloader() (e.g. "
                                 "RetainForgetDataModule) attached to the trainer")
            student = self.model
            self.model = self.teacher
            try:
                values = final_evaluation(self, datamodule.val_dataloader())
            finally:
                self.model = student
                self.teacher.eval()  # final_evaluation puts the evaluated model back in train mode
            self._teacher_metrics = {k: v for k, v in values.items() if k.startswith("val/")}
        return self._teacher_metrics

    def gap_metric(self) -> Literal["acc", "ce"]:
        """``gap_metric`` with ``auto`` resolved against the teacher's metrics."""
        metric = self.hparams.gap_metric
        if metric == "auto":
            metric = "acc" if "val/retain_acc" in self.teacher_metrics() else "ce"
        return metric

    def retain_gap(self, values: dict[str, float]) -> float:
        """``val/retain_gap`` of the student's validation ``values`` against the teacher (:func:`retain_gap`)."""
        return retain_gap(values, self.teacher_metrics(), self.gap_metric())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if getattr(self.trainer, "datamodule", None) is None:
            return
        metrics = self.teacher_metrics()
        key = f"val/retain_{self.gap_metric()}"
        if key not in metrics:
            raise ValueError(f"gap_metric={self.hparams.gap_metric!r} needs {key!r}, but validation gives "
                             f"{sorted(metrics)}")
        if self.logger is not None:
            self.logger.log_metrics({"teacher/" + k.split("/", 1)[1]: v for k, v in metrics.items()},
                                    step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        # Only during fit, where the teacher was evaluated at the start; the base sets last_val_step when it logged.
        if self._teacher_metrics is None or self.trainer.sanity_checking or self.last_val_step != self.global_step:
            return
        gap = self.retain_gap(self.last_val_metrics)
        self.last_val_metrics["val/retain_gap"] = gap
        self.log_reduced({"val/retain_gap": gap})

    # --------------------------------------------------------------------------------- callbacks / checkpoints
    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        if self.hparams.stop_threshold is not None:
            self.stop_rule = RetainGapStop(self.hparams.stop_threshold)
            callbacks.append(self.stop_rule)
        return callbacks

    def summary(self) -> dict:
        hp = self.hparams
        noised = hp.student_init == "teacher"
        return {**super().summary(), "teacher": self.teacher_path, "teacher_parameters": count_parameters(self.teacher),
                "student_init": hp.student_init, "alpha": hp.alpha if noised else None,
                "beta": hp.beta if noised else None, "noise_seed": hp.noise_seed if noised else None,
                "noise_include": hp.noise_include if noised else None, "noise": self.noise_summary,
                "stop_threshold": hp.stop_threshold, "gap_metric": hp.gap_metric,
                "stopped_at_step": self.stop_rule.stopped_at_step if self.stop_rule else None,
                # trained to its step budget without meeting the stop rule: not a converged student
                "budget_hit": self.stop_rule.budget_hit if self.stop_rule else None,
                "teacher_val": dict(self._teacher_metrics or {})}
