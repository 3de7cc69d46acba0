"""``UnlearnModule``: step 1 of UNDO, suppressing the forget capability (docs/reference.md §5).

The objective is an :class:`~undo_lightning.modules.methods.UnlearningMethod` (GradDiff, MaxEnt — the paper's
recommended teacher — or RMU); RepNoise and SAM are robustness baselines that combine with any of them. Each training
batch is a pair ``{"forget": batch, "retain": batch}`` from ``RetainForgetDataModule`` (``train_data = "paired"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from undo_lightning.losses import HiddenStates, causal_lm_loss, lm_hidden_states, repnoise_loss
from undo_lightning.models import count_parameters
from undo_lightning.modules.base import OptimizerConfig, UndoModule
from undo_lightning.modules.methods import (
    DIVISOR,
    SAM,
    Recorder,
    RepNoise,
    UnlearningMethod,
    decoder_layers,
    record,
    resolve_method,
)


class UnlearnModule(UndoModule):
    """Unlearning on paired forget/retain batches.

    The loss is the ``method``'s (see :mod:`undo_lightning.modules.methods`): a forget term and a retain term weighed
    ``L_forget + w L_retain`` (or convex). With ``repnoise`` the forget part also gets ``CE(retain) + beta N -
    alpha log H``: ``(1 - w)(L_forget + RepNoise) + w L_retain`` in the convex form. With ``sam`` every update is a
    sharpness-aware step. A method that needs a frozen copy of the starting model (RMU with ``w > 0``, a ``kl``
    retain term) gets one built from ``model`` (``eval()``, no gradients, never in checkpoints).

    Losses are computed in float32 (also under ``bf16-mixed``). A non-finite loss raises ``FloatingPointError``
    before any update, so no NaN weights are ever written. Logged: ``train/loss``, ``train/forget_loss`` (forget
    CE for GradDiff, the KL for MaxEnt, the MSE for RMU), ``train/retain_loss`` (retain CE, KL to the frozen copy, or
    RMU's MSE), RepNoise terms, and the shared validation metrics. ``tokens`` counts the forget and retain tokens the
    trained model processed; FLOPs are ``6 N`` per token (twice with SAM) plus ``2 N`` per token of frozen-copy
    forwards.

    Hooks implemented: ``configure_model`` (loads the model, builds the frozen copy, attaches the method's hooks),
    ``training_step``, ``configure_callbacks`` (rejects settings SAM cannot honour), ``teardown`` (removes the hooks),
    ``on_save_checkpoint`` / ``on_load_checkpoint`` (the RepNoise generator; the frozen copy is never written).

    Args:
        model: the model to unlearn: a folder written by ``save_pretrained`` (the reference stage's ``hf/``), a
            preset or a hub id.
        method: the unlearning method, as ``{class_path: undo_lightning.MaxEnt, init_args: {...}}`` (``GradDiff``,
            ``MaxEnt``, ``NPO``, ``SimNPO``, ``RMU``) or the name of one with its default settings (``graddiff``,
            ``maxent``, ``npo``, ``simnpo``, ``rmu``).
        repnoise: add RepNoise (``{alpha, beta}``); ``None``: off.
        sam: take sharpness-aware steps (``{rho, clip_val}``); ``None``: plain steps.
        optimizer: AdamW and schedule (:class:`~undo_lightning.modules.base.OptimizerConfig`); default: the authors'
            constant LR 3e-4, no warm-up, no weight decay (docs/reference.md §5.1).
        seed: seed of the RMU control vector, the RepNoise noise, and of a preset's initialisation.
        checkpoint_every: save ``checkpoints/last.ckpt`` every this many steps (0 = only at the end).
        export: write ``hf/`` and ``metrics.json`` when training ends.
    """

    train_data = "paired"
    default_optimizer = OptimizerConfig(lr=3e-4, schedule="constant")
    hparams_ignore = ("method", "repnoise", "sam")  # objects; metrics.json records their settings (summary)

    def __init__(
        self,
        model: str = "runs/arithmetic/reference/hf",
        method: UnlearningMethod | Literal["graddiff", "maxent", "npo", "simnpo", "rmu"] = "maxent",
        repnoise: RepNoise | None = None,
        sam: SAM | None = None,
        optimizer: OptimizerConfig = default_optimizer,
        seed: int = 0,
        checkpoint_every: int = 0,
        export: bool = True,
    ) -> None:
        super().__init__(model=model, optimizer=optimizer, seed=seed, checkpoint_every=checkpoint_every,
                         export=export)
        for name, value, cls in (("repnoise", repnoise, RepNoise), ("sam", sam, SAM)):
            if value is not None and not isinstance(value, cls):
                raise ValueError(f"{name}={value!r}: expected {cls.__name__}(...) settings or None")
        self.method = resolve_method(method)
        self.repnoise, self.sam = repnoise, sam
        # RMU with w = 0 and no RepNoise needs no retain batch at all
        self.uses_retain = self.method.has_retain_term or repnoise is not None
        self.automatic_optimization = sam is None
        self.frozen: nn.Module | None = None
        self._mlps: Recorder | None = None  # RepNoise: every block's MLP output
        self._attached = False
        self._noise: torch.Generator | None = None
        self._noise_state: torch.Tensor | None = None  # restored from a checkpoint before the generator exists

    # ------------------------------------------------------------------------------------------------- set-up
    @property
    def holds_frozen_model(self) -> bool:
        return self.method.needs_frozen

    def configure_model(self) -> None:
        super().configure_model()
        if self.method.needs_frozen and self.frozen is None:
            self.freeze("frozen", self.build(self.model_name))
        if not self._attached:
            # Before the method's hooks exist (the head check runs a forward they must not record) and before it
            # keeps parameter references (sharding replaces the parameters).
            self.prepare_models()
            self.method.attach(self.model, self.frozen, self.hparams.seed)
            if self.repnoise is not None:
                self._mlps = self._mlp_recorder()
            self._attached = True

    def _mlp_recorder(self) -> Recorder:
        path, layers = decoder_layers(self.model)
        missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
        if missing or not isinstance(getattr(self.model.base_model, "norm", None), nn.Module):
            raise ValueError(f"repnoise needs decoder blocks with an `.mlp` and a final `.norm` "
                             f"({type(self.model).__name__} lacks them)")
        return Recorder({f"{path}.{i}.mlp": layer.mlp for i, layer in enumerate(layers)})

    def teardown(self, stage: str) -> None:
        self.method.detach()
        if self._mlps is not None:
            self._mlps.remove()
            self._mlps = None
        self._attached = False

    def configure_callbacks(self):
        # Runs before Lightning validates the loop configuration, so SAM's limits are reported in its own terms.
        trainer = self.trainer
        if self.sam is not None:
            if trainer.accumulate_grad_batches != 1:
                raise ValueError(f"sam={self.sam} with accumulate_grad_batches={trainer.accumulate_grad_batches}: "
                                 "SAM perturbs with the gradient of one batch (the authors' code silently dropped the "
                                 "accumulated ones, docs/reference.md §13); use 1 and a larger batch_size")
            if trainer.gradient_clip_val:
                raise ValueError(f"sam={self.sam} with Trainer(gradient_clip_val={trainer.gradient_clip_val}): SAM "
                                 "steps manually; remove the Trainer setting and set sam's clip_val instead")
        return super().configure_callbacks()

    # ------------------------------------------------------------------------------------------------ losses
    def _noise_generator(self) -> torch.Generator:
        if self._noise is None:
            self._noise = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
            if self._noise_state is not None:
                self._noise.set_state(self._noise_state)
        return self._noise

    def _logit_lens(self, out: HiddenStates, hidden: torch.Tensor) -> HiddenStates:
        """The logit lens of an intermediate hidden state, read exactly like the final logits: final norm once, then
        the model's head with its soft-capping (the authors' code normed twice and skipped the cap,
        docs/reference.md §13)."""
        return HiddenStates(self.model.base_model.norm(hidden), out.head)

    def _forward(self, batch: dict, logits: bool, hidden_states: bool = False) -> HiddenStates | None:
        """The trained model on ``batch``; without ``logits`` the output is dropped (hooks read its blocks). Always the
        model's own forward (see :func:`~undo_lightning.losses.lm_hidden_states`), so a sharded model gathers."""
        out = lm_hidden_states(self.model, batch["input_ids"], batch["attention_mask"], hidden_states)
        return out if logits else None

    @torch.no_grad()
    def _frozen_forward(self, batch: dict) -> tuple[Any, dict[str, torch.Tensor]]:
        """The frozen copy on ``batch``: ``(output or None, outputs its method hooks recorded)``; counts its tokens."""
        with record([self.method.frozen_recorder]) as (recorded,):
            out = lm_hidden_states(self.frozen, batch["input_ids"], batch["attention_mask"])
            out = out if self.method.needs_logits else None
        self.count_tokens(batch, counter="frozen_tokens")
        return out, recorded

    def compute_losses(self, forget: dict, retain: dict) -> dict[str, torch.Tensor]:
        """The unlearning objective on one forget and one retain batch.

        Args:
            forget: batch with ``input_ids``, ``labels``, ``attention_mask`` ``[B, T]``.
            retain: same for the retain split.

        Returns:
            float32 scalars: ``loss`` (the objective to minimise), ``forget_loss``, and where computed
            ``retain_loss`` (retain CE, KL to the frozen model, or RMU's MSE), ``guard_active`` (GradDiff with a
            guard), ``repnoise_noise``, ``repnoise_harmful``.
        """
        method, rep = self.method, self.repnoise
        forget = {**forget, DIVISOR: self.token_divisor(forget)}
        if self.uses_retain:
            retain = {**retain, DIVISOR: self.token_divisor(retain)}
        logits = method.needs_logits or rep is not None  # RMU alone skips the LM head
        terms: dict[str, torch.Tensor] = {}
        with record([method.recorder, self._mlps]) as (hooked, mlps):
            out = self._forward(forget, logits, hidden_states=rep is not None)
        terms["forget_loss"] = method.forget_loss(out, hooked, forget, lambda: self._frozen_forward(forget))
        retain_ce = None
        if self.uses_retain:
            with record([method.recorder]) as (hooked,):
                retain_out = self._forward(retain, logits)
            if retain_out is not None and (method.uses_retain_ce or rep is not None):
                retain_ce = causal_lm_loss(retain_out, retain["labels"], divisor=retain[DIVISOR])
            terms["retain_loss"] = method.retain_term(retain_out, hooked, retain, retain_ce,
                                                      lambda: self._frozen_forward(retain))
        forget_part = method.forget_objective(terms["forget_loss"], terms)
        if rep is not None:
            lens = [self._logit_lens(out, h) for h in out.layers[:-1]]  # embeddings and blocks 0..L-2
            terms_rep = repnoise_loss(list(mlps.values()), lens + [out], forget["labels"],
                                      self._noise_generator(), alpha=rep.alpha, beta=rep.beta,
                                      mask=forget["attention_mask"])
            # RepNoise joins the method's forget part (docs/reference.md §5.5)
            forget_part = forget_part + retain_ce + terms_rep.loss
            terms.update(repnoise_noise=terms_rep.noise, repnoise_harmful=terms_rep.harmful)
        terms["loss"] = method.combine(forget_part, terms.get("retain_loss"))
        return terms

    @property
    def frozen_tokens_seen(self) -> int:
        """Tokens the frozen copy has run forward on (2N FLOPs each)."""
        return self.counted("frozen_tokens")

    def _check_finite(self, terms: dict[str, torch.Tensor], what: str) -> None:
        if not torch.isfinite(terms["loss"]):
            values = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(
                f"method={self.method.name}: non-finite {what} at step {self.global_step} ({values}); stopping before "
                "the update so no NaN weights are written. Lower lr" +
                (", or set max_forget_ce (GradDiff divergence guard)" if self.method.name == "graddiff" else ""))

    # ---------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        forget, retain = batch.get("forget"), batch.get("retain")
        if forget is None or retain is None or forget.get("split") != "forget" or retain.get("split") != "retain":
            raise ValueError("UnlearnModule trains on paired batches {'forget': ..., 'retain': ...} from "
                             "RetainForgetDataModule (train_data='paired')")
        terms = self.compute_losses(forget, retain)
        self._check_finite(terms, "loss")
        self.count_tokens(*((forget, retain) if self.uses_retain else (forget,)))
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False)
        if self.automatic_optimization:
            return terms["loss"]
        self._sam_step(terms["loss"], forget, retain)
        return None

    def _sam_step(self, loss: torch.Tensor, forget: dict, retain: dict) -> None:
        """One SAM update from ``loss`` at the current weights (docs/reference.md §5.6)."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad()
        self.manual_backward(loss)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        saved = [p.detach().clone() for p in params]  # restore from a copy: θ + ε - ε != θ in floating point
        with torch.no_grad():
            scale = self.sam.rho / (norm + 1e-12)
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad * scale.to(p.dtype))
        optimizer.zero_grad()
        perturbed = self.compute_losses(forget, retain)  # the full loss again, at θ + ε
        self._check_finite(perturbed, "loss at the SAM-perturbed weights")
        self.manual_backward(perturbed["loss"])
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)
        if self.sam.clip_val > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.sam.clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

    # -------------------------------------------------------------------------------------- accounting, state
    def compute_summary(self) -> dict[str, float]:
        n = count_parameters(self.model)
        passes = 1 if self.automatic_optimization else 2  # SAM: forward + backward at θ and at θ + ε
        flops = self.tokens_seen * 6 * n * passes + self.frozen_tokens_seen * 2 * n
        return {"tokens": self.tokens_seen, "tokens_by_split": self.tokens_by_split(),
                "frozen_tokens": self.frozen_tokens_seen, "flops": flops}

    def summary(self) -> dict:
        options = {name: dataclasses.asdict(value) if value is not None else None
                   for name, value in (("repnoise", self.repnoise), ("sam", self.sam))}
        return {**super().summary(), "method": self.method.name, **options, "method_hparams": self.method.config(),
                "lr": self.optimizer_config.lr, "trainable_parameters": count_parameters(self.model, trainable_only=True)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._noise is not None:
            checkpoint["undo_state"]["repnoise_generator"] = self._noise.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("undo_state", {})
        self._noise_state = state.get("repnoise_generator")
