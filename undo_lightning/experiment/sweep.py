"""Relearning-attack sweep: every (model, LR, seed) attacked in its own folder, then the worst case over LRs.

Each model the pipeline produces (reference, oracle, unlearned teacher, UNDO students, baselines) is
fine-tuned on forget data with an LR x seed grid (docs/reference.md §8); what counts is the **worst case**,
the attacker's best LR at each step (:func:`undo_lightning.experiment.robustness.worst_case`). Layout under
``out_dir``::

    relearn/<model>/lr=<lr>_seed=<s>/           one run of the ``forget`` attack setting (another setting NAME:
                                                ``..._seed=<s>_NAME``, e.g. ``_heldout``, ``_retain``)
        tb/                                     TensorBoard events
        curve.json                              written last: marks the run finished (skipped on re-run)
    relearn_summary.json                        worst-case curves, values at chosen steps, AUC, steps to reach
                                                (``relearn_summary_NAME.json`` for another attack setting)

An **attack setting** is a name for one way of attacking: what the attacker trains on (``train_on``: forget data,
retain data only, or a retain/forget mixture) and the data it is given (e.g. forget data with half of the facts held
out). Curves record the setting's name (``"attack"``) and what it trained on (``"train_on"``); the report shows
every setting side by side.

A run folder without ``curve.json`` (interrupted) is deleted and redone; attacked models are not kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml

from undo_lightning.data import RetainForgetDataModule
from undo_lightning.experiment import reuse
from undo_lightning.experiment.report import default_retain_metric
from undo_lightning.experiment.robustness import (
    load_curves,
    lr_scores,
    recovery_threshold,
    refine_lrs,
    steps_to_reach,
    value_at,
    worst_case,
)
from undo_lightning.experiment.trainer import TRAINER_DEFAULTS, tensorboard_logger
from undo_lightning.io import check_choice, json_safe, write_json_atomic
from undo_lightning.models import is_hf_folder
from undo_lightning.modules.base import OptimizerConfig
from undo_lightning.modules.lora import LoraSettings
from undo_lightning.modules.relearn import (
    ATTACK_DESCRIPTIONS,
    Attack,
    RelearnAttackModule,
    check_setting_name,
    model_label,
)

log = logging.getLogger(__name__)

#: The paper's LR grid (docs/reference.md §8): 500 steps, evaluation every 5 steps, constant LR after a 1-step warm-up.
PAPER_LRS = (1e-3, 7e-4, 4e-4, 1e-4, 7e-5, 5e-5, 1e-5, 7e-6, 4e-6, 1e-6)
#: CPU defaults (docs/reference.md §14): 3e-4 was the attacker's best LR for the unlearned model; 3e-3 collapses retain
#: accuracy for every model and would add 50 % to the sweep's time.
CPU_LRS = (3e-4, 1e-3)
#: Forget metrics aggregated in the summary and the attacker's direction for each (``max``: higher = more relearned);
#: per-group accuracies ``val/forget_<group>_acc`` (e.g. per arithmetic problem form) join them when the curves
#: have them.
SUMMARY_METRICS = {"val/forget_acc": "max", "val/forget_ce": "min"}
#: Metrics whose final value per LR the summary lists (shows which LRs wreck the model's retain ability).
PER_LR_METRICS = ("val/forget_acc", "val/retain_acc", "val/forget_ce", "val/retain_ce")

DataSpec = Mapping[str, Any] | Callable[[int], RetainForgetDataModule] | None


# ----------------------------------------------------------------------------------------------------------------------
# names and folders


def format_lr(lr: float) -> str:
    """Stable, readable folder form of a learning rate: shortest round-trip positional decimal (``3e-4`` ->
    ``0.0003``, ``1e-6`` -> ``0.000001``)."""
    return np.format_float_positional(float(lr), trim="-")


def run_folder(out_dir: str | Path, model: str, lr: float, seed: int, attack: str = "forget") -> Path:
    """``<out_dir>/relearn/<model>/lr=<lr>_seed=<s>`` for the ``forget`` attack setting, ``..._<attack>`` for another
    setting name."""
    suffix = "" if attack == "forget" else f"_{attack}"
    return Path(out_dir) / "relearn" / model / f"lr={format_lr(lr)}_seed={seed}{suffix}"


def summary_path(out_dir: str | Path, attack: str = "forget") -> Path:
    return Path(out_dir) / ("relearn_summary.json" if attack == "forget" else f"relearn_summary_{attack}.json")


def parse_models(models: Sequence[str]) -> dict[str, str]:
    """``["name=path", "runs/x/oracle/hf", ...]`` -> ``{name: path}``; a plain path is named by :func:`model_label`.

    Raises:
        ValueError: no models, an empty name or path, a name that is not a plain folder name, or a duplicate name.
    """
    if not models:
        raise ValueError("models=[]: give at least one model folder (name=path or a path)")
    out: dict[str, str] = {}
    for spec in models:
        name, path = spec.split("=", 1) if "=" in spec else (model_label(spec), spec)
        if not name or not path or "/" in name or name in (".", ".."):
            raise ValueError(f"model {spec!r}: expected name=path or a path, with a plain folder name as name")
        if name in out:
            raise ValueError(f"model name {name!r} given twice ({out[name]!r} and {path!r}); name them with name=path")
        out[name] = path
    return out


def expected_steps(steps: int, eval_every: int) -> list[int]:
    """Evaluated attack steps: 0, every ``eval_every`` steps, and the last step."""
    grid = list(range(0, steps + 1, eval_every))
    return grid if grid[-1] == steps else [*grid, steps]


# ----------------------------------------------------------------------------------------------------------------------
# data


def data_kwargs_from_config(path: str) -> dict[str, Any]:
    """:meth:`RetainForgetDataModule.config_kwargs` of the ``data:`` section of a stage YAML (e.g.
    ``configs/arithmetic/pretrain.yaml``); a ``data:`` that names a file (``data: data.yaml``, relative to the stage
    YAML, as LightningCLI reads it) is read from there.

    Raises:
        ValueError: the file has no ``data:`` section.
    """
    with open(path) as f:
        data = (yaml.safe_load(f) or {}).get("data")
    if isinstance(data, str):
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), data)) as f:
            data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"config={path!r} has no 'data:' section to take the relearning data from")
    return RetainForgetDataModule.config_kwargs(data)


def _datamodule_factory(data: DataSpec, batch_size: int | None) -> Callable[[int], RetainForgetDataModule]:
    """Seed -> data module; one per seed, reused by every model and LR of that seed."""
    kwargs = None if callable(data) else RetainForgetDataModule.config_kwargs(data or {})
    cache: dict[int, RetainForgetDataModule] = {}

    def make(seed: int) -> RetainForgetDataModule:
        if seed not in cache:
            # the attack seed varies the sample order only: every seed evaluates the same prompts
            dm = data(seed) if kwargs is None else RetainForgetDataModule(**{**kwargs, "order_seed": seed})
            if batch_size is not None:
                dm.batch_size = batch_size
            cache[seed] = dm
        return cache[seed]

    return make


# ----------------------------------------------------------------------------------------------------------------------
# one run


#: the record of what an attack run's result depends on (:mod:`undo_lightning.experiment.reuse`), in its folder
RUN_RECORD = "run.json"


def run_records(models: Mapping[str, str], lrs: Sequence[float], seeds: Sequence[int], steps: int, eval_every: int,
                batch_size: int | None = None, data: DataSpec = None, attack: Attack = "forget",
                precision: str = "32-true", trainer: Mapping[str, Any] | None = None, setting: str | None = None,
                model_ids: Mapping[str, str] | None = None, module: Mapping[str, Any] | None = None,
                **summary_settings: Any) -> dict[tuple[str, float, int], dict[str, Any]]:
    """What each run of a sweep depends on, by ``(model name, lr, seed)``: written to ``<run>/run.json`` before the
    run starts, compared by later sweeps and pipeline re-runs (:mod:`undo_lightning.experiment.reuse`).

    Takes :func:`run_sweep`'s arguments; ``summary_settings`` (``report_steps``, ``reference``, ...) shape the summary,
    not the runs, and are ignored. A record holds the model's identity (``model_ids[name]``, e.g. a pipeline stage's
    digest, else its path) as its input, the LR, seed, setting, attack data, evaluated steps, batch size, data
    arguments (a factory by its qualified name), the attacker's module arguments (e.g. ``lora``) and the Trainer
    arguments that change what a run computes.
    """
    trainer = reuse.computed_trainer({"precision": precision, **(trainer or {})})
    data_id = f"{data.__module__}.{data.__qualname__}" if callable(data) else dict(data or {})
    setting = setting or attack
    return {(name, lr, seed): reuse.normalized({
        "inputs": {"model": (model_ids or {}).get(name, path)}, "lr": float(lr), "seed": int(seed),
        "setting": setting, "train_on": attack, "steps": expected_steps(steps, eval_every), "batch_size": batch_size,
        "data": data_id, "trainer": trainer, **({"module": dict(module)} if module else {})})
        for name, path in models.items() for lr in lrs for seed in seeds}


def _finished(folder: Path, lr: float, seed: int, attack: str, steps: list[int],
              record: Mapping[str, Any] | None = None) -> bool:
    """Whether ``folder/curve.json`` is a finished run of exactly this configuration: same LR, seed, attack setting
    and evaluated steps, and, when the folder holds a :data:`RUN_RECORD` (runs written before records existed have
    none), the same ``record``."""
    path = folder / "curve.json"
    if not path.is_file():
        return False
    if record is not None and (folder / RUN_RECORD).is_file() and reuse.read_record(folder / RUN_RECORD) != record:
        return False
    try:
        with open(path) as f:
            curve = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (curve.get("attack") == attack and curve.get("seed") == seed and curve.get("steps") == steps
            and math.isclose(float(curve.get("lr", math.nan)), lr, rel_tol=1e-12))


def _check_no_foreign_runs(out_dir: str | Path, setting: str, grid: list[int], records: Mapping[tuple[str, float, int], Mapping[str, Any]]) -> None:
    """Refuses, before any run, to overwrite a FINISHED run of another configuration (another model, data, step
    count, evaluation cadence, ...) in a folder this sweep would use: e.g. ``undo relearn --out_dir`` pointed at a
    pipeline's run folder would otherwise delete its attack runs and mix two attacks in one summary."""
    foreign = [str(folder) for (name, lr, seed), record in records.items()
               if (folder := run_folder(out_dir, name, lr, seed, setting) / "curve.json").is_file()
               and not _finished(folder.parent, lr, seed, setting, grid, record)]
    if foreign:
        raise ValueError(f"{len(foreign)} finished attack run(s) of another configuration are in the way (e.g. "
                         f"{foreign[0]}: another model, data, step count or evaluation cadence); attack into "
                         "another out_dir, name this attack setting differently (setting=...), or delete those "
                         "folders to redo them")


@contextlib.contextmanager
def quiet():
    """Hides Lightning's per-run banners and transformers' loading bars during a sweep of many short runs."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("lightning.pytorch")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


#: Trainer settings of every attack run (docs/reference.md §8: gradient clip 1.0); ``trainer=`` may override them.
#: Trainer settings the sweep fixes (a ``trainer=`` value for them must agree) and the ones it sets per run.
_FIXED_TRAINER = {"check_val_every_n_epoch": None, "enable_checkpointing": False}
ATTACK_TRAINER: dict[str, Any] = {k: v for k, v in TRAINER_DEFAULTS.items() if k not in _FIXED_TRAINER} | {
    "enable_progress_bar": False}
_PER_RUN_TRAINER = ("max_steps", "val_check_interval", "default_root_dir", "logger")


def run_attack(model: str, name: str, lr: float, seed: int, folder: str | Path, datamodule: RetainForgetDataModule,
               steps: int, eval_every: int, attack: str = "forget", trainer: Mapping[str, Any] | None = None,
               setting: str | None = None, module: Mapping[str, Any] | None = None) -> dict:
    """One attack run in ``folder`` (TensorBoard events in ``folder/tb``, ``folder/curve.json`` written last).

    Args:
        model: HF folder of the model under attack.
        name: its name in ``curve.json``.
        lr: constant learning rate (1-step warm-up, weight decay 0, docs/reference.md §8).
        seed: recorded with the curve; seeds Lightning's RNGs.
        folder: the run folder (``default_root_dir``).
        datamodule: serves ``attack`` training batches and the validation sets.
        steps: optimizer steps.
        eval_every: validation interval in steps (plus step 0 and the last step).
        attack: what the attacker trains on: ``forget``, ``retain`` (retain-only attack, arXiv 2505.22310) or
            ``mixture`` (the data module's retain/forget mixture).
        trainer: Lightning Trainer arguments over :data:`ATTACK_TRAINER`.
        setting: the attack setting's name recorded in ``curve.json`` (default: ``attack``).
        module: further :class:`RelearnAttackModule` arguments (:data:`MODULE_KEYS`), e.g. ``{"lora": {"rank": 8}}``.

    Returns:
        The curve dict written to ``curve.json``.
    """
    L.seed_everything(seed, verbose=False)
    module = dict(module or {})
    optimizer = {**module.pop("optimizer", {}), "lr": lr}
    module = RelearnAttackModule(model=model, attack=attack, name=name, optimizer=optimizer, seed=seed,
                                 setting=setting, **module)
    settings = {**ATTACK_TRAINER, "log_every_n_steps": min(eval_every, 50), **(trainer or {}), **_FIXED_TRAINER}
    L.Trainer(max_steps=steps, val_check_interval=eval_every, default_root_dir=str(folder),
              logger=tensorboard_logger(folder), **settings).fit(module, datamodule=datamodule)
    return module.curve()


# ----------------------------------------------------------------------------------------------------------------------
# the sweep


#: the attacker's module arguments an attack setting may set (the sweep sets the model, LR, seed, data and names)
MODULE_KEYS = ("lora", "optimizer")


def check_module_settings(module: Mapping[str, Any] | None) -> None:
    """Checks an attack setting's :class:`RelearnAttackModule` arguments (``lora``; ``optimizer`` without ``lr``).

    Raises:
        ValueError: naming the bad key or value and what would be accepted.
    """
    module = dict(module or {})
    unknown = sorted(set(module) - set(MODULE_KEYS))
    if unknown:
        raise ValueError(f"model: {unknown} cannot be set per attack setting (the sweep sets the attacked model, LR, "
                         f"seed, data and names); expected some of {list(MODULE_KEYS)}")
    LoraSettings.of(module.get("lora"))
    optimizer = module.get("optimizer") or {}
    if "lr" in optimizer:
        raise ValueError(f"model.optimizer.lr={optimizer['lr']}: the attack's learning rates are the sweep's `lrs`")
    OptimizerConfig.of(optimizer, RelearnAttackModule.default_optimizer)


def check_sweep_settings(lrs: Sequence[float], seeds: Sequence[int], steps: int, eval_every: int, attack: str,
                         setting: str, batch_size: int | None, trainer: Mapping[str, Any],
                         report_steps: Sequence[int] | None, recovery_fraction: float,
                         module: Mapping[str, Any] | None = None, search_rounds: int = 0,
                         max_retain_drop: float | None = None) -> None:
    """Checks a sweep's settings (everything but the models, which may not exist yet); see :func:`run_sweep`.

    Raises:
        ValueError: naming the bad setting and what would be accepted.
    """
    if not lrs:
        raise ValueError("lrs=[]: the LR grid is empty; give at least one learning rate (paper grid: "
                         f"{list(PAPER_LRS)})")
    bad = [lr for lr in lrs if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0)]
    if bad:
        raise ValueError(f"lrs={list(lrs)}: learning rates must be positive finite numbers, got {bad}")
    if len({format_lr(lr) for lr in lrs}) != len(lrs):
        raise ValueError(f"lrs={list(lrs)}: duplicate learning rates")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)}: expected a non-empty list of distinct integers")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps={steps}, eval_every={eval_every}: expected positive integers")
    check_choice("attack", attack, Attack)
    check_setting_name(setting)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    if report_steps is not None and (not report_steps or min(report_steps) < 0):
        raise ValueError(f"report_steps={report_steps}: expected a non-empty list of attack steps >= 0")
    if not 0 < recovery_fraction <= 1:
        raise ValueError(f"recovery_fraction={recovery_fraction}: expected a fraction in (0, 1]")
    if isinstance(search_rounds, bool) or not isinstance(search_rounds, int) or search_rounds < 0:
        raise ValueError(f"search_rounds={search_rounds!r}: expected an integer >= 0 (0: the LR grid only)")
    if max_retain_drop is not None and not (math.isfinite(max_retain_drop) and max_retain_drop >= 0):
        raise ValueError(f"max_retain_drop={max_retain_drop}: expected a number >= 0 (the retain floor) or null")
    managed = [k for k in trainer if k in _PER_RUN_TRAINER or (k in _FIXED_TRAINER and trainer[k] != _FIXED_TRAINER[k])]
    if managed:
        raise ValueError(f"trainer settings {managed} are set by the relearning sweep (steps, eval_every, run folders, "
                         f"TensorBoard logger, {_FIXED_TRAINER}); remove them")
    check_module_settings(module)


def _check_sweep_args(models: Mapping[str, str], lrs: Sequence[float], seeds: Sequence[int], steps: int,
                      eval_every: int, attack: str, setting: str, batch_size: int | None,
                      trainer: Mapping[str, Any], report_steps: Sequence[int] | None,
                      recovery_fraction: float, module: Mapping[str, Any] | None, search_rounds: int,
                      max_retain_drop: float | None) -> None:
    if not models:
        raise ValueError("models={}: nothing to attack")
    check_sweep_settings(lrs, seeds, steps, eval_every, attack, setting, batch_size, trainer, report_steps,
                         recovery_fraction, module, search_rounds, max_retain_drop)
    for name, path in models.items():
        if not is_hf_folder(path):
            raise ValueError(f"model {name!r}: {path!r} is not a Hugging Face model folder (no config.json there); "
                             "has its stage finished?")


def _check_vocabularies(models: Mapping[str, str], n_tokens: int) -> None:
    """Fails before any run when a model's embedding cannot hold the data tokenizer's ids."""
    for name, path in models.items():
        with open(os.path.join(path, "config.json")) as f:
            vocab = json.load(f).get("vocab_size")
        if vocab is not None and vocab < n_tokens:
            raise ValueError(f"model {name!r} ({path}) has vocab_size={vocab} but the data tokenizer has {n_tokens} "
                             "tokens; attack it with the data/tokenizer it was trained on (data_config=...)")


def run_sweep(models: Mapping[str, str], lrs: Sequence[float], seeds: Sequence[int], out_dir: str | Path,
              steps: int, eval_every: int, batch_size: int | None = None, data: DataSpec = None,
              attack: Attack = "forget", precision: str = "32-true",
              trainer: Mapping[str, Any] | None = None, report_steps: Sequence[int] | None = None,
              reference: str | None = "reference", recovery_fraction: float = 0.9,
              setting: str | None = None, model_ids: Mapping[str, str] | None = None,
              module: Mapping[str, Any] | None = None, search_rounds: int = 0,
              max_retain_drop: float | None = None) -> dict:
    """Attack every model with every (LR, seed), then write ``relearn_summary.json`` (see :func:`summarize`).

    Finished runs (``curve.json`` of the same LR, seed, attack setting and evaluated steps, and a ``run.json`` record,
    :func:`run_records`, equal to this sweep's) are skipped; a run folder without one is deleted and redone; a finished
    run of another configuration is refused. All arguments are checked, and the data built, before the first run
    starts.

    Args:
        models: ``{name: HF folder}``; the name is the folder under ``relearn/`` (use the stage name so
            ``undo report`` finds it).
        lrs: learning-rate grid (paper: :data:`PAPER_LRS`; CPU: :data:`CPU_LRS`).
        seeds: attack seeds; each is the data module's ``order_seed`` (the order of the attack's training batches;
            documents and evaluation prompts stay those of the data's ``seed``) and is recorded in the curve. A
            factory ``data`` receives the seed and decides itself.
        out_dir: experiment folder (runs go to ``out_dir/relearn/``).
        steps: attack steps per run (paper: 500).
        eval_every: evaluation interval (paper: 5); step 0 and the last step are always evaluated.
        batch_size: training batch size, overriding the data's (paper arithmetic: 15; CPU: 32).
        data: ``RetainForgetDataModule`` keyword arguments (``order_seed`` is set to the run seed), or a factory
            ``seed -> RetainForgetDataModule``; default: the arithmetic setting's defaults.
        attack: what the attacker trains on: ``forget`` (the paper's attack), ``retain`` (retain-only attack, arXiv
            2505.22310) or ``mixture`` (the data's ``mixture``, e.g. the authors' pretraining mix).
        precision: Lightning precision (``32-true`` on CPU; ``bf16-mixed`` on GPU, docs/reference.md §13).
        trainer: further Lightning Trainer arguments of every run (e.g. ``accelerator``, ``devices``; a
            ``precision`` here wins over ``precision``); see :data:`ATTACK_TRAINER`.
        report_steps: steps at which the summary reports the worst-case values (default: ``eval_every``, ``steps/2``,
            ``steps``).
        reference: model name whose step-0 forget accuracy defines "recovered" (``steps_to_reach``); ignored if absent.
        recovery_fraction: fraction of the reference's forget accuracy that counts as recovered.
        setting: name of this attack setting (run folder suffix, ``curve.json["attack"]``, summary file); default:
            ``attack``.
        model_ids: identity of each model in the runs' records (the pipeline passes its stages' digests, so that a
            redone stage's runs are redone); default: the model's path.
        module: further attacker arguments of every run (:data:`MODULE_KEYS`): ``lora`` (a LoRA attacker,
            :class:`~undo_lightning.modules.lora.LoraSettings`) and ``optimizer`` fields but ``lr``.
        search_rounds: rounds of the attacker's LR search after the grid (:func:`search_lrs`), per model: each round
            tries the geometric midpoints between the best LR so far and its neighbours (one step outward at an end
            of the grid), every seed. 0: the grid only.
        max_retain_drop: the retain floor of the search: a step at which a run's retain accuracy fell more than this
            below its start does not count for its LR (the report's utility bound); ``None``: no floor.

    Returns:
        The summary dict (also written to :func:`summary_path`).
    """
    trainer = {"precision": precision, **(trainer or {})}
    setting = setting or attack
    _check_sweep_args(models, lrs, seeds, steps, eval_every, attack, setting, batch_size, trainer, report_steps,
                      recovery_fraction, module, search_rounds, max_retain_drop)
    make_data = _datamodule_factory(data, batch_size)
    datamodule = make_data(seeds[0])
    datamodule.setup()
    datamodule.train_blocks(attack)  # raises, naming the split, when the attack's training split is empty
    _check_vocabularies(models, len(datamodule.tokenizer))
    grid = expected_steps(steps, eval_every)
    records = run_records(models, lrs, seeds, steps, eval_every, batch_size, data, attack, trainer=trainer,
                          setting=setting, model_ids=model_ids, module=module)
    _check_no_foreign_runs(out_dir, setting, grid, records)
    total = len(models) * len(lrs) * len(seeds)
    log.info("attack setting %r, %s%s: %d models x %d LRs x %d seeds = %d runs of %d steps in %s", setting,
             ATTACK_DESCRIPTIONS[attack], _attacker(module, datamodule), len(models), len(lrs), len(seeds), total,
             steps, Path(out_dir) / "relearn")
    progress = {"done": 0, "total": total}

    def attack_once(name: str, lr: float, seed: int, record: Mapping[str, Any]) -> None:
        progress["done"] += 1
        where = f"[{progress['done']}/{progress['total']}] {name} lr={format_lr(lr)} seed={seed}"
        folder = run_folder(out_dir, name, lr, seed, setting)
        if _finished(folder, lr, seed, setting, grid, record):
            log.info("%s: finished earlier, skipped", where)
            return
        if folder.exists():  # interrupted (no curve.json; finished foreign runs were refused above)
            log.info("%s: removing unfinished run folder %s", where, folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        reuse.write_record(folder / RUN_RECORD, record)
        started = time.perf_counter()
        with quiet():
            curve = run_attack(models[name], name, lr, seed, folder, make_data(seed), steps, eval_every, attack,
                               trainer, setting, module)
        metrics = curve["metrics"]
        log.info("%s: forget_acc %s -> %s, retain_acc %s -> %s (%.1f s)", where, *_ends(metrics.get("val/forget_acc")),
                 *_ends(metrics.get("val/retain_acc")), time.perf_counter() - started)

    for name in models:
        for seed in seeds:
            for lr in lrs:
                attack_once(name, lr, seed, records[name, lr, seed])
    tried = {name: [float(lr) for lr in lrs] for name in models}
    for round_ in range(1, search_rounds + 1):  # the attacker's LR search, per model (it attacks one model)
        for name in models:
            new = search_lrs(out_dir, name, setting, tried[name], seeds, max_retain_drop)
            progress["total"] += len(new) * len(seeds)
            for lr in new:
                log.info("%s: attacker search round %d tries lr=%s", name, round_, format_lr(lr))
                for seed in seeds:
                    attack_once(name, lr, seed, search_record(records[name, lrs[0], seeds[0]], lr, seed, round_))
            tried[name] += new
    runs = sorted({(lr, int(seed)) for name in models for lr in tried[name] for seed in seeds})
    summary = summarize(out_dir, list(models), attack=setting, train_on=attack,
                        report_steps=report_steps or _default_report_steps(steps, eval_every), reference=reference,
                        recovery_fraction=recovery_fraction, runs=runs)
    summary.update({"paths": dict(models), "lrs": [float(lr) for lr in lrs], "seeds": list(seeds),
                    "attack_steps": steps, "eval_every": eval_every, "precision": trainer["precision"],
                    "batch_size": make_data(seeds[0]).batch_size})
    if search_rounds:
        summary["search"] = {"rounds": search_rounds, "max_retain_drop": max_retain_drop,
                             "lrs": {name: sorted(tried[name]) for name in models}}
    write_json_atomic(str(summary_path(out_dir, setting)), json_safe(summary))
    return summary


def search_lrs(out_dir: str | Path, model: str, setting: str, tried: Sequence[float], seeds: Sequence[int],
               max_retain_drop: float | None) -> list[float]:
    """One round of the attacker's LR search for ``model``: the LRs :func:`~undo_lightning.experiment.robustness.
    refine_lrs` proposes from the finished runs of the ``tried`` LRs, which are scored by the best forget accuracy
    (forget CE when the runs have no accuracy) reached at a step within the retain floor, mean over ``seeds``."""
    wanted = {(float(lr), int(seed)) for lr in tried for seed in seeds}
    metric, mode = next((m, d) for m, d in SUMMARY_METRICS.items()
                        if m in _metric_names(out_dir, model, setting, sorted(wanted)))
    curves = {k: c for k, c in load_curves(out_dir, model, metric, setting).items() if k in wanted}
    retain = None
    if max_retain_drop is not None:
        retain = {k: c for k, c in load_curves(out_dir, model, default_retain_metric(metric), setting).items()
                  if k in wanted}
    scores = lr_scores(curves, mode, retain, max_retain_drop, retain_higher_is_better=metric.endswith("_acc"))
    return refine_lrs(scores, mode)


def search_record(grid_record: Mapping[str, Any], lr: float, seed: int, round_: int) -> dict[str, Any]:
    """The record of a search run: its model's grid record with this LR and seed, and the search round."""
    return reuse.normalized({**grid_record, "lr": float(lr), "seed": int(seed), "search_round": round_})


def _attacker(module: Mapping[str, Any] | None, datamodule: RetainForgetDataModule) -> str:
    """What sets the attacker apart from full fine-tuning on all of its data, for the sweep's log line."""
    lora = LoraSettings.of((module or {}).get("lora"))
    parts = [f"LoRA attacker (rank {lora.rank}, alpha {lora.alpha:g}, targets {lora.target_modules})"] if lora else []
    if getattr(datamodule, "few_shot", None) is not None:
        parts.append(f"few-shot: {datamodule.few_shot} forget documents, repeated")
    return "".join(f"; {p}" for p in parts)


def _ends(values: list | None) -> tuple[str, str]:
    if not values:
        return "n/a", "n/a"
    return tuple("n/a" if v is None else f"{v:.3f}" for v in (values[0], values[-1]))


def _default_report_steps(steps: int, eval_every: int) -> list[int]:
    return sorted({min(eval_every, steps), steps // 2, steps})


# ----------------------------------------------------------------------------------------------------------------------
# aggregation


def _metric_names(out_dir: str | Path, model: str, attack: str, runs: Sequence[tuple[float, int]] | None) -> set[str]:
    """Metrics present in every curve of ``model``'s runs of ``attack`` (those in ``runs`` if given)."""
    names: set[str] | None = None
    for path in sorted((Path(out_dir) / "relearn" / model).glob("*/curve.json")):
        with open(path) as f:
            curve = json.load(f)
        if curve.get("attack", "forget") == attack and (runs is None or (curve["lr"], curve["seed"]) in set(runs)):
            names = set(curve["metrics"]) if names is None else names & set(curve["metrics"])
    return names or set()


def _load(out_dir, model: str, metric: str, attack: str, runs: Sequence[tuple[float, int]] | None) -> dict:
    curves = load_curves(out_dir, model, metric, attack)
    return curves if runs is None else {key: c for key, c in curves.items() if key in set(runs)}


def summarize(out_dir: str | Path, models: Sequence[str], attack: str = "forget",
              report_steps: Sequence[int] = (25, 100, 200), reference: str | None = "reference",
              recovery_fraction: float = 0.9, runs: Sequence[tuple[float, int]] | None = None,
              train_on: Attack | None = None) -> dict:
    """Worst-case relearning summary of finished runs (the aggregation of :mod:`undo_lightning.experiment.robustness`).

    Per model and forget metric (:data:`SUMMARY_METRICS`, those present): the worst-case curve over LRs (mean and std
    over seeds), its value at ``report_steps`` (or the last evaluated step before) and its AUC (mean level). For
    forget accuracy, also the first step at which the worst case reaches ``recovery_fraction`` of the ``reference``
    model's step-0 forget accuracy (``None``: never within the attack). Per LR: the final values of
    :data:`PER_LR_METRICS`, mean over seeds.

    Args:
        out_dir: the sweep's experiment folder.
        models: model names under ``relearn/``.
        attack: which attack setting's runs to aggregate.
        report_steps: attack steps to report.
        reference: model name defining the recovery threshold (skipped when not among ``models``).
        recovery_fraction: fraction of the reference's step-0 forget accuracy that counts as recovered.
        runs: the ``(lr, seed)`` runs to aggregate (default: every run found, e.g. also LRs of an earlier sweep).
        train_on: what that setting trains on (default: ``attack``, a setting named after its data).

    Returns:
        ``{"attack", "train_on", "attack_description", "report_steps", "reference", "recovery_fraction",
        "recovery_threshold",
        "models": {name: {"worst_case": {metric: {...}}, "steps_to_reach": int | None, "final_by_lr": {...}}}}``.
    """
    train_on = train_on or attack
    out: dict[str, Any] = {"attack": attack, "train_on": train_on,
                           "attack_description": ATTACK_DESCRIPTIONS[train_on], "report_steps": list(report_steps),
                           "reference": None,
                           "recovery_fraction": recovery_fraction, "recovery_threshold": None, "models": {}}
    for name in models:
        available = _metric_names(out_dir, name, attack, runs)
        entry: dict[str, Any] = {"worst_case": {}, "steps_to_reach": None, "final_by_lr": {}}
        for metric, mode in summary_metrics(available).items():
            summary = worst_case(_load(out_dir, name, metric, attack, runs), mode).summary(report_steps)
            summary["at"] = {str(a.pop("requested_step")): a for a in summary["at"]}
            entry["worst_case"][metric] = {"mode": mode, **summary}
        for metric in PER_LR_METRICS:
            if metric not in available:
                continue
            finals: dict[float, list[float]] = {}
            for (lr, _), curve in _load(out_dir, name, metric, attack, runs).items():
                finals.setdefault(lr, []).append(float(curve.values[-1]))
            for lr, values in finals.items():
                entry["final_by_lr"].setdefault(format_lr(lr), {})[metric] = float(np.mean(values))
        out["models"][name] = entry
    ref = out["models"].get(reference, {}).get("worst_case", {}).get("val/forget_acc") if reference else None
    if ref is not None:
        threshold = recovery_threshold(value_at(ref["steps"], ref["mean"], 0), recovery_fraction)
        out["reference"], out["recovery_threshold"] = reference, threshold
        for entry in out["models"].values():
            wc = entry["worst_case"].get("val/forget_acc")
            if wc is not None:
                entry["steps_to_reach"] = steps_to_reach(wc["steps"], wc["mean"], threshold, "max")
    return out


def summary_metrics(available: set[str]) -> dict[str, str]:
    """The forget metrics among ``available`` that the summary aggregates, with the attacker's direction."""
    groups = {m for m in available if m.startswith("val/forget_") and m.endswith("_acc") and m not in SUMMARY_METRICS
              and not m.endswith("_mcq_acc")}
    metrics = {**SUMMARY_METRICS, **dict.fromkeys(sorted(groups), "max")}
    return {m: mode for m, mode in metrics.items() if m in available}


def format_summary(summary: dict, metric: str = "val/forget_acc") -> str:
    """Text table of the worst-case ``metric`` curve per model (rows: models, columns: evaluated steps, then AUC and,
    for forget accuracy, the steps to reach the recovery threshold)."""
    curves = {n: e["worst_case"][metric] for n, e in summary["models"].items() if metric in e["worst_case"]}
    if not curves:
        return f"no {metric} curves"
    reach = metric == "val/forget_acc"
    steps = next(iter(curves.values()))["steps"]
    width = max(len(n) for n in curves)
    lines = [f"attack setting {summary['attack']!r}: {summary['attack_description']}",
             f"worst case over LRs of {metric} (mean over seeds) by attack step:",
             f"{'model':<{width}} " + " ".join(f"{s:>6d}" for s in steps) + "    AUC" + ("  reached" if reach else "")]
    for name, c in curves.items():
        values = dict(zip(c["steps"], c["mean"]))
        cells = " ".join(_cell(values.get(s)) for s in steps)
        row = f"{name:<{width}} {cells} {_cell(c['auc'])}"
        if reach:
            step = summary["models"][name]["steps_to_reach"]
            row += f"  {step if step is not None else '-':>7}"
        lines.append(row)
    if reach and summary.get("reference"):
        lines.append(f"reached: first step with worst-case {metric} >= {summary['recovery_threshold']:.3f} "
                     f"({summary['recovery_fraction']:.0%} of {summary['reference']}'s step-0 value)")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>6}" if value is None or not math.isfinite(value) else f"{value:6.3f}"


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def relearn_command(models: list[str], lrs: list[float] = list(CPU_LRS), seeds: list[int] = [0],  # noqa: B006
                    steps: int = 200, eval_every: int = 25, out_dir: str = "runs/arithmetic",
                    attack: Attack = "forget", setting: str | None = None, data_config: str | None = None,
                    batch_size: int = 32, eval_prompts_per_set: int | None = 50, precision: str = "32-true",
                    report_steps: list[int] | None = None, reference: str | None = "reference",
                    recovery_fraction: float = 0.9, accelerator: str = "auto", devices: int = 1,
                    lora: LoraSettings | None = None, few_shot: int | None = None, search_rounds: int = 0,
                    max_retain_drop: float | None = None) -> None:
    """Run the relearning attack (LR x seed sweep) on model folders and write relearn_summary.json.

    Example (CPU arithmetic setting)::

        undo relearn '[runs/arithmetic/reference/hf, runs/arithmetic/unlearn_maxent/hf]' --data_config \\
            configs/arithmetic/pretrain.yaml

    Paper setting (docs/reference.md §8): ``--lrs '[1e-3,7e-4,4e-4,1e-4,7e-5,5e-5,1e-5,7e-6,4e-6,1e-6]' --steps 500
    --eval_every 5 --batch_size 15 --precision bf16-mixed``.

    Args:
        models: model folders as a YAML list, e.g. ``'[runs/x/oracle/hf, teacher=runs/x/unlearn_maxent/hf]'``: each
            ``name=path`` or a plain path (a path ending in ``/hf`` is named after its parent folder, i.e. its stage).
        lrs: learning-rate grid; each LR is a separate run (CPU default 3e-4, 1e-3).
        seeds: attack seeds (the data module's seed of each run).
        steps: attack steps per run.
        eval_every: evaluate forget/retain metrics every this many steps (and at step 0 and the end).
        out_dir: experiment folder; runs go to ``<out_dir>/relearn/<model>/lr=<lr>_seed=<s>/``.
        attack: ``forget`` fine-tunes on forget data (the paper's attack); ``retain`` fine-tunes on retain data only
            (retain-only attack of "From Dormant to Deleted", arXiv 2505.22310) and still measures forget metrics;
            ``mixture`` fine-tunes on the config's retain/forget ``mixture``.
        setting: name of this attack setting (run folders ``..._seed=<s>_<setting>``; default: ``attack``).
        data_config: a stage YAML whose ``data:`` section describes the data (default: the arithmetic setting).
            Not ``--config``: that option is the command's own (a YAML of these options), as for every command.
        batch_size: attack batch size (overrides the config's).
        eval_prompts_per_set: evaluation prompts per answer-scored set (overrides the config's; ``null`` keeps it).
            Evaluation dominates a CPU sweep's cost.
        precision: Lightning precision of each run.
        report_steps: attack steps reported in the summary (default: first evaluation, middle, end).
        reference: model name defining "recovered" (``recovery_fraction`` of its step-0 forget accuracy).
        recovery_fraction: see ``reference``.
        accelerator: Lightning accelerator.
        devices: devices per run.
        lora: a LoRA attacker (rank, alpha, target modules) instead of full fine-tuning, e.g. ``--lora.rank 8``.
        few_shot: the attacker holds only this many forget documents, repeated (the few-shot attack).
        search_rounds: rounds of the attacker's LR search per model after the grid (midpoints around the best LR).
        max_retain_drop: the search's retain floor: steps at which retain accuracy fell more than this do not count.
    """
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    data: dict[str, Any] = data_kwargs_from_config(data_config) if data_config else {}
    if eval_prompts_per_set is not None:
        data["eval_prompts_per_set"] = eval_prompts_per_set
    if few_shot is not None:
        data["few_shot"] = few_shot
    module = {"lora": dataclasses.asdict(LoraSettings.of(lora))} if lora is not None else None
    summary = run_sweep(parse_models(models), lrs, seeds, out_dir, steps, eval_every, batch_size=batch_size,
                        data=data, attack=attack, setting=setting, precision=precision,
                        trainer={"accelerator": accelerator, "devices": devices}, report_steps=report_steps,
                        reference=reference, recovery_fraction=recovery_fraction, module=module,
                        search_rounds=search_rounds, max_retain_drop=max_retain_drop)
    print(format_summary(summary))
    for metric in next(iter(summary["models"].values()))["worst_case"]:  # per-group tables (e.g. problem forms)
        if metric not in SUMMARY_METRICS:
            print()
            print(format_summary(summary, metric))
    print(f"\nwrote {summary_path(out_dir, setting or attack)}")
