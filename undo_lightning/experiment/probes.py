"""Probes of every model beside the relearning attack: weight quantisation and weight-space diagnostics.

* **Quantisation probe.** Each model is evaluated after its Linear weights are quantised (int8 and 4-bit round to
  nearest with per-group scales, :mod:`undo_lightning.quantize`). Quantisation can bring back knowledge that
  gradient-ascent-style unlearning only pushed slightly away (Zhang et al., ICLR 2025, arXiv 2410.16454): a robust
  model's forget accuracy stays low after it.
* **Weight space.** The L2 distance of each model to the reference (the model before unlearning) and to the teacher,
  and the metrics along the straight line ``(1 - t) θ_teacher + t θ_model`` at a handful of points ``t``: the
  *barrier* is how far the path is worse than the straight line between its two ends. A model close to its starting
  point, or linearly connected to it, tends to relearn fast ("From Dormant to Deleted", arXiv 2505.22310).

Results go to ``<run>/probes/quantize.json`` and ``<run>/probes/weights.json``, one entry per model with the record it
was computed from (the model's stage digest and the probe settings): a re-run recomputes only entries whose record
changed. The report reads these files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from undo_lightning.experiment import reuse
from undo_lightning.io import json_safe, write_json_atomic
from undo_lightning.quantize import check_bits, quantize_model_

log = logging.getLogger(__name__)

PROBES_DIR = "probes"
#: metrics whose barrier along the interpolation path is reported, with "higher is better" for each
BARRIER_METRICS = {"val/forget_ce": False, "val/retain_ce": False, "val/forget_acc": True, "val/retain_acc": True}
#: Trainer settings of a probe's evaluation that the experiment's trainer section may set
_EVAL_TRAINER = ("accelerator", "precision")


def validate_model(model: torch.nn.Module, datamodule, trainer: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The stages' shared validation metrics (``val/*``) of ``model`` on ``datamodule``'s evaluation sets.

    Args:
        model: a causal LM (e.g. quantised or interpolated in memory).
        datamodule: a ``RetainForgetDataModule`` (its tokenizer and validation loaders).
        trainer: Lightning Trainer arguments (``accelerator``, ``precision``); one device, no logger.

    Returns:
        ``{"val/retain_acc": ..., "val/forget_ce": ..., ...}``.
    """
    import lightning as L

    from undo_lightning.modules.base import UndoModule

    module = UndoModule(model="(in memory)", export=False)
    module.model = model  # configure_model keeps a model that is already there
    module.tokenizer = datamodule.tokenizer
    settings = {k: v for k, v in (trainer or {}).items() if k in _EVAL_TRAINER}
    L.Trainer(devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, **settings).validate(module, datamodule=datamodule, verbose=False)
    return {k: v for k, v in module.last_val_metrics.items() if k.startswith("val/")}


# ----------------------------------------------------------------------------------------------------------------------
# weight space


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters, tied weights once (``named_parameters`` deduplicates them)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def same_shapes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two parameter sets have the same names and shapes (only then are distance and paths defined)."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def l2_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float | None:
    """``||θ_a − θ_b||_2`` over all parameters (float64 accumulation); ``None`` when the architectures differ."""
    if not same_shapes(a, b):
        return None
    total = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return math.sqrt(total)


def interpolate_(model: torch.nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 t: float) -> torch.nn.Module:
    """Sets ``model``'s parameters to ``(1 − t) a + t b`` in place (``t = 0``: ``a`` exactly, ``t = 1``: ``b``)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(a[name] if t == 0 else b[name] if t == 1 else torch.lerp(a[name].float(), b[name].float(), t))
    return model


def barrier(ts: Sequence[float], values: Sequence[float], higher_is_better: bool) -> float:
    """How much worse the path is than the straight line between its ends: ``max_t (v_line(t) − v(t))`` for a metric
    where higher is better, ``max_t (v(t) − v_line(t))`` otherwise, ``v_line(t) = (1 − t) v(0) + t v(1)``; 0 when no
    point is worse than the line (the ends always lie on it)."""
    v0, v1 = values[0], values[-1]
    gaps = [((1 - t) * v0 + t * v1 - v) if higher_is_better else (v - (1 - t) * v0 - t * v1)
            for t, v in zip(ts, values)]
    return max(0.0, *gaps)


def interpolation_points(points: int) -> list[float]:
    """``points`` evenly spaced ``t`` in [0, 1], both ends included."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"weights.points={points!r}: expected an integer >= 2 (the two ends and points between)")
    return [i / (points - 1) for i in range(points)]


# ----------------------------------------------------------------------------------------------------------------------
# running the probes over a run folder


def _load(path: str, tokenizer) -> torch.nn.Module:
    from undo_lightning.models import build_model

    return build_model(path, tokenizer).eval()


def _entries(path: Path, records: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The result file's entries that are still valid for ``records`` and the models whose entry must be computed."""
    old = {}
    if path.is_file():
        import json

        with open(path) as f:
            old = json.load(f).get("models", {})
    keep = {name: old[name] for name, record in records.items()
            if name in old and old[name].get("record") == reuse.digest(record)}
    return keep, [name for name in records if name not in keep]


def quantization_probe(out: Path, models: Mapping[str, str], model_ids: Mapping[str, str], datamodule,
                       bits: Sequence[int], group_size: int, method: str = "rtn", include_embeddings: bool = False,
                       trainer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluates every model before and after fake quantisation of its weights; writes ``probes/quantize.json``.

    Args:
        out: run folder.
        models: ``{name: model folder}``.
        model_ids: each model's identity (the pipeline's stage digests): an entry is recomputed when it changes.
        datamodule: the evaluation data.
        bits: weight bits to probe (each 4 or 8).
        group_size: input features per quantisation scale.
        method: ``rtn`` (CPU or GPU) or ``nf4`` (bitsandbytes, CUDA).
        include_embeddings: also quantise the input/output embeddings.
        trainer: Trainer arguments of the evaluations (``accelerator``, ``precision``).

    Returns:
        ``{"settings": {...}, "models": {name: {"record", "full": {metric: v}, "int<b>": {metric: v, "relative_error",
        ...}}}}``.
    """
    for b in bits:
        check_bits(b)
    settings = {"bits": list(bits), "group_size": group_size, "method": method,
                "include_embeddings": include_embeddings}
    records = {name: {"model": model_ids.get(name, path), **settings} for name, path in models.items()}
    path = out / PROBES_DIR / "quantize.json"
    result, todo = _entries(path, records)
    for name in todo:
        entry: dict[str, Any] = {"record": reuse.digest(records[name])}
        entry["full"] = validate_model(_load(models[name], datamodule.tokenizer), datamodule, trainer)
        for b in bits:
            model = _load(models[name], datamodule.tokenizer)
            info = quantize_model_(model, b, group_size, method=method, include_embeddings=include_embeddings)
            entry[f"int{b}"] = {**validate_model(model, datamodule, trainer), "relative_error": info["relative_error"]}
        result[name] = entry
        log.info("quantisation probe %s: forget_acc %s, %s", name, _acc(entry["full"]),
                 ", ".join(f"int{b} {_acc(entry[f'int{b}'])}" for b in bits))
    return _write(path, settings, {name: result[name] for name in models})


def weight_probe(out: Path, models: Mapping[str, str], model_ids: Mapping[str, str], datamodule, teacher: str | None,
                 reference: str | None, points: int, trainer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """L2 distances to the reference and the teacher, and metrics along the line from the teacher to each model;
    writes ``probes/weights.json``.

    Args:
        out: run folder.
        models: ``{name: model folder}``.
        model_ids: each model's identity (an entry is recomputed when it, the teacher's or the reference's changes).
        datamodule: the evaluation data.
        teacher: the model the interpolation paths start from (the unlearned teacher); ``None``: no paths.
        reference: the model before unlearning (distances to it); ``None``: no such distances.
        points: interpolation points per path, both ends included.
        trainer: Trainer arguments of the evaluations.

    Returns:
        ``{"settings": {...}, "models": {name: {"record", "l2_to_reference", "l2_to_teacher", "path": {"t": [...],
        metric: [...]} | None, "barrier": {metric: value} | None}}}``.
    """
    ts = interpolation_points(points)
    settings = {"points": points, "teacher": teacher, "reference": reference}
    anchors = {k: model_ids.get(v, models.get(v)) if v else None for k, v in (("teacher", teacher),
                                                                                ("reference", reference))}
    records = {name: {"model": model_ids.get(name, path), **settings, "anchors": anchors}
               for name, path in models.items()}
    path = out / PROBES_DIR / "weights.json"
    result, todo = _entries(path, records)
    if todo:
        tokenizer = datamodule.tokenizer
        params: Callable[[str], dict] = lambda n: _parameters(_load(models[n], tokenizer))  # noqa: E731
        ref = params(reference) if reference in models else None
        start = params(teacher) if teacher in models else None
        start_metrics = None
        for name in todo:
            own = params(name)
            entry: dict[str, Any] = {"record": reuse.digest(records[name]),
                                     "l2_to_reference": l2_distance(own, ref) if ref is not None else None,
                                     "l2_to_teacher": l2_distance(own, start) if start is not None else None,
                                     "path": None, "barrier": None}
            if start is not None and name != teacher and same_shapes(own, start):
                model = _load(models[name], tokenizer)
                if start_metrics is None:
                    start_metrics = validate_model(interpolate_(model, start, own, 0.0), datamodule, trainer)
                values = [start_metrics] + [validate_model(interpolate_(model, start, own, t), datamodule, trainer)
                                            for t in ts[1:]]
                entry["path"] = {"t": ts, **{m: [v[m] for v in values] for m in values[0]}}
                entry["barrier"] = {m: barrier(ts, entry["path"][m], up) for m, up in BARRIER_METRICS.items()
                                    if m in values[0]}
            result[name] = entry
            log.info("weight probe %s: L2 to reference %s, to teacher %s%s", name, _fmt(entry["l2_to_reference"]),
                     _fmt(entry["l2_to_teacher"]), "" if entry["barrier"] is None else
                     f", retain CE barrier {_fmt(entry['barrier'].get('val/retain_ce'))}")
    return _write(path, settings, {name: result[name] for name in models})


def _write(path: Path, settings: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"settings": settings, "models": models}
    write_json_atomic(str(path), json_safe(data))
    return data


def _acc(metrics: Mapping[str, float]) -> str:
    return _fmt(metrics.get("val/forget_acc"))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
