"""``UnlearnModule``: step 1 of UNDO, suppressing the forget capability (docs/reference.md §5).

Methods (``method=``): GradDiff (§5.2), MaxEnt (§5.3, the paper's recommended teacher) and RMU (§5.4); RepNoise
(§5.5) and SAM (§5.6) of docs/reference.md are robustness baselines that combine with any of them. Each training
batch is a pair ``{"forget": batch, "retain": batch}`` from ``RetainForgetDataModule`` (``train_data = "paired"``).
"""

from __future__ import annotations

import fnmatch
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Literal

import torch
from torch import nn

from undo_lightning.losses import (
    causal_lm_loss,
    forward_kl,
    maxent_loss,
    repnoise_loss,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
)
from undo_lightning.models import count_parameters
from undo_lightning.modules.base import UndoModule

METHODS = ("graddiff", "maxent", "rmu")
RETAIN_LOSSES = ("ce", "kl")


class _Recorder:
    """Forward hooks, registered once, that keep the outputs of some modules while a ``record()`` block is open.

    Registering once and removing in ``remove()`` avoids the reference's leak, which added a hook per step
    (docs/reference.md §13). Outside ``record()`` the hooks only test a flag, so validation and export are unaffected.

    Args:
        modules: name -> module whose forward output is kept (the first element when the module returns a tuple).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._outputs: dict[str, torch.Tensor] | None = None
        self._handles = [m.register_forward_hook(partial(self._hook, name)) for name, m in modules.items()]

    def _hook(self, name: str, module: nn.Module, args, output) -> None:
        if self._outputs is not None:
            self._outputs[name] = output[0] if isinstance(output, tuple) else output

    @contextmanager
    def record(self):
        """Yields a dict filled with ``name -> output [B, T, H]`` by the forwards run inside the block."""
        self._outputs = outputs = {}
        try:
            yield outputs
        finally:
            self._outputs = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def _record(recorders: list[_Recorder | None]):
    """Records with every given recorder at once; yields one output dict per recorder (empty for ``None``)."""
    with ExitStack() as stack:
        yield tuple(stack.enter_context(r.record()) if r is not None else {} for r in recorders)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ``ModuleList`` of a Hugging Face causal LM's decoder blocks (``model.layers`` for Gemma/Llama).

    Found by name on the unwrapped HF model as the ``ModuleList`` with ``config.num_hidden_layers`` entries, so it is
    resolved once, before any DDP/FSDP wrapping.
    """
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"{type(model).__name__}: found no ModuleList of its {n} decoder layers")


class UnlearnModule(UndoModule):
    """Unlearning on paired forget/retain batches.

    Losses (``CE`` = next-token cross-entropy, ``w`` = ``retain_weight``):

    * ``graddiff``: ``-CE(forget) + w CE(retain)``. Divergence guard: on a step whose ``CE(forget)`` exceeds
      ``max_forget_ce`` the forget term is dropped (only the retain term trains), so gradient ascent stops at the
      ceiling instead of driving the CE to infinity while training goes on; AdamW's momentum still carries the
      weights a few steps past it. ``train/guard_active`` logs 1 on such steps.
    * ``maxent``: ``KL(uniform || p)(forget) + w CE(retain)``.
    * ``rmu``: ``mean (h_k(forget) - c u)^2 + w mean (h_k(retain) - h_k^frozen(retain))^2`` with ``h_k`` the
      output of decoder block ``k = rmu_layer`` (0-based, taken by a forward hook; the reference's
      ``hidden_states[E]`` is block ``E - 1``, docs/reference.md §5.4) and ``u`` a seeded random unit vector. Only the
      parameters matching ``rmu_params`` train. With ``w > 0`` a frozen copy of the starting model (``eval()``,
      no gradients, never in checkpoints) gives the retain target; ``w = 0`` is the reference's arithmetic and
      language setting and builds no copy.
    * ``retain_loss="kl"`` (GradDiff, MaxEnt) replaces ``CE(retain)`` by the forward KL from the frozen starting model
      to the trained one on the retain batch, ``KL(p_frozen || p)`` per position averaged over scored positions (the
      reference's WMDP retain term, docs/reference.md §11.2; computed in float32 chunks of ``kl_chunk_size`` positions).
      The frozen copy is built as for RMU (``eval()``, no gradients, never in checkpoints).
    * ``convex=True`` weighs the two terms ``(1 - w) L_forget + w L_retain`` with ``0 < w < 1`` (the reference's WMDP
      weighting, docs/reference.md §11.2) instead of ``L_forget + w L_retain``; with RepNoise the forget part
      includes it: ``(1 - w)(L_forget + RepNoise) + w L_retain``.
    * ``repnoise=True`` adds RepNoise to any method: ``CE(retain) + beta N - alpha log H`` with ``N`` the MMD
      between every block's MLP output on forget inputs and Gaussian noise, ``H`` the forget CE of the logit lens
      of the embeddings and every block output, plus 1 (docs/reference.md §5.5).
    * ``sam_rho > 0`` takes sharpness-aware steps: gradient ``g`` at ``θ``, ``ε = ρ g / ||g||``, the full loss
      again at ``θ + ε``, ``θ`` restored exactly from a copy, clip, optimizer and scheduler step
      (docs/reference.md §5.6).
      SAM optimizes manually, so it clips with ``sam_clip_val`` and rejects ``Trainer(gradient_clip_val)`` and
      ``accumulate_grad_batches > 1``.

    Losses are computed in float32 (also under ``bf16-mixed``). A non-finite loss raises ``FloatingPointError``
    before any update, so no NaN weights are ever written. Logged: ``train/loss``, ``train/forget_loss`` (forget
    CE for GradDiff, the KL for MaxEnt, the MSE for RMU), ``train/retain_loss`` (retain CE, or the RMU retain MSE),
    RepNoise terms, and the shared validation metrics. ``tokens`` counts the forget and retain tokens the trained
    model processed; FLOPs are ``6 N`` per token (twice with SAM) plus ``2 N`` per token of frozen-copy forwards.

    Hooks implemented: ``configure_model`` (loads the model, freezes for RMU, builds the frozen copy, registers the
    hooks), ``training_step``, ``configure_callbacks`` (rejects settings SAM cannot honour), ``teardown`` (removes
    the hooks), ``on_save_checkpoint`` / ``on_load_checkpoint`` (drop the frozen copy, keep counters).

    Args:
        model: the model to unlearn: a folder written by ``save_pretrained`` (the reference stage's ``hf/``), a
            preset or a hub id.
        method: ``graddiff``, ``maxent`` or ``rmu``.
        retain_weight: weight ``w`` of the retain term (reference: GradDiff 15 arithmetic / 1 language, MaxEnt 1,
            RMU off; WMDP, convex: MaxEnt 0.2 cyber / 0.3 bio, RMU 0.5). RMU with 0 skips the retain batch.
        retain_loss: the retain term of GradDiff and MaxEnt: ``ce`` (next-token CE) or ``kl`` (forward KL from the
            frozen starting model, the reference's WMDP setting). RMU's retain term is always its MSE.
        convex: weigh the terms ``(1 - w)`` / ``w`` (WMDP, docs/reference.md §11.2) instead of ``1`` / ``w``; ``0<w<1``.
        kl_chunk_size: positions per float32 chunk of the ``kl`` retain term; ``None``: 64 MiB per chunk
            (:func:`~undo_lightning.losses.auto_chunk_size`).
        max_forget_ce: GradDiff divergence guard (see above); ``None`` turns it off.
        rmu_layer: 0-based decoder block whose output RMU steers.
        rmu_train_layers: blocks whose ``rmu_params`` train, each ``<= rmu_layer`` (later blocks cannot change
            the RMU loss); default the original RMU recipe ``rmu_layer - 2 .. rmu_layer``.
        rmu_params: ``fnmatch`` patterns of the parameter names (as in ``model.named_parameters()`` of the HF
            model) that RMU trains; ``{i}`` is replaced by each of ``rmu_train_layers``. Default
            ``["model.layers.{i}.mlp.down_proj.weight"]`` (docs/reference.md §5.4). Each pattern must match a parameter.
        rmu_coefficient: norm ``c`` of the RMU control vector (reference: 6 arithmetic, 6.5 language).
        repnoise: add the RepNoise loss.
        repnoise_alpha: weight of RepNoise's ``-log H`` term.
        repnoise_beta: weight of RepNoise's noise (MMD) term.
        sam_rho: SAM neighbourhood radius ``ρ`` (0 = plain steps; the reference's default when on is 0.05).
        sam_clip_val: global gradient-norm clip of the SAM step (0 = no clipping).
        lr: learning rate (the reference uses a constant LR, no warm-up, no weight decay, docs/reference.md §5.1).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        schedule: ``constant`` (the reference's) or ``cosine``.
        min_lr_ratio: final LR fraction of the cosine schedule.
        seed: seed of the RMU control vector, the RepNoise noise, and of a preset's initialisation.
        checkpoint_every: save ``checkpoints/last.ckpt`` every this many steps (0 = only at the end).
        export: write ``hf/`` and ``metrics.json`` when training ends.
    """

    train_data = "paired"

    def __init__(
        self,
        model: str = "runs/arithmetic/reference/hf",
        method: Literal["graddiff", "maxent", "rmu"] = "maxent",
        retain_weight: float = 1.0,
        retain_loss: Literal["ce", "kl"] = "ce",
        convex: bool = False,
        kl_chunk_size: int | None = None,
        max_forget_ce: float | None = None,
        rmu_layer: int = 1,
        rmu_train_layers: list[int] | None = None,
        rmu_params: list[str] | None = None,
        rmu_coefficient: float = 6.0,
        repnoise: bool = False,
        repnoise_alpha: float = 1.0,
        repnoise_beta: float = 1e-3,
        sam_rho: float = 0.0,
        sam_clip_val: float = 1.0,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        schedule: Literal["cosine", "constant"] = "constant",
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        checkpoint_every: int = 0,
        export: bool = True,
    ) -> None:
        super().__init__(model=model, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         schedule=schedule, min_lr_ratio=min_lr_ratio, seed=seed, checkpoint_every=checkpoint_every,
                         export=export)
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {METHODS}")
        for name, value in (("retain_weight", retain_weight), ("repnoise_alpha", repnoise_alpha),
                            ("repnoise_beta", repnoise_beta), ("sam_rho", sam_rho), ("sam_clip_val", sam_clip_val)):
            if value < 0:
                raise ValueError(f"{name}={value}: expected a value >= 0")
        if retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss={retain_loss!r}: expected one of {RETAIN_LOSSES}")
        if retain_loss == "kl" and method == "rmu":
            raise ValueError("retain_loss='kl' with method='rmu': RMU's retain term is the MSE between the trained and "
                             "the frozen model's block output; use retain_loss='ce' (ignored by RMU)")
        if convex and not 0 < retain_weight < 1:
            raise ValueError(f"convex=True with retain_weight={retain_weight}: the convex weights (1 - w, w) need "
                             "0 < w < 1")
        if kl_chunk_size is not None and kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size={kl_chunk_size}: expected a positive integer, or null (chosen from the "
                             "vocabulary size)")
        if max_forget_ce is not None and max_forget_ce <= 0:
            raise ValueError(f"max_forget_ce={max_forget_ce}: expected a positive CE ceiling, or None for no guard")
        if rmu_coefficient <= 0:
            raise ValueError(f"rmu_coefficient={rmu_coefficient}: expected a positive norm")
        if rmu_layer < 0:
            raise ValueError(f"rmu_layer={rmu_layer}: expected a 0-based decoder block index >= 0")
        if rmu_train_layers is None:
            rmu_train_layers = list(range(max(0, rmu_layer - 2), rmu_layer + 1))
        if not rmu_train_layers or any(i < 0 or i > rmu_layer for i in rmu_train_layers):
            raise ValueError(f"rmu_train_layers={rmu_train_layers}: expected a non-empty list of blocks in "
                             f"0..rmu_layer={rmu_layer} (later blocks cannot change the RMU loss)")
        self.method = method
        self.rmu_train_layers = sorted(set(rmu_train_layers))
        self.rmu_params = list(rmu_params) if rmu_params is not None else ["model.layers.{i}.mlp.down_proj.weight"]
        if not self.rmu_params:
            raise ValueError("rmu_params=[]: expected at least one parameter-name pattern")
        # A frozen copy of the starting model gives RMU's retain target and the KL retain term's teacher.
        self.uses_frozen = (method == "rmu" and retain_weight > 0) or retain_loss == "kl"
        self.uses_retain = method != "rmu" or repnoise or self.uses_frozen  # RMU alone may ignore the retain batch
        # The frozen copy is rebuilt from `model` in configure_model and never saved, so checkpoints lack its keys.
        self.strict_loading = not self.uses_frozen
        self.automatic_optimization = sam_rho == 0
        self.frozen: nn.Module | None = None
        self._block: _Recorder | None = None  # RMU target block of the trained model
        self._frozen_block: _Recorder | None = None
        self._mlps: _Recorder | None = None  # RepNoise: every block's MLP output
        self._hooked = False
        self._control: torch.Tensor | None = None
        self._noise: torch.Generator | None = None
        self._noise_state: torch.Tensor | None = None  # restored from a checkpoint before the generator exists

    # ------------------------------------------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        if self.model is None:
            super().configure_model()
            if self.method == "rmu":
                self._check_rmu_layers(self.model)
                self._select_rmu_parameters()
        if self.uses_frozen and self.frozen is None:
            self.frozen = self.build(self.model_name).eval().requires_grad_(False)
        if not self._hooked:
            self._register_hooks()

    def _check_rmu_layers(self, model: nn.Module) -> None:
        n = len(decoder_layers(model)[1])
        bad = [i for i in [self.hparams.rmu_layer, *self.rmu_train_layers] if i >= n]
        if bad:
            raise ValueError(f"rmu_layer={self.hparams.rmu_layer}, rmu_train_layers={self.rmu_train_layers}: block "
                             f"index {bad[0]} is out of range; model={self.model_name!r} has {n} decoder layers "
                             f"(0..{n - 1})")

    def rmu_parameter_names(self) -> list[str]:
        """Names of the parameters RMU trains (``rmu_params`` expanded over ``rmu_train_layers``)."""
        names = [name for name, _ in self.model.named_parameters()]
        patterns = [p.replace("{i}", str(i)) for p in self.rmu_params
                    for i in (self.rmu_train_layers if "{i}" in p else [None])]
        selected = set()
        for pattern in patterns:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"rmu_params pattern {pattern!r} matches no parameter of model={self.model_name!r}; "
                                 f"its parameters are named like {names[:3] + names[-3:]}")
            selected.update(matched)
        return [n for n in names if n in selected]

    def _select_rmu_parameters(self) -> None:
        trained = set(self.rmu_parameter_names())
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)

    def _register_hooks(self) -> None:
        path, layers = decoder_layers(self.model)
        if self.method == "rmu":
            name = f"{path}.{self.hparams.rmu_layer}"
            self._block = _Recorder({"block": self.model.get_submodule(name)})
            if self.frozen is not None:
                self._frozen_block = _Recorder({"block": self.frozen.get_submodule(name)})
        if self.hparams.repnoise:
            missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
            if missing or not isinstance(getattr(self.model.base_model, "norm", None), nn.Module):
                raise ValueError(f"repnoise=True needs decoder blocks with an `.mlp` and a final `.norm` "
                                 f"({type(self.model).__name__} lacks them)")
            self._mlps = _Recorder({f"{path}.{i}.mlp": layer.mlp for i, layer in enumerate(layers)})
        self._hooked = True

    def teardown(self, stage: str) -> None:
        for recorder in (self._block, self._frozen_block, self._mlps):
            if recorder is not None:
                recorder.remove()
        self._block = self._frozen_block = self._mlps = None
        self._hooked = False

    def configure_callbacks(self):
        # Runs before Lightning validates the loop configuration, so SAM's limits are reported in its own terms.
        trainer = self.trainer
        if self.hparams.sam_rho > 0:
            if trainer.accumulate_grad_batches != 1:
                raise ValueError(f"sam_rho={self.hparams.sam_rho} with accumulate_grad_batches="
                                 f"{trainer.accumulate_grad_batches}: SAM perturbs with the gradient of one batch "
                                 "(the authors' code silently dropped the accumulated ones); use 1 and a "
                                 "larger batch_size")
            if trainer.gradient_clip_val:
                raise ValueError(f"sam_rho={self.hparams.sam_rho} with Trainer(gradient_clip_val="
                                 f"{trainer.gradient_clip_val}): SAM steps manually; remove the Trainer setting and "
                                 "set the module's sam_clip_val instead")
        return super().configure_callbacks()

    def on_train_start(self) -> None:
        if self.frozen is not None:
            self.frozen.eval()  # stays in eval whatever mode Lightning restores for the trained model

    # ------------------------------------------------------------------------------------------------ losses
    def control_vector(self) -> torch.Tensor:
        """RMU target ``c u`` ``[H]`` (seeded by ``seed``)."""
        if self._control is None:
            self._control = rmu_control_vector(self.model.config.hidden_size, self.hparams.rmu_coefficient,
                                               self.hparams.seed)
        return self._control.to(self.device)

    def _noise_generator(self) -> torch.Generator:
        if self._noise is None:
            self._noise = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
            if self._noise_state is not None:
                self._noise.set_state(self._noise_state)
        return self._noise

    def _logit_lens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits read off an intermediate hidden state exactly like the final ones: final norm once, LM head,
        soft-capping when the model has it (the authors' code normed twice and skipped the cap)."""
        logits = self.model.get_output_embeddings()(self.model.base_model.norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

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
        hp, method = self.hparams, self.method
        mask_f = forget["attention_mask"]
        terms: dict[str, torch.Tensor] = {}
        # --- forget pass (RMU without RepNoise needs no logits: the LM head is skipped)
        with _record([self._block if method == "rmu" else None, self._mlps]) as (block, mlps):
            if method == "rmu" and not hp.repnoise:
                self.model.base_model(input_ids=forget["input_ids"], attention_mask=mask_f)
                out = None
            else:
                out = self.model(input_ids=forget["input_ids"], attention_mask=mask_f,
                                 output_hidden_states=hp.repnoise)
        if method == "graddiff":
            terms["forget_loss"] = causal_lm_loss(out.logits, forget["labels"])
        elif method == "maxent":
            terms["forget_loss"] = maxent_loss(out.logits, forget["labels"])
        else:
            terms["forget_loss"] = rmu_forget_loss(block["block"], self.control_vector(), mask_f)
        # --- retain pass: CE or KL for GradDiff/MaxEnt (CE also for RepNoise), the target block's output for RMU
        retain_ce = None
        if self.uses_retain:
            with _record([self._block if method == "rmu" and self.uses_frozen else None]) as (block,):
                if method == "rmu" and not hp.repnoise:
                    self.model.base_model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"])
                else:
                    logits = self.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
                    if hp.retain_loss == "ce" or hp.repnoise:
                        retain_ce = causal_lm_loss(logits, retain["labels"])
            if method == "rmu" and self.uses_frozen:
                terms["retain_loss"] = rmu_retain_loss(block["block"], self._frozen_block_output(retain),
                                                       retain["attention_mask"])
            elif hp.retain_loss == "kl":
                terms["retain_loss"] = forward_kl(logits, self._frozen_logits(retain), retain["labels"],
                                                  chunk_size=hp.kl_chunk_size)
            else:
                terms["retain_loss"] = retain_ce
        # --- the method's objective: forget part (with RepNoise) and retain part, weighted 1/w or convex (1-w)/w
        w = hp.retain_weight
        forget_part = -terms["forget_loss"] if method == "graddiff" else terms["forget_loss"]
        if method == "graddiff" and hp.max_forget_ce is not None:
            # torch.where instead of a Python branch: no host sync, and every parameter stays in the graph (DDP)
            active = terms["forget_loss"].detach() > hp.max_forget_ce
            forget_part = torch.where(active, torch.zeros_like(forget_part), forget_part)
            terms["guard_active"] = active.float()
        if hp.repnoise:
            lens = [self._logit_lens(h) for h in out.hidden_states[:-1]]  # embeddings and blocks 0..L-2
            rep = repnoise_loss(list(mlps.values()), lens + [out.logits], forget["labels"],
                                self._noise_generator(), alpha=hp.repnoise_alpha, beta=hp.repnoise_beta, mask=mask_f)
            forget_part = forget_part + retain_ce + rep.loss  # docs/reference.md §5.5: RepNoise joins the method's loss
            terms.update(repnoise_noise=rep.noise, repnoise_harmful=rep.harmful)
        if method == "rmu" and not self.uses_frozen:  # the reference's RMU without a retain term (w = 0)
            loss = forget_part
        elif hp.convex:
            loss = (1.0 - w) * forget_part + w * terms["retain_loss"]
        else:
            loss = forget_part + w * terms["retain_loss"]
        terms["loss"] = loss
        return terms

    def _count_frozen(self, batch: dict) -> None:
        self.count_tokens(batch, counter="frozen_tokens")

    @property
    def frozen_tokens_seen(self) -> int:
        """Tokens the frozen copy has run forward on (2N FLOPs each)."""
        return self.counted("frozen_tokens")

    @torch.no_grad()
    def _frozen_block_output(self, batch: dict) -> torch.Tensor:
        with _record([self._frozen_block]) as (block,):
            self.frozen.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        self._count_frozen(batch)
        return block["block"]

    @torch.no_grad()
    def _frozen_logits(self, batch: dict) -> torch.Tensor:
        """The frozen starting model's logits ``[B, T, V]`` (the KL retain term's target)."""
        logits = self.frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
        self._count_frozen(batch)
        return logits

    def _check_finite(self, terms: dict[str, torch.Tensor], what: str) -> None:
        if not torch.isfinite(terms["loss"]):
            values = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(
                f"method={self.method}: non-finite {what} at step {self.global_step} ({values}); stopping before "
                "the update so no NaN weights are written. Lower lr" +
                (", or set max_forget_ce (GradDiff divergence guard)" if self.method == "graddiff" else ""))

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
            scale = self.hparams.sam_rho / (norm + 1e-12)
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
        if self.hparams.sam_clip_val > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.sam_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

    # -------------------------------------------------------------------------------------- accounting, state
    def compute_summary(self) -> dict[str, float]:
        n = count_parameters(self.model)
        passes = 1 if self.automatic_optimization else 2  # SAM: forward + backward at θ and at θ + ε
        flops = self.tokens_seen * 6 * n * passes + self.frozen_tokens_seen * 2 * n
        return {"tokens": self.tokens_seen, "frozen_tokens": self.frozen_tokens_seen, "flops": flops}

    def summary(self) -> dict:
        hp = self.hparams
        method = {"retain_weight": hp.retain_weight, "convex": hp.convex}
        if self.method != "rmu":
            method["retain_loss"] = hp.retain_loss
        if self.method == "graddiff":
            method["max_forget_ce"] = hp.max_forget_ce
        if self.method == "rmu":
            method.update(rmu_layer=hp.rmu_layer, rmu_train_layers=self.rmu_train_layers,
                          rmu_params=self.rmu_parameter_names(), rmu_coefficient=hp.rmu_coefficient)
        if hp.repnoise:
            method.update(repnoise_alpha=hp.repnoise_alpha, repnoise_beta=hp.repnoise_beta)
        if hp.sam_rho > 0:
            method.update(sam_rho=hp.sam_rho, sam_clip_val=hp.sam_clip_val)
        return {**super().summary(), "method": self.method, "repnoise": hp.repnoise, "sam": hp.sam_rho > 0,
                "method_hparams": method, "lr": hp.lr,
                "trainable_parameters": count_parameters(self.model, trainable_only=True)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        for key in [k for k in checkpoint["state_dict"] if k.startswith("frozen.")]:
            del checkpoint["state_dict"][key]
        if self._noise is not None:
            checkpoint["undo_state"]["repnoise_generator"] = self._noise.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("undo_state", {})
        self._noise_state = state.get("repnoise_generator")
