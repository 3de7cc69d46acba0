"""Unlearning methods: the objective :class:`~undo_lightning.modules.UnlearnModule` minimises on a paired
forget/retain batch (docs/reference.md §5).

A method is a small object chosen in a config by ``class_path`` (or by name: ``graddiff``, ``maxent``, ``npo``,
``simnpo``, ``rmu``)::

    model:
      class_path: undo_lightning.UnlearnModule
      init_args:
        method: {class_path: undo_lightning.RMU, init_args: {layer: 1, coefficient: 6.0, retain_weight: 10.0}}
        repnoise: {alpha: 1.0, beta: 0.001}       # optional, combines with any method
        sam: {rho: 0.05}                          # optional, combines with any method

Each method names its forget term and its retain term; :class:`UnlearningMethod` combines them as
``L_forget + w L_retain`` (or ``(1 - w) L_forget + w L_retain`` with ``convex``). The module runs the forward passes
the terms need and owns the models; a method only reads their outputs.
"""

from __future__ import annotations

import fnmatch
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from undo_lightning.io import check_choice
from undo_lightning.losses import (
    causal_lm_loss,
    check_preference_settings,
    forward_kl,
    maxent_loss,
    npo_loss,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_nll,
    simnpo_loss,
)

RetainTerm = Literal["ce", "kl"]
#: runs the frozen starting copy on the batch at hand: ``(output or None, outputs its hooks recorded)``
FrozenPass = Callable[[], tuple[Any, dict[str, torch.Tensor]]]

#: batch key the unlearning stage sets to its :meth:`~undo_lightning.modules.base.UndoModule.token_divisor`: token-level
#: terms divide their sums by it (absent outside a trainer: the batch's own token mean)
DIVISOR = "loss_divisor"


# ------------------------------------------------------------------------------------------------------ recording
class Recorder:
    """Forward hooks, registered once, that keep the outputs of some modules while a ``record()`` block is open.

    Registering once and removing in ``remove()`` avoids the authors' leak, which added a hook per step
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
def record(recorders: list[Recorder | None]):
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


# -------------------------------------------------------------------------------------------------------- methods
class UnlearningMethod:
    """The shared part of every method: the retain term and how it is weighed against the forget term.

    Args:
        retain_weight: weight ``w`` of the retain term.
        convex: weigh the terms ``(1 - w)`` / ``w`` (the authors' WMDP weighting, docs/reference.md §11.2) instead of
            ``1`` / ``w``; needs ``0 < w < 1``.
    """

    #: the name recorded in ``metrics.json`` (and accepted as a shorthand by ``UnlearnModule(method=...)``)
    name: ClassVar[str] = ""
    #: the forget and retain passes need the LM head (RMU without RepNoise does not)
    needs_logits: ClassVar[bool] = True

    def __init__(self, retain_weight: float = 1.0, convex: bool = False) -> None:
        if not retain_weight >= 0:
            raise ValueError(f"retain_weight={retain_weight}: expected a value >= 0")
        if convex and not 0 < retain_weight < 1:
            raise ValueError(f"convex=True with retain_weight={retain_weight}: the convex weights (1 - w, w) need "
                             "0 < w < 1")
        self.retain_weight, self.convex = retain_weight, convex

    @property
    def needs_frozen(self) -> bool:
        """Whether a frozen copy of the starting model gives the retain term's target."""
        return False

    @property
    def has_retain_term(self) -> bool:
        """Whether the objective has a retain term at all (RMU with ``w = 0`` has none)."""
        return True

    @property
    def uses_retain_ce(self) -> bool:
        """Whether the retain term is the retain CE (the module computes the CE only when something reads it)."""
        return False

    #: forward hooks on the trained / frozen model whose outputs the terms read (RMU: the steered block)
    recorder: Recorder | None = None
    frozen_recorder: Recorder | None = None

    def attach(self, model: nn.Module, frozen: nn.Module | None, seed: int) -> None:
        """Called once the models exist (before any wrapping): select trainable parameters, register hooks.

        Args:
            model: the trained model.
            frozen: the frozen starting copy (when :attr:`needs_frozen`).
            seed: the module's seed, for a method's own random draws.
        """

    def detach(self) -> None:
        """Removes whatever :meth:`attach` registered."""

    def forget_loss(self, out, recorded: dict[str, torch.Tensor], forget: dict, frozen: FrozenPass) -> torch.Tensor:
        """The forget term from the forget pass (``out``: :class:`~undo_lightning.losses.HiddenStates` or ``None``
        when the method needs no logits; ``recorded``: hooked outputs; ``frozen()`` runs the frozen copy on the same
        batch, for methods that compare with it)."""
        raise NotImplementedError

    def retain_term(self, out, recorded: dict[str, torch.Tensor], retain: dict, retain_ce: torch.Tensor | None,
                    frozen: FrozenPass) -> torch.Tensor | None:
        """The retain term from the retain pass (as :meth:`forget_loss`); ``retain_ce`` is the retain CE where the
        pass ran the LM head, and ``frozen()`` runs the frozen copy on the same batch (``(output, recorded)``)."""
        raise NotImplementedError

    def forget_objective(self, forget_loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the objective adds for the forget term (GradDiff: its negative); may log extra ``terms``."""
        return forget_loss

    def combine(self, forget_part: torch.Tensor, retain_loss: torch.Tensor | None) -> torch.Tensor:
        """``forget_part + w retain`` or, with ``convex``, ``(1 - w) forget_part + w retain``."""
        if not self.has_retain_term:
            return forget_part
        w = self.retain_weight
        return (1.0 - w) * forget_part + w * retain_loss if self.convex else forget_part + w * retain_loss

    def config(self) -> dict[str, Any]:
        """The method's settings for ``metrics.json``."""
        return {"retain_weight": self.retain_weight, "convex": self.convex}


class _LogitMethod(UnlearningMethod):
    """A method whose forget term reads the logits, with a CE or forward-KL retain term.

    Args:
        retain_weight: weight ``w`` of the retain term.
        retain_loss: ``ce`` (next-token CE on the retain batch) or ``kl`` (forward KL from the frozen starting model
            to the trained one per scored position, the authors' WMDP retain term, docs/reference.md §11.2; computed in
            float32 chunks of ``kl_chunk_size`` positions).
        convex: weigh the terms ``(1 - w)`` / ``w`` instead of ``1`` / ``w``; needs ``0 < w < 1``.
        kl_chunk_size: positions per float32 chunk of the ``kl`` retain term; ``None``: 64 MiB per chunk
            (:func:`~undo_lightning.losses.auto_chunk_size`).
    """

    def __init__(self, retain_weight: float = 1.0, retain_loss: RetainTerm = "ce", convex: bool = False,
                 kl_chunk_size: int | None = None) -> None:
        super().__init__(retain_weight, convex)
        check_choice("retain_loss", retain_loss, RetainTerm)
        if kl_chunk_size is not None and kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size={kl_chunk_size}: expected a positive integer, or null (chosen from the "
                             "vocabulary size)")
        self.retain_loss, self.kl_chunk_size = retain_loss, kl_chunk_size

    @property
    def needs_frozen(self) -> bool:
        return self.retain_loss == "kl"

    @property
    def uses_retain_ce(self) -> bool:
        return self.retain_loss == "ce"

    def retain_term(self, out, recorded: dict[str, torch.Tensor], retain: dict, retain_ce: torch.Tensor | None,
                    frozen: FrozenPass) -> torch.Tensor:
        """The retain CE, or ``KL(p_frozen || p)`` per scored position (``frozen()`` runs the frozen copy)."""
        if self.retain_loss == "ce":
            return retain_ce
        return forward_kl(out, frozen()[0], retain["labels"], chunk_size=self.kl_chunk_size,
                          divisor=retain.get(DIVISOR))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "retain_loss": self.retain_loss}


class GradDiff(_LogitMethod):
    """Gradient difference: ``-CE(forget) + w L_retain`` (docs/reference.md §5.2).

    Divergence guard: on a step whose ``CE(forget)`` exceeds ``max_forget_ce`` the forget term is dropped (only the
    retain term trains), so gradient ascent stops at the ceiling instead of driving the CE to infinity while training
    goes on; AdamW's momentum still carries the weights a few steps past it. ``train/guard_active`` logs 1 on such
    steps.

    Args:
        retain_weight: weight ``w`` of the retain term (the authors: 15 arithmetic, 1 language).
        retain_loss: ``ce`` or ``kl`` (see :class:`MaxEnt`).
        convex: weigh the terms ``(1 - w)`` / ``w``; needs ``0 < w < 1``.
        kl_chunk_size: positions per float32 chunk of the ``kl`` retain term (``None``: 64 MiB per chunk).
        max_forget_ce: the divergence guard's CE ceiling; ``None`` turns it off.
    """

    name = "graddiff"

    def __init__(self, retain_weight: float = 1.0, retain_loss: RetainTerm = "ce", convex: bool = False,
                 kl_chunk_size: int | None = None, max_forget_ce: float | None = None) -> None:
        super().__init__(retain_weight, retain_loss, convex, kl_chunk_size)
        if max_forget_ce is not None and max_forget_ce <= 0:
            raise ValueError(f"max_forget_ce={max_forget_ce}: expected a positive CE ceiling, or None for no guard")
        self.max_forget_ce = max_forget_ce

    def forget_loss(self, out, recorded: dict[str, torch.Tensor], forget: dict, frozen: FrozenPass) -> torch.Tensor:
        return causal_lm_loss(out, forget["labels"], divisor=forget.get(DIVISOR))

    def forget_objective(self, forget_loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        part = -forget_loss
        if self.max_forget_ce is not None:
            # torch.where instead of a Python branch: no host sync, and every parameter stays in the graph (DDP)
            active = forget_loss.detach() > self.max_forget_ce
            part = torch.where(active, torch.zeros_like(part), part)
            terms["guard_active"] = active.float()
        return part

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_forget_ce": self.max_forget_ce}


class MaxEnt(_LogitMethod):
    """Maximum entropy: ``KL(uniform || p)(forget) + w L_retain``, the paper's recommended teacher
    (docs/reference.md §5.3).

    Args:
        retain_weight: weight ``w`` of the retain term (the authors: 1; WMDP convex 0.2 cyber / 0.3 bio).
        retain_loss: ``ce`` (next-token CE) or ``kl`` (forward KL from the frozen starting model, the authors' WMDP
            setting).
        convex: weigh the terms ``(1 - w)`` / ``w``; needs ``0 < w < 1``.
        kl_chunk_size: positions per float32 chunk of the ``kl`` retain term (``None``: 64 MiB per chunk).
    """

    name = "maxent"

    def forget_loss(self, out, recorded: dict[str, torch.Tensor], forget: dict, frozen: FrozenPass) -> torch.Tensor:
        return maxent_loss(out, forget["labels"], divisor=forget.get(DIVISOR))


class NPO(_LogitMethod):
    """Negative preference optimisation: ``NPO(forget) + w L_retain`` with the forget sequences as dispreferred
    answers against the frozen starting model (Zhang et al. 2024, arXiv 2404.05868;
    :func:`~undo_lightning.losses.npo_loss`). The forget term is a mean over sequences, per micro-batch.

    Args:
        beta: inverse temperature, > 0 (the NPO paper's 0.1).
        retain_weight: weight ``w`` of the retain term.
        retain_loss: ``ce`` or ``kl`` (see :class:`MaxEnt`).
        convex: weigh the terms ``(1 - w)`` / ``w``; needs ``0 < w < 1``.
        kl_chunk_size: positions per float32 chunk of the ``kl`` retain term (``None``: 64 MiB per chunk).
    """

    name = "npo"

    def __init__(self, beta: float = 0.1, retain_weight: float = 1.0, retain_loss: RetainTerm = "ce",
                 convex: bool = False, kl_chunk_size: int | None = None) -> None:
        super().__init__(retain_weight, retain_loss, convex, kl_chunk_size)
        check_preference_settings("NPO", beta)
        self.beta = beta

    @property
    def needs_frozen(self) -> bool:
        return True  # the reference likelihoods

    def forget_loss(self, out, recorded: dict[str, torch.Tensor], forget: dict, frozen: FrozenPass) -> torch.Tensor:
        reference, _ = frozen()
        return npo_loss(out, forget["labels"], sequence_nll(reference, forget["labels"]), self.beta)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta}


class SimNPO(_LogitMethod):
    """SimNPO: ``SimNPO(forget) + w L_retain``, NPO without a reference model on length-normalised likelihoods with a
    margin (Fan et al. 2024, arXiv 2410.07163; :func:`~undo_lightning.losses.simnpo_loss`).

    Args:
        beta: inverse temperature, > 0.
        gamma: reward margin, >= 0 (the paper's default 0).
        retain_weight: weight ``w`` of the retain term.
        retain_loss: ``ce`` or ``kl`` (see :class:`MaxEnt`).
        convex: weigh the terms ``(1 - w)`` / ``w``; needs ``0 < w < 1``.
        kl_chunk_size: positions per float32 chunk of the ``kl`` retain term (``None``: 64 MiB per chunk).
    """

    name = "simnpo"

    def __init__(self, beta: float = 2.5, gamma: float = 0.0, retain_weight: float = 1.0,
                 retain_loss: RetainTerm = "ce", convex: bool = False, kl_chunk_size: int | None = None) -> None:
        super().__init__(retain_weight, retain_loss, convex, kl_chunk_size)
        check_preference_settings("SimNPO", beta, gamma)
        self.beta, self.gamma = beta, gamma

    def forget_loss(self, out, recorded: dict[str, torch.Tensor], forget: dict, frozen: FrozenPass) -> torch.Tensor:
        return simnpo_loss(out, forget["labels"], self.beta, self.gamma)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta, "gamma": self.gamma}


class RMU(UnlearningMethod):
    """Representation misdirection: ``mean (h_k(forget) - c u)^2 + w mean (h_k(retain) - h_k^frozen(retain))^2``
    (docs/reference.md §5.4).

    ``h_k`` is the output of decoder block ``k = layer`` (0-based, taken by a forward hook; the authors'
    ``hidden_states[E]`` is block ``E - 1``) and ``u`` a seeded random unit vector. Only the parameters matching
    ``params`` train. With ``w > 0`` a frozen copy of the starting model (``eval()``, no gradients, never in
    checkpoints) gives the retain target; ``w = 0`` is the authors' arithmetic and language setting and builds no
    copy.

    Args:
        layer: 0-based decoder block whose output RMU steers.
        train_layers: blocks whose ``params`` train, each ``<= layer`` (later blocks cannot change the loss);
            default the original RMU recipe ``layer - 2 .. layer``.
        params: ``fnmatch`` patterns of the parameter names (as in ``model.named_parameters()`` of the HF model) that
            train; ``{i}`` is replaced by each of ``train_layers``. Default
            ``["model.layers.{i}.mlp.down_proj.weight"]``.
            Each pattern must match a parameter.
        coefficient: norm ``c`` of the control vector (the authors: 6 arithmetic, 6.5 language).
        retain_weight: weight ``w`` of the activation retain term (0: none, no frozen copy).
        convex: weigh the terms ``(1 - w)`` / ``w``; needs ``0 < w < 1``.
        seed: seed of the control vector ``u``; ``None`` takes the module's ``seed``.
    """

    name = "rmu"
    needs_logits = False

    def __init__(self, layer: int = 1, train_layers: list[int] | None = None, params: list[str] | None = None,
                 coefficient: float = 6.0, retain_weight: float = 1.0, convex: bool = False,
                 seed: int | None = None) -> None:
        super().__init__(retain_weight, convex)
        if coefficient <= 0:
            raise ValueError(f"coefficient={coefficient}: expected a positive norm")
        if layer < 0:
            raise ValueError(f"layer={layer}: expected a 0-based decoder block index >= 0")
        train_layers = list(range(max(0, layer - 2), layer + 1)) if train_layers is None else train_layers
        if not train_layers or any(i < 0 or i > layer for i in train_layers):
            raise ValueError(f"train_layers={train_layers}: expected a non-empty list of blocks in 0..layer={layer} "
                             "(later blocks cannot change the RMU loss)")
        params = list(params) if params is not None else ["model.layers.{i}.mlp.down_proj.weight"]
        if not params:
            raise ValueError("params=[]: expected at least one parameter-name pattern")
        self.layer, self.train_layers, self.params = layer, sorted(set(train_layers)), params
        self.coefficient, self.seed = coefficient, seed
        self.control: torch.Tensor | None = None  # the target c u [H], drawn in attach
        self._names: list[str] = []

    @property
    def needs_frozen(self) -> bool:
        return self.retain_weight > 0

    @property
    def has_retain_term(self) -> bool:
        return self.retain_weight > 0

    def check_depth(self, n_layers: int) -> None:
        """Raises if ``layer`` or a ``train_layers`` index is not a block of a model with ``n_layers`` blocks (the
        pipeline calls it with the model's config before anything trains)."""
        bad = [i for i in [self.layer, *self.train_layers] if i >= n_layers]
        if bad:
            raise ValueError(f"RMU layer={self.layer}, train_layers={self.train_layers}: block index {bad[0]} is out "
                             f"of range; the model has {n_layers} decoder layers (0..{n_layers - 1})")

    def attach(self, model: nn.Module, frozen: nn.Module | None, seed: int) -> None:
        path, layers = decoder_layers(model)
        self.check_depth(len(layers))
        self._names = parameter_names(model, self.params, self.train_layers)
        trained = set(self._names)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)
        block = f"{path}.{self.layer}"
        self.recorder = Recorder({"block": model.get_submodule(block)})
        if frozen is not None:
            self.frozen_recorder = Recorder({"block": frozen.get_submodule(block)})
        self.control = rmu_control_vector(model.config.hidden_size, self.coefficient,
                                          seed if self.seed is None else self.seed)

    def detach(self) -> None:
        for recorder in (self.recorder, self.frozen_recorder):
            if recorder is not None:
                recorder.remove()
        self.recorder = self.frozen_recorder = None

    def forget_loss(self, out, recorded: dict[str, torch.Tensor], forget: dict, frozen: FrozenPass) -> torch.Tensor:
        hidden = recorded["block"]
        return rmu_forget_loss(hidden, self.control.to(hidden.device), forget["attention_mask"])

    def retain_term(self, out, recorded: dict[str, torch.Tensor], retain: dict, retain_ce: torch.Tensor | None,
                    frozen: FrozenPass) -> torch.Tensor | None:
        """The activation MSE to the frozen copy's block output (with ``w = 0`` only RepNoise's retain CE)."""
        if not self.has_retain_term:
            return retain_ce
        return rmu_retain_loss(recorded["block"], frozen()[1]["block"], retain["attention_mask"])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layer": self.layer, "train_layers": self.train_layers,
                "params": list(self._names), "coefficient": self.coefficient}


def parameter_names(model: nn.Module, patterns: list[str], layers: list[int]) -> list[str]:
    """Names of ``model``'s parameters matching ``patterns`` (``{i}`` expanded over ``layers``), in model order.

    Raises:
        ValueError: a pattern matches no parameter.
    """
    names = [name for name, _ in model.named_parameters()]
    expanded = [p.replace("{i}", str(i)) for p in patterns for i in (layers if "{i}" in p else [None])]
    selected = set()
    for pattern in expanded:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"RMU params pattern {pattern!r} matches no parameter of the model; its parameters are "
                             f"named like {names[:3] + names[-3:]}")
        selected.update(matched)
    return [n for n in names if n in selected]


METHODS: dict[str, type[UnlearningMethod]] = {cls.name: cls for cls in (GradDiff, MaxEnt, NPO, SimNPO, RMU)}


def resolve_method(method: UnlearningMethod | str) -> UnlearningMethod:
    """``method`` itself, or the default-configured method of that name (see :data:`METHODS`)."""
    if isinstance(method, UnlearningMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)} or an UnlearningMethod "
                         "(e.g. {class_path: undo_lightning.RMU, init_args: {layer: 1}})")
    return METHODS[method]()


# ---------------------------------------------------------------------------------------------- composable options
@dataclass(frozen=True)
class RepNoise:
    """RepNoise, added to any method: ``CE(retain) + beta N - alpha log H`` with ``N`` the MMD between every block's
    MLP output on forget inputs and Gaussian noise and ``H`` the forget CE of the logit lens of the embeddings and
    every block output, plus 1 (docs/reference.md §5.5). The noise is drawn from a generator seeded by the module's
    ``seed`` and saved in checkpoints.

    Args:
        alpha: weight of the ``-log H`` term.
        beta: weight of the noise (MMD) term.
    """

    alpha: float = 1.0
    beta: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"repnoise {name}={getattr(self, name)}: expected a value >= 0")


@dataclass(frozen=True)
class SAM:
    """Sharpness-aware steps, added to any method (docs/reference.md §5.6): gradient ``g`` at ``θ``,
    ``ε = ρ g / ||g||``, the full loss again at ``θ + ε``, ``θ`` restored exactly from a copy, clip, optimizer and
    scheduler step. SAM optimizes manually, so it clips with ``clip_val`` and rejects ``Trainer(gradient_clip_val)``
    and ``accumulate_grad_batches > 1``.

    Args:
        rho: neighbourhood radius ``ρ`` (the authors' default 0.05).
        clip_val: global gradient-norm clip of the step (0 = no clipping).
    """

    rho: float = 0.05
    clip_val: float = 1.0

    def __post_init__(self) -> None:
        if not self.rho > 0 or not self.clip_val >= 0:
            raise ValueError(f"sam rho={self.rho}, clip_val={self.clip_val}: expected rho > 0 and clip_val >= 0")
