"""Experiment report: run folder -> ``report.json``, ``report.md`` and matplotlib PNGs (docs/reference.md §10).

Reads the contract the other stages write:

    <run>/<stage>/metrics.json   {"stage", "role", "alpha", "beta", "val": {...}, "compute": {"tokens", "flops"},
                                  "wall_time_s", "global_step"}
    <run>/relearn/<stage>/lr=<lr>_seed=<s>/curve.json   (see :mod:`undo_lightning.experiment.robustness`)

and reports, per stage: retain/forget before the attack, the worst-case forget metric after the attack at chosen steps,
the area under the worst-case curve, relative robustness (oracle and unlearn-only teacher as anchors) and relative
compute (stage FLOPs / oracle pretraining FLOPs). Metric names and the attacker's direction are parameters, so the
language setting (``metric="val/forget_ce", mode="min"``) works the same way as arithmetic accuracy.

Plots use matplotlib's object API with the Agg canvas, so nothing here touches pyplot's global backend or state.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
import warnings
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np

from undo_lightning.experiment.robustness import (
    Mode,
    bootstrap_interval,
    bootstrap_relative_robustness,
    check_bootstrap,
    check_mode,
    load_curves,
    relative_robustness,
    worst_case,
)
from undo_lightning.io import atomic_write, check_choice, json_safe
from undo_lightning.modules.relearn import ATTACK_DESCRIPTIONS, check_setting_name

DEFAULT_STEPS = (25, 100, 300)
#: y axis of ``robustness_vs_compute.png``
TradeoffY = Literal["forget", "relative_robustness"]
# Table/plot order: anchors first, then UNDO students by alpha, then baselines; unknown roles last.


class Role(str, Enum):
    """What a model is in the experiment (``metrics.json["role"]``), in table order."""

    REFERENCE = "reference"  # the model to unlearn
    ORACLE = "oracle"  # never saw the forget data: the gold standard
    TEACHER = "teacher"  # the unlearned model (unlearn-only anchor)
    STUDENT = "student"  # distilled from the teacher: UNDO per alpha, or full distillation
    BASELINE = "baseline"  # further unlearning methods


ROLE_ORDER = {role.value: i for i, role in enumerate(Role)}
SIG_DIGITS = 6  # report.json precision: enough for any metric, stable across platforms

__all__ = ["build_report", "main", "render_markdown", "report_to_json", "write_report"]


# ----------------------------------------------------------------------------------------------------------------------
# reading the run folder


def _read_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    stages = {}
    for path in sorted(run_dir.glob("*/metrics.json")):
        if path.parent.name == "relearn":  # attack runs are folded into their model, never a stage of their own
            continue
        with open(path) as f:
            stages[path.parent.name] = json.load(f)
    if not stages:
        raise FileNotFoundError(f"run folder {str(run_dir)!r} holds no <stage>/metrics.json: nothing to report "
                                "(has the pipeline run?)")
    return stages


def default_retain_metric(metric: str) -> str:
    """The retain counterpart of a forget metric: ``val/forget_acc`` -> ``val/retain_acc`` (same suffix).

    Args:
        metric: forget metric name containing ``forget``.

    Returns:
        The name with ``forget`` replaced by ``retain``.

    Raises:
        ValueError: the name has no ``forget`` to replace (pass ``retain_metric`` explicitly then).
    """
    if "forget" not in metric:
        raise ValueError(f"cannot derive the retain metric from {metric!r}; pass retain_metric explicitly")
    return metric.replace("forget", "retain", 1)


def _num(x: Any) -> float:
    """JSON number or null -> float (NaN for missing)."""
    return math.nan if x is None else float(x)


def _is_full_distill(role: str | None, alpha: float | None, beta: float | None, student_init: str | None) -> bool:
    # a random student, α = β = 1 (≈ random init, docs/reference.md §6), or a student recorded without its init or
    # noise settings; a student initialised from another model (oracle matching) is not one
    return role == Role.STUDENT and (student_init == "random" or (alpha == 1 and beta == 1)
                                     or (alpha is None and student_init is None))


def _anchor(name: str | None) -> str:
    return f"`{name}`" if name is not None else "none (relative robustness and compute need both anchors)"


def _find_anchor(stages: dict[str, dict], role: str, explicit: str | None) -> str | None:
    if explicit is not None:
        if explicit not in stages:
            raise ValueError(f"{role} anchor {explicit!r} has no metrics.json; stages: {sorted(stages)}")
        return explicit
    names = [n for n, m in stages.items() if m.get("role") == role]
    if len(names) == 1:
        return names[0]
    if len(names) > 1:
        if role in names:  # several candidates: the stage literally named after the role is the canonical one
            return role
        warnings.warn(f"several stages have role {role!r} ({names}); no {role} anchor chosen — pass {role}=NAME",
                      stacklevel=3)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# building the report dict


def trained_metric(metric: str) -> str:
    """The metric of an attack's trained material beside its held-out metric: ``val/forget_acc`` ->
    ``val/forget_trained_acc`` (see ``DocumentSource.trained_eval_sets``)."""
    return metric.replace("forget", "forget_trained", 1)


def _attack_settings(relearn_dir: Path, metric: str) -> dict[str, dict[str, Any]]:
    """Every attack setting with runs under ``relearn/``, what it trains on (from its first curve) and, for a
    pipeline run folder, the data the setting changes (``data``: dotted keys of its ``data:`` override in the run's
    ``config.yaml``); ``forget`` first, then by name.

    A setting whose curves also score the material the attacker trains on (:func:`trained_metric`, e.g. the held-out
    facts attack) is reported twice: ``<setting>`` reads ``metric`` (the held-out material) and ``<setting>.trained``
    reads the trained material from the same runs (``runs``: the runs' setting, ``metric``: the metric read).
    """
    import yaml

    config = relearn_dir.parent / "config.yaml"
    overrides, attackers = {}, {}
    if config.is_file():
        with open(config) as f:
            settings = (((yaml.safe_load(f) or {}).get("relearn") or {}).get("attacks") or {})
        overrides = {name: _dotted(setting.get("data") or {}) for name, setting in settings.items()}
        attackers = {name: _dotted(setting.get("model") or {}) for name, setting in settings.items()}
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(relearn_dir.glob("*/*/curve.json")):
        with open(path) as f:
            curve = json.load(f)
        name = curve.get("attack", "forget")
        if name not in found:
            train_on = curve.get("train_on", name)  # curves written before settings had names: the name is the data
            found[name] = {"train_on": train_on, "description": ATTACK_DESCRIPTIONS.get(train_on),
                           "data": overrides.get(name) or {}, "attacker": attackers.get(name) or {},
                           "runs": name, "metric": metric, "scored_on": None}
            if trained_metric(metric) in curve.get("metrics", {}):
                found[name]["scored_on"] = "held-out"
                found[f"{name}.trained"] = {**found[name], "metric": trained_metric(metric), "scored_on": "trained"}
    return dict(sorted(found.items(), key=lambda item: (item[0] != "forget", item[0])))


def _read_probes(run_dir: Path, names: Sequence[str], metric: str, retain_metric: str) -> dict[str, Any]:
    """The probes' results (``probes/quantize.json``, ``probes/weights.json``, written by
    :mod:`undo_lightning.experiment.probes`) of the reported models: forget/retain metric per quantisation, distances,
    barriers and the interpolation paths of the two metrics."""
    out: dict[str, Any] = {}
    folder = run_dir / "probes"
    path = folder / "quantize.json"
    if path.is_file():
        with open(path) as f:
            data = json.load(f)
        out["quantize"] = {"settings": data["settings"], "models": {
            name: {variant: {"forget": _num(v.get(metric)), "retain": _num(v.get(retain_metric)),
                             "relative_error": v.get("relative_error")}
                   for variant, v in entry.items() if variant != "record"}
            for name, entry in data["models"].items() if name in names}}
    path = folder / "weights.json"
    if path.is_file():
        with open(path) as f:
            data = json.load(f)
        out["weights"] = {"settings": data["settings"], "models": {
            name: {"l2_to_reference": entry.get("l2_to_reference"), "l2_to_teacher": entry.get("l2_to_teacher"),
                   "barrier": entry.get("barrier"),
                   "path": None if not entry.get("path") else {k: entry["path"].get(k) for k in
                                                               ("t", metric, retain_metric)}}
            for name, entry in data["models"].items() if name in names}}
    return out


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"forget": {"init_args": {"x": 0.5}}}`` -> ``{"forget.init_args.x": 0.5}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_dotted(value, path + ".") if isinstance(value, dict) and value else {path: value})
    return out


def _empty_after(steps: Sequence[int]) -> list[dict[str, Any]]:
    return [{"requested_step": s, "step": None, "mean": math.nan, "std": math.nan, "ci": [math.nan, math.nan]}
            for s in steps]


def build_report(run_dir: str | Path, steps: Sequence[int] = DEFAULT_STEPS, metric: str = "val/forget_acc",
                 mode: str = "max", *, retain_metric: str | None = None, max_retain_drop: float | None = None,
                 attacks: Sequence[str] | None = None, oracle: str | None = None, teacher: str | None = None,
                 include_unlearning_compute: bool = False, ddof: int = 0, ci_level: float = 0.95,
                 ci_resamples: int = 2000, ci_seed: int = 0) -> dict[str, Any]:
    """Collect the report numbers of one run folder.

    Args:
        run_dir: experiment folder.
        steps: attack steps at which to report the worst-case forget metric. A step beyond a model's attack length
            (or between evaluations) uses the last evaluated step before it; the step actually used is recorded.
            Relative robustness is taken at the last (largest) of these steps.
        metric: forget metric, a key of ``metrics.json["val"]`` and of the curves (e.g. ``val/forget_ce``).
        mode: attacker's direction for ``metric``: ``"max"`` (accuracy) or ``"min"`` (CE).
        retain_metric: retain metric for the "before" column and the utility bound; default: ``metric`` with
            ``forget`` -> ``retain``.
        max_retain_drop: optional utility bound for the worst case (see
            :func:`~undo_lightning.experiment.robustness.worst_case`);
            the retain metric's direction is taken to match ``mode`` (higher is better when ``mode="max"``).
        attacks: attack settings to report (``curve.json["attack"]``), in table order; default: every setting with
            runs, ``forget`` first. A setting whose runs also score the material they train on is followed by
            ``<setting>.trained``, which reads that score (``val/forget_trained_acc``) from the same runs.
        oracle: stage to use as the oracle anchor; default: the unique stage with role ``oracle``.
        teacher: stage to use as the unlearn-only anchor; default: the unique stage with role ``teacher``.
        include_unlearning_compute: for students, add the teacher anchor's (unlearning) FLOPs to their distillation
            FLOPs in the relative compute; default reports distillation FLOPs only.
        ddof: delta degrees of freedom of the std over seeds.
        ci_level: level of the bootstrap intervals over attack seeds (worst case and relative robustness).
        ci_resamples: bootstrap resamples.
        ci_seed: seed of the bootstrap resampling (same run folder and settings -> same intervals).

    Returns:
        A dict (Python floats, NaN where unavailable) with the settings, ``"anchors"``, ``"attacks"`` (per setting:
        what it trains on), ``"models"`` (a list, one dict per stage in table order; per attack setting under
        ``"attacks"``: the worst case after the attack with ``ci`` intervals, its AUC, relative robustness and its
        interval) and ``"curves"`` (``{setting: {stage: {"steps", "mean", "std"}}}`` worst-case curves).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no ``<stage>/metrics.json``.
        ValueError: unknown ``mode``, empty/negative ``steps``, an explicit anchor that does not exist, a bad attack
            setting name or bootstrap setting.
    """
    check_mode(mode)
    req_steps = sorted({int(s) for s in steps})
    if not req_steps or req_steps[0] < 0:
        raise ValueError(f"steps must be a non-empty list of attack steps >= 0, got {list(steps)}")
    retain_metric = retain_metric or default_retain_metric(metric)
    run_dir = Path(run_dir)
    stages = _read_stages(run_dir)
    anchors = {"oracle": _find_anchor(stages, Role.ORACLE, oracle),
               "teacher": _find_anchor(stages, Role.TEACHER, teacher)}
    rr_step = req_steps[-1]
    relearn_dir = run_dir / "relearn"
    settings = _attack_settings(relearn_dir, metric)
    attacks = list(attacks) if attacks is not None else (list(settings) or ["forget"])
    if not attacks or len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks={attacks}: expected a non-empty list of distinct attack setting names")
    for name in attacks:
        check_setting_name(name)
    # a setting that also scores its trained material is followed by that view (unless listed already)
    attacks = list(dict.fromkeys(v for a in attacks for v in (a, f"{a}.trained") if v == a or v in settings))
    bootstrap = {"level": ci_level, "resamples": ci_resamples, "seed": ci_seed}
    check_bootstrap(ci_level, ci_resamples)

    def flops_of(name: str | None) -> float:
        return math.nan if name is None else _num(stages[name].get("compute", {}).get("flops"))

    oracle_flops, teacher_flops = flops_of(anchors["oracle"]), flops_of(anchors["teacher"])

    if relearn_dir.is_dir():
        orphans = sorted(p.name for p in relearn_dir.iterdir() if p.is_dir() and p.name not in stages)
        if orphans:
            warnings.warn(f"relearning runs without a <stage>/metrics.json are not reported: {orphans}", stacklevel=2)

    curves: dict[str, dict[str, dict[str, list]]] = {a: {} for a in attacks}
    per_seed: dict[str, dict[str, dict[int, float]]] = {a: {} for a in attacks}  # at rr_step, for the RR interval
    models = []
    for name, m in stages.items():
        role, alpha, beta = m.get("role"), m.get("alpha"), m.get("beta")
        val = m.get("val", {})
        entry: dict[str, Any] = {
            "name": name, "role": role, "alpha": alpha, "beta": beta, "noise_seed": m.get("noise_seed"),
            # the pipeline section a stage came from ("undo" for the alpha sweep; None in hand-made folders)
            "group": m.get("group"),
            "full_distill": _is_full_distill(role, alpha, beta, m.get("student_init")),
            "retain_before": _num(val.get(retain_metric)), "forget_before": _num(val.get(metric)),
            "flops": flops_of(name), "relative_compute": math.nan,
            "tokens": m.get("compute", {}).get("tokens"), "wall_time_s": _num(m.get("wall_time_s")),
            "tokens_by_split": m.get("compute", {}).get("tokens_by_split"),
            "global_step": m.get("global_step"),
            # a student that reached its step budget without meeting the stop rule (not a converged student)
            "budget_hit": m.get("budget_hit"),
            # the unlearn-only anchor of this model's relative robustness: its own teacher when that is an unlearned
            # model of this run (a student of a baseline), else the experiment's teacher anchor
            "teacher_anchor": _own_teacher(stages, m) or anchors["teacher"], "attacks": {},
        }
        flops = entry["flops"] + (teacher_flops if include_unlearning_compute and role == Role.STUDENT else 0.0)
        if oracle_flops > 0:
            entry["relative_compute"] = flops / oracle_flops
        for attack in attacks:
            result: dict[str, Any] = {"runs": None, "after": _empty_after(req_steps), "auc": math.nan,
                                      "relative_robustness": math.nan, "relative_robustness_ci": [math.nan, math.nan]}
            view = settings.get(attack, {})
            source, view_metric = view.get("runs", attack), view.get("metric", metric)
            runs = load_curves(run_dir, name, view_metric, source) if (relearn_dir / name).is_dir() else {}
            if runs:
                retain_runs = load_curves(run_dir, name, retain_metric, source) if max_retain_drop is not None \
                    else None
                wc = worst_case(runs, mode, retain_runs, max_retain_drop, retain_higher_is_better=(mode == "max"),
                                ddof=ddof)
                summary = wc.summary(req_steps)
                curves[attack][name] = {k: summary[k] for k in ("steps", "mean", "std")}
                for cell in summary["at"]:
                    cell["ci"] = list(bootstrap_interval(wc.seed_values(cell["requested_step"]), **bootstrap))
                per_seed[attack][name] = dict(zip(wc.seeds, wc.seed_values(rr_step).tolist(), strict=True))
                result.update({"runs": {"n_runs": len(runs), "lrs": sorted({lr for lr, _ in runs}),
                                        "seeds": sorted({s for _, s in runs})},
                               "after": summary["at"], "auc": summary["auc"]})
            entry["attacks"][attack] = result
        models.append(entry)

    for attack in attacks:
        _relative_robustness(models, attack, anchors, per_seed[attack], bootstrap)

    def order(e: dict) -> tuple:
        alpha = e["alpha"] if e["alpha"] is not None and not e["full_distill"] else math.inf
        return ROLE_ORDER.get(e["role"], len(ROLE_ORDER)), alpha, e["name"]

    models.sort(key=order)
    return {
        "metric": metric, "retain_metric": retain_metric, "mode": mode, "steps": req_steps,
        "relative_robustness_step": rr_step, "max_retain_drop": max_retain_drop, "std_ddof": ddof,
        "interval": {**bootstrap, "method": "percentile bootstrap over attack seeds (paired across models)"},
        "compute_basis": ("students: distillation + teacher unlearning FLOPs" if include_unlearning_compute
                          else "students: distillation FLOPs only"),
        "anchors": anchors,
        "attacks": {a: settings.get(a, {"train_on": None, "description": None, "data": {}, "runs": a, "metric": metric,
                                        "scored_on": None}) for a in attacks},
        "models": models,
        "noise_seed_groups": _noise_seed_groups(models, attacks, ddof),
        # students that no other student beats on both relative compute and relative robustness, per attack setting
        "frontier": {a: pareto_frontier([(e["name"], e["relative_compute"], e["attacks"][a]["relative_robustness"])
                                         for e in models if e["role"] == Role.STUDENT]) for a in attacks},
        "curves": {a: {e["name"]: curves[a][e["name"]] for e in models if e["name"] in curves[a]} for a in attacks},
        "probes": _read_probes(run_dir, [e["name"] for e in models], metric, retain_metric),
    }


def pareto_frontier(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """The robustness-per-compute frontier: points that no other point dominates.

    A point ``(name, compute, robustness)`` is dominated by another with ``compute <= `` and ``robustness >=`` its
    own, one of them strictly. Points with a NaN coordinate are left out.

    Args:
        points: ``(name, relative compute, relative robustness)`` per model.

    Returns:
        The names on the frontier, by increasing compute.
    """
    pts = [(n, c, r) for n, c, r in points if math.isfinite(c) and math.isfinite(r)]
    front = [(c, n) for n, c, r in pts
             if not any(c2 <= c and r2 >= r and (c2 < c or r2 > r) for _, c2, r2 in pts)]
    return [n for _, n in sorted(front)]


def _spread(values: list[float], ddof: int) -> dict[str, float]:
    v = np.array([x for x in values if math.isfinite(x)])
    if len(v) == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=ddof)) if len(v) > ddof else math.nan,
            "min": float(v.min()), "max": float(v.max())}


def _noise_seed_groups(models: list[dict], attacks: list[str], ddof: int) -> list[dict[str, Any]]:
    """UNDO students of one α (and β and teacher) that differ only in their noise seed: the spread over noise seeds
    of the worst case at the last requested step and of relative robustness, per attack setting."""
    groups: dict[tuple, list[dict]] = {}
    for e in models:
        if _is_undo(e):
            groups.setdefault((e["alpha"], e["beta"], e["teacher_anchor"]), []).append(e)
    out = []
    for (alpha, beta, _), members in groups.items():
        if len(members) < 2:
            continue
        out.append({"alpha": alpha, "beta": beta, "members": [e["name"] for e in members],
                    "noise_seeds": [e["noise_seed"] for e in members],
                    "attacks": {a: {"worst_case": _spread([e["attacks"][a]["after"][-1]["mean"] for e in members],
                                                          ddof),
                                    "relative_robustness": _spread([e["attacks"][a]["relative_robustness"]
                                                                    for e in members], ddof)}
                                for a in attacks}})
    return out


def _own_teacher(stages: dict[str, dict], m: dict) -> str | None:
    teacher = m.get("teacher_stage")
    return teacher if teacher in stages and stages[teacher].get("role") in (Role.TEACHER, Role.BASELINE) else None


def _relative_robustness(models: list[dict], attack: str, anchors: dict[str, str | None],
                         per_seed: dict[str, dict[int, float]], bootstrap: dict[str, Any]) -> None:
    """Relative robustness of every model under one attack setting at the last requested step (against the model's
    ``teacher_anchor``), and its bootstrap interval over attack seeds (paired when the model and both anchors were
    attacked with the same seeds)."""
    after_last = {e["name"]: e["attacks"][attack]["after"][-1]["mean"] for e in models}
    p_oracle = after_last.get(anchors["oracle"], math.nan)
    p_teacher = np.array([after_last.get(e["teacher_anchor"], math.nan) for e in models])
    # one vectorised call, so degenerate anchors warn once
    rr = np.atleast_1d(relative_robustness(np.array([after_last[e["name"]] for e in models]), p_teacher, p_oracle))
    oracle_seeds = per_seed.get(anchors["oracle"] or "")
    for e, r in zip(models, rr, strict=True):
        result = e["attacks"][attack]
        result["relative_robustness"] = float(r)
        own, teacher_seeds = per_seed.get(e["name"]), per_seed.get(e["teacher_anchor"] or "")
        if own is None or oracle_seeds is None or teacher_seeds is None:
            continue
        paired = set(own) == set(oracle_seeds) == set(teacher_seeds)
        seeds = sorted(own)
        values = [[d[s] for s in (seeds if paired else sorted(d))] for d in (own, teacher_seeds, oracle_seeds)]
        result["relative_robustness_ci"] = list(bootstrap_relative_robustness(*values, paired=paired, **bootstrap))


# ----------------------------------------------------------------------------------------------------------------------
# serialisation


def report_to_json(report: dict[str, Any]) -> str:
    """Deterministic JSON text of a report: NaN -> null, floats rounded to 6 significant digits.

    Args:
        report: dict from :func:`build_report`.

    Returns:
        JSON text (indent 2, trailing newline), valid for any JSON parser.
    """
    return json.dumps(json_safe(report, SIG_DIGITS), indent=2, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# markdown


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _short(metric: str) -> str:
    return metric.rsplit("/", 1)[-1]


def _interval(ci: Sequence[float] | None) -> str:
    if not ci or not all(isinstance(x, float) and math.isfinite(x) for x in ci):
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _tokens(e: dict) -> str:
    """``409,600 (204,800 / 204,800)``: trained tokens, and per split (retain / forget) when recorded."""
    tokens = e["tokens"]
    if not (isinstance(tokens, (int, float)) and math.isfinite(tokens)):
        return "–"
    split = e.get("tokens_by_split") or {}
    parts = f" ({split['retain']:,} / {split['forget']:,})" if {"retain", "forget"} <= set(split) else ""
    return f"{int(tokens):,}{parts}"


def _attack_title(name: str, info: dict[str, Any]) -> str:
    trained = {"forget": "fine-tuned on forget data", "retain": "fine-tuned on retain data only",
               "mixture": "fine-tuned on the retain/forget mixture"}.get(info.get("train_on") or "", "no runs")
    data = "; ".join(f"{k}={v}" for k, v in (info.get("data") or {}).items())
    attacker = "; ".join(f"{k}={v}" for k, v in (info.get("attacker") or {}).items())
    scored = {"held-out": "; scored on the material it never trains on",
              "trained": f"; the runs of `{info.get('runs')}` scored on the material they train on"}
    return (f"attack `{name}` ({trained}" + (f"; data: {data}" if data else "")
            + (f"; attacker: {attacker}" if attacker else "") + scored.get(info.get("scored_on") or "", "") + ")")


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown text of a report: settings, a table of the models before the attack, one table per attack setting
    (worst case after the attack, relative robustness), and a legend.

    Args:
        report: dict from :func:`build_report`.

    Returns:
        Markdown text.
    """
    fm, rm = _short(report["metric"]), _short(report["retain_metric"])
    last = report["relative_robustness_step"]
    level = f"{report['interval']['level']:.0%}"
    head = ["model", "role", "α", "β", f"{rm} before", f"{fm} before", "rel. compute", "wall time (s)",
            "tokens (retain / forget)"]
    rows = []
    for e in report["models"]:
        rc = e["relative_compute"]
        rel_compute = f"{rc * 100:.3g} %" if rc is not None and math.isfinite(rc) else "–"
        tokens = _tokens(e)
        name = f"{e['name']} ⚠ budget hit" if e.get("budget_hit") else e["name"]
        rows.append([name, str(e["role"]), _fmt(e["alpha"], "g"), _fmt(e["beta"], "g"), _fmt(e["retain_before"]),
                     _fmt(e["forget_before"]), rel_compute, _fmt(e["wall_time_s"], ".1f"), tokens])
    better = "higher" if report["mode"] == "max" else "lower"
    anchors = report["anchors"]
    by_name = {e["name"]: e for e in report["models"]}
    reference = next((e["name"] for e in report["models"] if e["role"] == Role.REFERENCE), None)
    bound = (f"LR runs whose `{report['retain_metric']}` dropped more than {report['max_retain_drop']} below its "
             f"step-0 value are excluded at that step" if report["max_retain_drop"] is not None else "none")
    lines = [
        "# UNDO report", "",
        (f"- forget metric: `{report['metric']}` ({better} = better for the attacker); retain metric: "
         f"`{report['retain_metric']}`"),
        (f"- attacks: {', '.join(f'`{a}`' for a in report['attacks'])}; anchors: oracle = "
         f"{_anchor(anchors['oracle'])}, unlearn-only = {_anchor(anchors['teacher'])}"),
        f"- utility bound: {bound}",
        f"- compute basis: {report['compute_basis']}",
        *(f"- {role} `{anchor}` trained on {_tokens(by_name[anchor])} tokens" for role, anchor in
          (("reference", reference), ("oracle", anchors["oracle"])) if anchor in by_name), "",
        "## Models before the attack", "",
        *_table(head, rows),
    ]
    for attack, info in report["attacks"].items():
        head = (["model"] + [f"worst {fm} @{s}" for s in report["steps"]]
                + ["AUC", f"rel. robustness @{last}", "runs (LRs × seeds)"])
        rows = []
        for e in report["models"]:
            result = e["attacks"][attack]
            after = []
            for a in result["after"]:
                cell = f"{_fmt(a['mean'])} ± {_fmt(a['std'])}{_interval(a.get('ci'))}" if a["step"] is not None \
                    else "–"
                if a["step"] is not None and a["step"] != a["requested_step"]:
                    cell += f" (@{a['step']})"
                after.append(cell)
            runs = result["runs"]
            runs = f"{len(runs['lrs'])} × {len(runs['seeds'])}" if runs else "–"
            name = f"{e['name']} ⚠ budget hit" if e.get("budget_hit") else e["name"]
            rr = _fmt(result["relative_robustness"]) + _interval(result.get("relative_robustness_ci"))
            if e["teacher_anchor"] != report["anchors"]["teacher"] and math.isfinite(result["relative_robustness"]):
                rr += f" (vs {e['teacher_anchor']})"
            rows.append([name, *after, _fmt(result["auc"]), rr, runs])
        lines += ["", f"## {_attack_title(attack, info)}", ""]
        if info.get("description"):
            lines += [info["description"][0].upper() + info["description"][1:] + ".", ""]
        lines += _table(head, rows)
    if report["noise_seed_groups"]:
        head = ["α", "β", "noise seeds"]
        for attack in report["attacks"]:
            head += [f"`{attack}`: worst {fm} @{last}", f"`{attack}`: rel. robustness @{last}"]
        rows = []
        for g in report["noise_seed_groups"]:
            row = [_fmt(g["alpha"], "g"), _fmt(g["beta"], "g"), ", ".join(str(n) for n in g["noise_seeds"])]
            for attack in report["attacks"]:
                for key in ("worst_case", "relative_robustness"):
                    d = g["attacks"][attack][key]
                    row.append(f"{_fmt(d['mean'])} ± {_fmt(d['std'])} (range {_fmt(d['min'])} – {_fmt(d['max'])})"
                               if math.isfinite(d["mean"]) else "–")
            rows.append(row)
        lines += ["", "## UNDO students over noise seeds", "",
                  "Each α's students differ only in the noise draw N (paper eq. 1): mean ± std over noise seeds of "
                  "their seed-mean values above.", "", *_table(head, rows)]
    if any(report["frontier"].values()):
        lines += ["", "## Robustness per compute: the students' frontier", "",
                  "Students that no other student beats on both relative compute and relative robustness @"
                  f"{last}, cheapest first.", ""]
        for attack, names in report["frontier"].items():
            cells = [f"`{n}` ({by_name[n]['relative_compute'] * 100:.3g} %, "
                     f"{by_name[n]['attacks'][attack]['relative_robustness']:.3f})" for n in names]
            lines.append(f"- attack `{attack}`: " + (" → ".join(cells) if cells else "–"))
    lines += _probe_sections(report)
    lines += [
        "",
        "**Legend**", "",
        "- *before*: `metrics.json` validation values of the stage, before any relearning attack.",
        (f"- *worst {fm} @k* (worst case): for each attack seed and step, the attacker's best value over the LR grid "
         f"({'max' if report['mode'] == 'max' else 'min'} of `{report['metric']}`), then mean ± std over seeds "
         f"(ddof={report['std_ddof']}) and, in brackets, a {level} percentile bootstrap interval of the mean over "
         f"seeds ({report['interval']['resamples']} resamples; with two seeds it spans their two values). `(@s)`: "
         "the attack was not evaluated at k, the last evaluated step s ≤ k is shown."),
        ("- *AUC*: trapezoidal area under the worst-case mean curve divided by its step span, i.e. the mean level "
         "during the attack."),
        (f"- *rel. robustness* = (P − P_unlearn) / (P_oracle − P_unlearn), P = worst-case `{report['metric']}` at "
         f"step {last}: 1 = as robust as the oracle (data filtering), 0 = no better than unlearning alone; – when an "
         f"anchor is missing or the anchors coincide. Brackets: {level} bootstrap interval, the same attack seeds "
         "drawn for the model and both anchors. `(vs T)`: a student of another unlearned model T is measured "
         "against its own teacher T."),
        f"- *rel. compute*: stage FLOPs / oracle pretraining FLOPs ({report['compute_basis']}).",
        ("- *⚠ budget hit*: a distilled student that reached its step budget without meeting its stop rule (retain "
         "gap to the teacher): under-trained, so part of its robustness may be missing capability, not removal."),
        "- –: not available.", "",
    ]
    return "\n".join(lines)


def _quantized_worst(report: dict[str, Any], name: str) -> tuple[float, str | None]:
    """The attacker's best forget value over the probed quantisations of ``name`` and which one gave it."""
    entry = (report["probes"].get("quantize") or {}).get("models", {}).get(name) or {}
    values = [(v["forget"], variant) for variant, v in entry.items()
              if variant != "full" and math.isfinite(v["forget"])]
    if not values:
        return math.nan, None
    return (max if report["mode"] == "max" else min)(values)


def _probe_sections(report: dict[str, Any]) -> list[str]:
    """The per-attack overview (every attack setting and the quantisation probe side by side) and one section per
    probe."""
    fm, rm = _short(report["metric"]), _short(report["retain_metric"])
    last, probes, lines = report["relative_robustness_step"], report["probes"], []
    if len(report["attacks"]) > 1 or "quantize" in probes:
        head = ["model", f"{fm} before", *(f"`{a}`: worst {fm} @{last}" for a in report["attacks"])]
        head += [f"quantised: worst {fm}"] if "quantize" in probes else []
        rows = []
        for e in report["models"]:
            row = [e["name"], _fmt(e["forget_before"])]
            row += [_fmt(e["attacks"][a]["after"][-1]["mean"]) for a in report["attacks"]]
            if "quantize" in probes:
                value, variant = _quantized_worst(report, e["name"])
                row.append(f"{_fmt(value)} ({variant})" if variant else "–")
            rows.append(row)
        bound = (f"LR runs whose `{report['retain_metric']}` dropped more than {report['max_retain_drop']} are not "
                 "counted" if report["max_retain_drop"] is not None else "no retain floor")
        lines += ["", "## Worst case per attack", "",
                  f"The attacker's best {fm} under each attack setting (mean over seeds, {bound}) and after weight "
                  "quantisation (the worse of the probed bit widths); – where the model was not attacked that way"
                  + (" or every LR run broke the retain floor at that step" if report["max_retain_drop"] is not None
                     else "") + ".", "", *_table(head, rows)]
    quantize = probes.get("quantize")
    if quantize:
        variants = [f"int{b}" for b in quantize["settings"]["bits"]]
        head = ["model", f"{fm} full", *(f"{fm} {v}" for v in variants), f"{rm} full", *(f"{rm} {v}" for v in variants),
                *(f"rel. weight error {v}" for v in variants)]
        rows = []
        for e in report["models"]:
            entry = quantize["models"].get(e["name"])
            if not entry:
                continue
            rows.append([e["name"], *(_fmt(entry[v]["forget"]) for v in ["full", *variants]),
                         *(_fmt(entry[v]["retain"]) for v in ["full", *variants]),
                         *(_fmt(entry[v]["relative_error"], ".4f") for v in variants)])
        st = quantize["settings"]
        lines += ["", "## Quantisation probe", "",
                  f"Every model evaluated after its Linear weights are rounded to {', '.join(variants)} "
                  f"({st['method']}, one scale per {st['group_size']} input features"
                  f"{', embeddings included' if st['include_embeddings'] else ', embeddings in full precision'}). "
                  "Quantisation restores much of what gradient-ascent-style unlearning removed (arXiv 2410.16454); a "
                  f"model whose {fm} rises here only hid the capability.", "", *_table(head, rows)]
    weights = probes.get("weights")
    if weights:
        st = weights["settings"]
        head = ["model", "L2 to reference", "L2 to teacher", f"barrier {fm}", f"barrier {rm}",
                "barrier forget CE", "barrier retain CE"]
        rows = []
        for e in report["models"]:
            entry = weights["models"].get(e["name"])
            if not entry:
                continue
            b = entry.get("barrier") or {}
            rows.append([e["name"], _fmt(entry["l2_to_reference"]), _fmt(entry["l2_to_teacher"]),
                         *(_fmt(b.get(m)) for m in (report["metric"], report["retain_metric"], "val/forget_ce",
                                                    "val/retain_ce"))])
        lines += ["", "## Weight space", "",
                  f"L2 distance of all parameters to the reference `{st['reference']}` and the teacher "
                  f"`{st['teacher']}`, and the barrier along the straight line from the teacher to each model "
                  f"({st['points']} points): how much worse the path is than the line between its ends (0: linearly "
                  "connected). Models close to, or linearly connected with, a model that has the capability tend to "
                  "relearn it fast (arXiv 2505.22310). Plot: `weight_interpolation.png`.", "", *_table(head, rows)]
    return lines


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


# ----------------------------------------------------------------------------------------------------------------------
# plots


def _is_undo(e: dict) -> bool:
    """A student of the UNDO α sweep: distilled into a noised copy of its teacher (it has an α) by the pipeline's
    ``undo`` section (other noised students, e.g. another β, are points of their own)."""
    return (e["role"] == Role.STUDENT and not e["full_distill"] and e["alpha"] is not None
            and e.get("group") in (None, "undo"))


def _styles(models: list[dict]) -> dict[str, dict[str, Any]]:
    """Colour/line style per model: anchors fixed and distinct, students on a colour ramp by alpha."""
    from matplotlib import colormaps

    ramp = colormaps["viridis"]
    others = itertools.cycle([colormaps["tab10"](i) for i in (1, 2, 4, 5, 6, 8, 9, 0)])  # tab10 minus anchor hues
    out = {}
    for e in models:
        if e["role"] == Role.ORACLE:
            st = {"color": "black", "ls": "--", "lw": 2.5}
        elif e["role"] == Role.TEACHER:
            st = {"color": "tab:red", "ls": "--", "lw": 2.5}
        elif e["role"] == Role.REFERENCE:
            st = {"color": "tab:gray", "ls": ":", "lw": 2.0}
        elif e["full_distill"]:
            st = {"color": "tab:purple", "ls": "-.", "lw": 1.8}
        elif _is_undo(e):
            st = {"color": ramp(0.1 + 0.8 * min(max(float(e["alpha"]), 0.0), 1.0)), "ls": "-", "lw": 1.6}
        else:
            st = {"color": next(others), "ls": "-", "lw": 1.3}
        out[e["name"]] = st
    return out


def _new_figure(size: tuple[float, float] = (8.0, 5.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))


def _label(e: dict) -> str:
    if _is_undo(e):
        return f"{e['name']} (α={e['alpha']:g})"
    return e["name"]


def curves_plot_name(attack: str) -> str:
    """File of an attack setting's worst-case curves plot: ``relearn_curves.png`` for ``forget``, else
    ``relearn_curves_<attack>.png``."""
    return "relearn_curves.png" if attack == "forget" else f"relearn_curves_{attack}.png"


def _plot_relearn_curves(report: dict, attack: str, path: Path) -> None:
    fig, ax = _new_figure()
    styles = _styles(report["models"])
    curves = report["curves"][attack]
    for e in report["models"]:
        c = curves.get(e["name"])
        if c is None:
            continue
        steps, mean, std = np.asarray(c["steps"]), np.asarray(c["mean"], float), np.asarray(c["std"], float)
        st = styles[e["name"]]
        ax.plot(steps, mean, label=_label(e), **st)
        ax.fill_between(steps, mean - std, mean + std, color=st["color"], alpha=0.15, lw=0)
    last = max((c["steps"][-1] for c in curves.values()), default=None)
    for s in report["steps"]:
        if last is not None and s <= last:  # mark the reported steps that the attacks actually reach
            ax.axvline(s, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("relearning attack step")
    info = report["attacks"][attack]
    ax.set_ylabel(f"worst-case {info.get('metric') or report['metric']}\n(mean ± std over seeds)")
    title = f"Relearning {_attack_title(attack, info).replace('`', '')}, best LR per step"
    ax.set_title(textwrap.fill(title, 100), fontsize=9)  # a setting's data and attacker can make it long
    if curves:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no relearning runs", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def _plot_tradeoff(report: dict, path: Path, y: str) -> None:
    check_choice("tradeoff_y", y, TradeoffY)
    step = report["relative_robustness_step"]
    attack = next(iter(report["attacks"]))  # the first attack setting (``forget`` when it ran)

    def yval(e: dict) -> float:
        result = e["attacks"][attack]
        return result["after"][-1]["mean"] if y == "forget" else result["relative_robustness"]

    fig, ax = _new_figure()
    styles = _styles(report["models"])
    by_alpha: dict[float, list[tuple[float, float]]] = {}  # students of one α over noise seeds: one point, ± std
    for e in report["models"]:
        x, v = e["relative_compute"], yval(e)
        if _is_undo(e) and math.isfinite(x) and math.isfinite(v):
            by_alpha.setdefault(e["alpha"], []).append((x, v))
    pts = [(float(np.mean([x for x, _ in xy])), float(np.mean([v for _, v in xy])),
            float(np.std([v for _, v in xy])), alpha) for alpha, xy in sorted(by_alpha.items())]
    if pts:
        several = any(len(xy) > 1 for xy in by_alpha.values())
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts] if several else None,
                    fmt="o-", color="tab:blue", capsize=3,
                    label="UNDO (α sweep" + (", mean ± std over noise seeds)" if several else ")"))
        for x, v, _, alpha in pts:
            ax.annotate(f"α={alpha:g}", (x, v), textcoords="offset points", xytext=(5, 5), fontsize=8)
    xs = [p[0] for p in pts]
    for e in report["models"]:
        x, v = e["relative_compute"], yval(e)
        if not math.isfinite(v):
            continue
        st = styles[e["name"]]
        xtxt = f"{x:.3g}" if math.isfinite(x) else "?"
        if e["role"] in (Role.ORACLE, Role.TEACHER, Role.REFERENCE):
            # Anchors are levels to beat, not points on the trade-off: draw them as horizontal lines.
            ax.axhline(v, color=st["color"], ls=st["ls"], lw=1.5, label=f"{e['name']} (rel. compute {xtxt})")
        elif e["full_distill"] and math.isfinite(x):
            ax.plot([x], [v], marker="*", ms=14, ls="none", color=st["color"], label=f"{e['name']} (full distill)")
            xs.append(x)
        elif not _is_undo(e) and math.isfinite(x):
            ax.plot([x], [v], marker="X", ms=9, ls="none", color=st["color"], label=e["name"])
            xs.append(x)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"relative compute (FLOPs / oracle pretraining; {report['compute_basis']})")
    ax.set_ylabel(f"worst-case {report['metric']} @{step}" if y == "forget" else f"relative robustness @{step}")
    ax.set_title(f"Robustness vs compute (attack {attack})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no data (missing attacks or FLOPs)", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def _plot_retain_forget(report: dict, path: Path) -> None:
    fig, ax = _new_figure((7.0, 5.5))
    styles = _styles(report["models"])
    seen: dict[tuple[float, float], int] = {}
    for e in report["models"]:
        x, v = e["forget_before"], e["retain_before"]
        if not (math.isfinite(x) and math.isfinite(v)):
            continue
        k = seen[(x, v)] = seen.get((x, v), -1) + 1  # stack labels of coincident points instead of overprinting
        ax.scatter([x], [v], color=styles[e["name"]]["color"], s=40, zorder=3)
        ax.annotate(_label(e), (x, v), textcoords="offset points", xytext=(5, 4 + 10 * k), fontsize=8)
    any_pt = bool(seen)
    ax.set_xlabel(f"{report['metric']} (before attack)")
    ax.set_ylabel(f"{report['retain_metric']} (before attack)")
    ax.set_title("Retain vs forget before the relearning attack")
    if not any_pt:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def _plot_interpolation(report: dict, path: Path) -> None:
    """Forget and retain metric along the line from the teacher (t = 0) to each model (t = 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    styles = _styles(report["models"])
    weights = report["probes"]["weights"]
    for ax, metric in zip(axes, (report["metric"], report["retain_metric"])):
        for e in report["models"]:
            p = (weights["models"].get(e["name"]) or {}).get("path")
            if p and p.get(metric):
                ax.plot(p["t"], p[metric], marker="o", ms=3, label=_label(e), **styles[e["name"]])
        ax.set_xlabel(f"t: (1 − t) θ_{weights['settings']['teacher']} + t θ_model")
        ax.set_ylabel(metric)
    axes[0].set_title("Forget metric along the path from the teacher")
    axes[1].set_title("Retain metric along the path from the teacher")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="best")
    _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# entry points


def write_report(run_dir: str | Path, *, tradeoff_y: TradeoffY = "forget", **kw: Any) -> dict[str, Any]:
    """Build the report and write ``report.json``, ``report.md`` and three PNGs into ``run_dir`` (atomically).

    Files: ``report.json`` (:func:`report_to_json`), ``report.md`` (:func:`render_markdown`), one curves plot per
    attack setting (:func:`curves_plot_name`: worst-case curves of all models, ±std bands),
    ``robustness_vs_compute.png`` (UNDO students over α vs relative compute under the first attack setting, anchors
    as lines, full distillation as a star), ``retain_vs_forget.png`` (retain vs forget before the attack).

    Args:
        run_dir: experiment folder.
        tradeoff_y: y axis of ``robustness_vs_compute.png``: ``"forget"`` (worst-case forget metric at the last
            requested step) or ``"relative_robustness"``.
        **kw: forwarded to :func:`build_report` (``steps``, ``metric``, ``mode``, ``retain_metric``, ...).

    Returns:
        The report exactly as written to ``report.json`` (rounded; NaN as None; without wall times).
    """
    check_choice("tradeoff_y", tradeoff_y, TradeoffY)
    run_dir = Path(run_dir)
    report = build_report(run_dir, **kw)
    # Wall time is the one number that differs between two runs of the same config and seed: report.md shows it,
    # report.json (the reproducible record) leaves it out.
    text = report_to_json({**report, "models": [{k: v for k, v in m.items() if k != "wall_time_s"}
                                                 for m in report["models"]]})
    atomic_write(run_dir / "report.json", lambda f: f.write(text.encode()))
    md = render_markdown(report)
    atomic_write(run_dir / "report.md", lambda f: f.write(md.encode()))
    for attack in report["attacks"]:
        _plot_relearn_curves(report, attack, run_dir / curves_plot_name(attack))
    _plot_tradeoff(report, run_dir / "robustness_vs_compute.png", tradeoff_y)
    _plot_retain_forget(report, run_dir / "retain_vs_forget.png")
    if "weights" in report["probes"]:
        _plot_interpolation(report, run_dir / "weight_interpolation.png")
    return json.loads(text)


def main(run_dir: str, steps: list[int] | None = None, metric: str | None = None, mode: Mode | None = None,
         retain_metric: str | None = None, max_retain_drop: float | Literal["off"] | None = None,
         attacks: list[str] | None = None, oracle: str | None = None, teacher: str | None = None,
         include_unlearning_compute: bool | None = None, tradeoff_y: TradeoffY | None = None) -> None:
    """Write report.md, report.json and plots for a finished run folder (``undo report RUN_DIR``).

    An option left out takes the run's own setting (the ``report:`` section and attack settings of the
    ``config.yaml`` that ``undo pipeline`` wrote there), else the library default; so ``undo report RUN`` rewrites
    the pipeline's report unchanged.

    Args:
        run_dir: experiment folder holding ``<stage>/metrics.json`` and ``relearn/<stage>/lr=*_seed=*/curve.json``.
        steps: attack steps at which to report the worst-case forget metric (the last one is used for relative
            robustness); beyond the attack length the last evaluated step is used and shown (default 25, 100, 300).
        metric: forget metric: ``val/forget_acc`` (arithmetic, MCQ; default) or ``val/forget_ce`` (language).
        mode: attacker's direction: ``max`` for accuracy (default), ``min`` for cross-entropy.
        retain_metric: retain metric (default: ``metric`` with forget -> retain).
        max_retain_drop: ignore an LR run at a step once its retain metric is worse than at step 0 by more than this;
            ``off``: no retain floor, whatever the run's own setting (left out, the run's floor applies).
        attacks: attack settings to report, e.g. ``[forget, heldout]`` (default: every setting with runs).
        oracle: stage used as the oracle anchor (default: the stage with role ``oracle``).
        teacher: stage used as the unlearn-only anchor (default: the stage with role ``teacher``).
        include_unlearning_compute: add the teacher's unlearning FLOPs to the students' relative compute.
        tradeoff_y: y axis of the trade-off plot: ``forget`` (default) or ``relative_robustness``.
    """
    path = Path(run_dir)
    given = {"steps": steps, "metric": metric, "mode": mode, "retain_metric": retain_metric,
             "max_retain_drop": max_retain_drop, "attacks": attacks, "oracle": oracle, "teacher": teacher,
             "include_unlearning_compute": include_unlearning_compute, "tradeoff_y": tradeoff_y}
    settings = {**run_settings(path), **{k: v for k, v in given.items() if v is not None}}
    if max_retain_drop == "off":  # `null` cannot say this: an option left out is None too
        settings["max_retain_drop"] = None
    report = write_report(path, **settings)
    print((path / "report.md").read_text())
    plots = [curves_plot_name(a) for a in report["attacks"]]
    print("wrote " + ", ".join(str(path / n) for n in ("report.json", "report.md", *plots,
                                                         "robustness_vs_compute.png", "retain_vs_forget.png")))


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The report settings a pipeline run folder was made with: its ``config.yaml``'s ``report:`` section and the
    names of its attack settings (empty for a folder without ``config.yaml``)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    settings = dict(cfg.get("report") or {})  # checked against ReportSection when the pipeline read the config
    attacks = (cfg.get("relearn") or {}).get("attacks")
    if attacks:
        settings["attacks"] = list(attacks)
    return settings

