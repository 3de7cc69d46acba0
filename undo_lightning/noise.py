"""Shrink-and-perturb: the "Noise" step of UNDO, applied once to the student before distillation (docs/reference.md §6).

``theta <- (1 - alpha) * theta + alpha * beta * N``: ``N`` is Xavier-uniform noise for 2-D parameters and 0 for 1-D
ones (norm weights are only shrunk). Unlike the reference ``do_corruption``, the noise comes from a dedicated
generator seeded by the caller, so the result depends on nothing but the model, the arguments and the seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

ParamFilter = Callable[[str, torch.Tensor], bool]


def _check_unit_interval(name: str, value: float) -> None:
    # `not (0 <= v <= 1)` also rejects NaN.
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _selected_parameters(model: nn.Module, include: str | ParamFilter | None,
                         mask: dict[str, torch.Tensor] | None) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """Parameters to touch, each once, in ``named_parameters`` order, with their mask; validates everything first.

    Tied parameters (one tensor under several names, e.g. a tied embedding / LM head) are grouped by identity:
    ``include`` and ``mask`` may refer to any of the names, and the tensor is listed once, under its first name.
    """
    aliases: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        params[id(param)] = param
    if include is None:
        def keep(name, param):
            return True
    elif isinstance(include, str):
        pattern = re.compile(include)

        def keep(name, param):
            return pattern.search(name) is not None
    else:
        keep = include

    mask = dict(mask or {})
    known = {name for names in aliases.values() for name in names}
    unknown = sorted(set(mask) - known)
    if unknown:
        raise ValueError(f"mask names parameters the model does not have: {unknown}")

    selected = []
    for key, names in aliases.items():  # dicts keep insertion order, i.e. named_parameters order
        param = params[key]
        masks = [mask[name] for name in names if name in mask]
        if len(masks) > 1:
            raise ValueError(f"mask gives several entries for the tied parameter {names}; give one")
        if not any(keep(name, param) for name in names):
            continue
        if param.dim() not in (1, 2):
            raise ValueError(f"shrink_and_perturb supports 1-D and 2-D parameters only; {names[0]!r} has shape "
                             f"{tuple(param.shape)} (exclude it with `include`)")
        entry_mask = masks[0] if masks else None
        if entry_mask is not None and entry_mask.shape != param.shape:
            raise ValueError(f"mask for {names[0]!r} has shape {tuple(entry_mask.shape)}, parameter has "
                             f"{tuple(param.shape)}")
        selected.append((names[0], param, entry_mask))
    return selected


@torch.no_grad()
def shrink_and_perturb(model: nn.Module, alpha: float, beta: float, seed: int,
                       include: str | ParamFilter | None = None,
                       mask: dict[str, torch.Tensor] | None = None) -> dict:
    """Shrink every selected parameter towards 0 and add Xavier-uniform noise, in place (docs/reference.md §6).

    For each selected parameter ``theta``:

    * 2-D (``[fan_out, fan_in]``, Linear weights and embeddings): ``theta <- (1 - alpha) theta + alpha beta N``,
      ``N ~ U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))`` with ``fan_in = shape[1]``, ``fan_out = shape[0]`` of
      the full tensor (so apply this before any sharding);
    * 1-D (norm weights, biases): ``theta <- (1 - alpha) theta`` (``N = 0``, as in the reference). Gemma's RMSNorm
      scales by ``1 + w``, so shrinking ``w`` moves the scale towards 1;
    * any other rank raises ``ValueError`` (exclude such parameters with ``include``).

    ``N`` is drawn in float32 on CPU from ``torch.Generator().manual_seed(seed)``, one draw of the full shape per
    selected 2-D parameter in ``named_parameters`` order, then cast to the parameter's dtype and device; the result
    depends neither on the device nor on the global RNG. It does depend on which parameters are selected, since
    they share one generator stream. Tied parameters are updated once. ``requires_grad`` is ignored, so a frozen
    copy of a teacher can be noised directly. All checks run before any parameter is modified.

    Args:
        model: module whose parameters are modified in place.
        alpha: shrink/noise mix in ``[0, 1]``; 0 leaves the model unchanged, 1 replaces it by ``beta * N``.
        beta: noise scale in ``[0, 1]``; 0 gives a pure shrink.
        seed: seed of the dedicated noise generator.
        include: which parameters to touch: a regex searched in the parameter name (``re.search``) or a predicate
            ``(name, param) -> bool``; a tied parameter is selected if any of its names is. ``None`` = all.
        mask: optional ``{name: tensor}`` with a tensor of the parameter's shape: bool (update only True entries) or
            float ``m`` (``theta <- theta + m * (update - theta)``, a per-entry blend). Parameters without an entry
            are updated everywhere.

    Returns:
        ``{"tensors_noised": 2-D tensors updated, "tensors_shrunk": 1-D tensors updated, "elements_updated": entries
        changed (nonzero mask entries), "elements_total": entries in the model (tied counted once),
        "fraction_updated": elements_updated / elements_total}``.
    """
    _check_unit_interval("alpha", alpha)
    _check_unit_interval("beta", beta)
    selected = _selected_parameters(model, include, mask)
    generator = torch.Generator().manual_seed(seed)
    summary = {"tensors_noised": 0, "tensors_shrunk": 0, "elements_updated": 0}
    for _, param, entry_mask in selected:
        # Mix in fp32 and round once, so bf16 weights are not rounded twice.
        updated = (1.0 - alpha) * param.float()
        if param.dim() == 2:
            fan_out, fan_in = param.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            noise = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            updated += (alpha * beta) * noise.to(param.device)
            summary["tensors_noised"] += 1
        else:
            summary["tensors_shrunk"] += 1
        if entry_mask is None:
            summary["elements_updated"] += param.numel()
        else:
            entry_mask = entry_mask.to(param.device)
            summary["elements_updated"] += int(entry_mask.count_nonzero())
            if entry_mask.dtype == torch.bool:
                updated = torch.where(entry_mask, updated, param.float())
            else:
                updated = param.float() + entry_mask.float() * (updated - param.float())
        param.copy_(updated)
    summary["elements_total"] = sum(p.numel() for p in model.parameters())  # parameters() dedupes tied tensors
    summary["fraction_updated"] = summary["elements_updated"] / max(summary["elements_total"], 1)
    return summary
