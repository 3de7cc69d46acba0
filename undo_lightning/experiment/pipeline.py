"""``undo pipeline``: the whole UNDO experiment (docs/architecture.md) in one resumable command.

Stages run in order, each in ``<out_dir>/<stage>/`` and each reading its inputs from earlier stages' exported
``hf/`` folders::

    reference, oracle          PretrainModule (retain+forget / retain only); or ``{model: PATH}``: an existing model,
                               only evaluated; ``oracle: null`` leaves the oracle out
    unlearn                    UnlearnModule on the reference (the teacher; MaxEnt by default)
    <baseline>                 optional further UnlearnModule runs (e.g. MaxEnt+SAM, RepNoise, RMU)
    distill                    DistillModule: the teacher into a random student (full distillation)
    undo_a<alpha>              DistillModule: the teacher into its own noised copy, one per alpha (UNDO)
    <student>                  optional further DistillModule runs whose teacher / student init may name a stage
                               (oracle matching, distilling a baseline teacher)
    relearn/<model>/...        relearning attack on every model over an LR x seed grid
    report.md/.json/*.png      tables and plots

Each stage and attack run records what its result depends on (``<stage>/stage.json``, ``<run>/run.json``; see
:mod:`undo_lightning.experiment.reuse`). A re-run reuses every finished stage and run whose record is unchanged
(an interrupted stage resumes from ``checkpoints/last.ckpt``), redoes those whose settings or inputs changed, removes
those the config no longer has, and logs which and why. ``config.yaml`` (the resolved experiment) is written before
any training; a folder holding another experiment (another ``name``) is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from undo_lightning.experiment import reuse
from undo_lightning.experiment.config import DEFAULT_CONFIG, check_keys, finish, load_config, parser
from undo_lightning.experiment.report import Role
from undo_lightning.experiment.trainer import TRAINER_DEFAULTS, tensorboard_logger
from undo_lightning.io import did_you_mean, import_object, instantiate

DONE = "DONE"
#: the record of what a stage's result depends on, in its folder (see :func:`stage_records`)
STAGE_RECORD = "stage.json"
#: Stage Trainer defaults (a config's ``trainer:`` overrides them).
STAGE_TRAINER = {**TRAINER_DEFAULTS, "log_every_n_steps": 25}


@dataclass
class Stage:
    """One training stage: which module class, its arguments, and the data/Trainer overrides it runs with."""

    name: str
    role: Role
    module_cls: str
    module: dict[str, Any]
    trainer: dict[str, Any]
    data: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for metrics.json (role, alpha, beta)
    hf: str = ""  # the model folder (or hub id) later stages and the attack read
    evaluate_only: bool = False  # an existing model: validated once, not trained


def deep_merge(base: dict, override: dict | None) -> dict:
    """``base`` updated recursively with ``override`` (per-stage settings override shared ones). An object of another
    class (a different ``class_path``) replaces the base object whole: its ``init_args`` are another signature's."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        old = out.get(key)
        merge = isinstance(value, dict) and isinstance(old, dict) and value.get("class_path", old.get("class_path")) \
            == old.get("class_path")
        out[key] = deep_merge(old, value) if merge else copy.deepcopy(value)
    return out


def plan(cfg: dict) -> list[Stage]:
    """The ordered training stages of an experiment config (the relearning sweep and the report come after).

    ``reference`` / ``oracle`` are pretrained (with the ``pretrain`` settings overridden by their own section) unless
    their ``model`` is a string — an existing model folder or hub id that is only evaluated, e.g. the pretrained LLM
    to unlearn — or, for the oracle, the section is ``null``: no oracle (relative robustness and compute become –).

    Args:
        cfg: a resolved config (:func:`~undo_lightning.experiment.config.load_config`).
    """
    out = Path(cfg["out_dir"])
    seed = cfg["seed"]
    stages = []
    for role, mixture in ((Role.REFERENCE, {"retain": 0.5, "forget": 0.5}), (Role.ORACLE, {"retain": 1.0})):
        name = role.value
        own = cfg.get(name, {})
        if own is None:
            if role == Role.REFERENCE:
                raise ValueError("reference: null: every experiment needs a reference (the model to unlearn); give "
                                 "`reference: {model: PATH}` to use an existing model instead of pretraining one")
            continue
        if not isinstance(own, dict):
            raise ValueError(f"{name}: {own!r}: expected a section (pretrain overrides such as `model:`/`trainer:`, "
                             f"or `{{model: PATH_OR_HUB_ID}}` for an existing model)"
                             + (" or null" if role == Role.ORACLE else ""))
        if isinstance(own.get("model"), str):
            if not own["model"] or own.get("trainer"):
                raise ValueError(f"{name}: {own}: an existing model is given as `{name}: {{model: PATH_OR_HUB_ID}}` "
                                 "(optionally with `data:` overrides for its evaluation); it is not trained, so it "
                                 "takes no `trainer:` — give `model:` a mapping of PretrainModule arguments to "
                                 "pretrain this stage instead")
            stages.append(Stage(name, role, "undo_lightning.PretrainModule", {"model": own["model"], "seed": seed}, {},
                                deep_merge({"mixture": mixture}, own.get("data")), hf=own["model"],
                                evaluate_only=True))
            continue
        spec = deep_merge(cfg.get("pretrain", {}), own)
        stages.append(Stage(name, role, "undo_lightning.PretrainModule", {"seed": seed, **spec.get("model", {})},
                            spec.get("trainer", {}), deep_merge({"mixture": mixture}, spec.get("data")),
                            hf=str(out / name / "hf")))
    if cfg.get("oracle_exposure", "equal_steps") == "equal_retain_tokens":
        _equal_retain_tokens(cfg, stages)
    reference = stages[0].hf
    hf = lambda stage: str(out / stage / "hf")  # noqa: E731 - the hand-off convention of docs/architecture.md
    unlearn = cfg.get("unlearn", {})
    stages.append(Stage("unlearn", Role.TEACHER, "undo_lightning.UnlearnModule",
                        {"model": reference, "seed": seed, **unlearn.get("model", {})},
                        unlearn.get("trainer", {}), unlearn.get("data", {}), hf=hf("unlearn")))
    for name, spec in (cfg.get("baselines") or {}).items():
        spec = deep_merge(unlearn, spec)
        stages.append(Stage(name, Role.BASELINE, "undo_lightning.UnlearnModule",
                            {"model": reference, "seed": seed, **spec.get("model", {})},
                            spec.get("trainer", {}), spec.get("data", {}), hf=hf(name)))
    distill = cfg.get("distill", {})
    if distill is not None:
        stages.append(Stage("distill", Role.STUDENT, "undo_lightning.DistillModule",
                            {"teacher": hf("unlearn"), "student_init": "random", "seed": seed,
                             **distill.get("model", {})},
                            distill.get("trainer", {}), distill.get("data", {}),
                            {"alpha": None, "beta": None, "teacher_stage": "unlearn"}, hf=hf("distill")))
    undo = cfg.get("undo") or {}
    if undo.get("noise_seeds") and "noise_seed" in undo.get("model", {}):
        raise ValueError("undo: both model.noise_seed and noise_seeds are set; give the seeds as noise_seeds only")
    noise_seeds = undo.get("noise_seeds") or [undo.get("model", {}).get("noise_seed", seed)]
    if len(set(noise_seeds)) != len(noise_seeds):
        raise ValueError(f"undo.noise_seeds={noise_seeds}: expected distinct integers")
    for alpha in undo.get("alphas", []):
        for noise_seed in noise_seeds:
            # the noise seed varies the noise draw only: data order and everything else stay those of `seed`
            module = {"teacher": hf("unlearn"), "student_init": "teacher", "seed": seed, **undo.get("model", {}),
                      "noise_seed": noise_seed, "alpha": float(alpha)}
            name = f"undo_a{alpha:g}" + (f"_n{noise_seed}" if len(noise_seeds) > 1 else "")
            stages.append(Stage(name, Role.STUDENT, "undo_lightning.DistillModule", module,
                                undo.get("trainer", {}), undo.get("data", {}),
                                {"alpha": float(alpha), "beta": module.get("beta"), "teacher_stage": "unlearn",
                                 "noise_seed": noise_seed, "group": "undo"}, hf=hf(name)))
    stages += _students(cfg, stages, hf)
    return stages


def _equal_retain_tokens(cfg: dict, stages: list[Stage]) -> None:
    """Scales the pretrained oracle's step budget so that it trains on as many retain tokens as the reference:
    ``steps_oracle = steps_reference * tokens_per_step_reference * retain_share_reference /
    (tokens_per_step_oracle * retain_share_oracle)``."""
    reference, oracle = stages[0], next((s for s in stages if s.role == Role.ORACLE), None)
    if oracle is None or oracle.evaluate_only or reference.evaluate_only:
        raise ValueError("oracle_exposure=equal_retain_tokens: needs a pretrained reference and a pretrained oracle "
                         "(an existing model's training data is not ours to scale); use equal_steps")
    if "max_steps" in ((cfg.get("oracle") or {}).get("trainer") or {}):
        raise ValueError("oracle_exposure=equal_retain_tokens sets the oracle's trainer.max_steps; remove "
                         "oracle.trainer.max_steps (or use oracle_exposure: equal_steps)")
    steps = deep_merge(cfg.get("trainer", {}), reference.trainer).get("max_steps")
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"oracle_exposure=equal_retain_tokens: the reference's trainer.max_steps={steps}; expected "
                         "a positive step budget to scale")
    ref, orc = _datamodule(cfg, reference.data), _datamodule(cfg, oracle.data)
    ref_retain = ref.batch_size * ref.block_size * ref.mixture.get("retain", 0.0)
    orc_retain = orc.batch_size * orc.block_size * orc.mixture.get("retain", 0.0)
    if ref_retain <= 0 or orc_retain <= 0:
        raise ValueError(f"oracle_exposure=equal_retain_tokens: retain shares reference {ref.mixture}, oracle "
                         f"{orc.mixture}; both must train on retain data")
    oracle.trainer = {**oracle.trainer, "max_steps": max(1, round(steps * ref_retain / orc_retain))}
    oracle.record["exposure"] = "equal_retain_tokens"


def _students(cfg: dict, stages: list[Stage], hf) -> list[Stage]:
    """The ``students:`` section: DistillModule stages merged over ``distill``, whose ``teacher`` and
    ``student_init`` may name an earlier stage (resolved to its model folder)."""
    import inspect

    from undo_lightning.modules.distill import DistillModule

    defaults = {k: v.default for k, v in inspect.signature(DistillModule.__init__).parameters.items()}
    by_name = {s.name: s for s in stages}
    out = []
    for name, spec in (cfg.get("students") or {}).items():
        if name in by_name:
            raise ValueError(f"students.{name}: a stage named {name!r} exists already; choose another name")
        spec = deep_merge(cfg.get("distill") or {}, spec)
        module = {"teacher": "unlearn", "student_init": "random", "seed": cfg["seed"], **spec.get("model", {})}
        teacher, init = module["teacher"], module["student_init"]
        if not isinstance(teacher, str):
            raise ValueError(f"students.{name}.model.teacher={teacher!r}: expected a stage name "
                             f"({sorted(by_name)}) or a model folder")
        module["teacher"] = by_name[teacher].hf if teacher in by_name else teacher
        if init in by_name:
            module["student_init"] = by_name[init].hf
        noised = module["student_init"] == "teacher"
        record = {"alpha": float(module.get("alpha", defaults["alpha"])) if noised else None,
                  "beta": float(module.get("beta", defaults["beta"])) if noised else None,
                  "teacher_stage": teacher if teacher in by_name else None,
                  "student_init_stage": init if init in by_name else None, "group": "students"}
        out.append(Stage(name, Role.STUDENT, "undo_lightning.DistillModule", module, spec.get("trainer", {}),
                         spec.get("data", {}), record, hf=hf(name)))
        by_name[name] = out[-1]
    return out


def _datamodule(cfg: dict, overrides: dict):
    from undo_lightning.data import RetainForgetDataModule

    return RetainForgetDataModule.from_config(deep_merge(cfg.get("data", {}), overrides))


def _trainer_kwargs(cfg: dict, stage: Stage) -> dict[str, Any]:
    """The stage's Trainer arguments: stage defaults, then the shared ``trainer:``, then the stage's own."""
    return deep_merge(deep_merge(STAGE_TRAINER, cfg.get("trainer")), stage.trainer)


def stage_records(cfg: dict, stages: list[Stage]) -> dict[str, dict[str, Any]]:
    """What each stage's result depends on, by stage name (written to ``<stage>/stage.json``).

    A record holds the module class and arguments (an earlier stage's model folder written as ``<stage NAME>``, so
    that the record does not depend on where the run folder lies), the data and the Trainer arguments that change
    what is computed, what ``metrics.json`` records about the stage, and, as ``inputs``, the digest of every earlier
    stage it reads: a changed stage changes the record of everything downstream.
    """
    owner: dict[str, str] = {}  # model folder -> the stage that writes (or names) it
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        reads = [v for v in stage.module.values() if isinstance(v, str) and v in owner]
        records[stage.name] = reuse.normalized({
            "class": stage.module_cls,
            "model": {k: f"<stage {owner[v]}>" if isinstance(v, str) and v in owner else v
                      for k, v in stage.module.items()},
            "data": deep_merge(cfg.get("data", {}), stage.data),
            "trainer": reuse.computed_trainer(_trainer_kwargs(cfg, stage)),
            "record": {"role": stage.role.value, **stage.record}, "evaluate_only": stage.evaluate_only,
            "inputs": {owner[v]: reuse.digest(records[owner[v]]) for v in reads}})
        owner.setdefault(stage.hf, stage.name)
    return records


def run_records(cfg: dict, stages: list[Stage], records: dict[str, dict[str, Any]]) -> dict[Path, dict[str, Any]]:
    """What each attack run depends on (:func:`~undo_lightning.experiment.sweep.run_records`), by run folder relative
    to the run folder's root; the attacked model is identified by its stage's digest."""
    from undo_lightning.experiment.sweep import run_folder
    from undo_lightning.experiment.sweep import run_records as sweep_records

    models = {s.name: s.hf for s in stages}
    ids = {name: reuse.digest(record) for name, record in records.items()}
    out: dict[Path, dict[str, Any]] = {}
    for setting, sweep in attack_sweeps(cfg).items():
        for (name, lr, seed), record in sweep_records(models=models, model_ids=ids, **sweep).items():
            out[run_folder("", name, lr, seed, setting)] = record
    return out


def _instantiate(stage: Stage):
    return instantiate(import_object(stage.module_cls), stage.module, f"stage {stage.name!r}")


def validate(cfg: dict) -> list[Stage]:
    """Checks the whole experiment before anything trains: builds every stage's module and data module once (models
    are built lazily), checks each stage's step budget, every data's block size against its longest answer-scored
    example, what can be known about each stage's model before it exists (:func:`_check_models`), and every attack
    setting. Returns the planned stages."""
    stages = plan(cfg)
    modules = {}
    for stage in stages:
        modules[stage.name] = _instantiate(stage)
        if not stage.evaluate_only:
            _check_budget(stage.name, _trainer_kwargs(cfg, stage))
    _check_attacks(cfg)
    _check_probes(cfg)
    checked: dict[str, Any] = {}  # each distinct data config built (which checks its arguments) and checked once
    for where, data in [*((s.name, deep_merge(cfg.get("data", {}), s.data)) for s in stages),
                        *((f"relearn (attack setting {n!r})", sweep["data"])
                          for n, sweep in attack_sweeps(cfg).items()),
                        *((("probes", probe_data(cfg)),) if any((cfg.get("probes") or {}).get(k) is not None
                                                                  for k in ("quantize", "weights")) else ())]:
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in checked:
            checked[key] = _datamodule(cfg, data)
            try:
                checked[key].check_block_size()
            except ValueError as err:
                raise ValueError(f"{where}: data.{err}") from None
    first = checked[json.dumps(deep_merge(cfg.get("data", {}), stages[0].data), sort_keys=True, default=str)]
    tokenizer = functools.cache(lambda: _tokenizer_or_none(first))
    _check_models(stages, modules, tokenizer)
    _check_lora_targets(cfg, modules, tokenizer)
    return stages


def _check_lora_targets(cfg: dict, modules: dict[str, Any], tokenizer: Callable[[], Any]) -> None:
    """A LoRA attacker's target modules, checked before anything trains against the architecture of every preset and
    local model folder the stages start from (built on the meta device: no weights). Hub models are checked when the
    attack loads them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from undo_lightning.models import PRESETS, is_hf_folder, preset_config
    from undo_lightning.modules.lora import LoraSettings, check_targets

    settings = {name: LoraSettings.of(sweep["module"]["lora"]) for name, sweep in attack_sweeps(cfg).items()
                if sweep["module"].get("lora")}
    if not settings:
        return
    sources = {getattr(m, "model_name", None) for m in modules.values()} - {None}
    for source in sorted(sources):
        if source in PRESETS and tokenizer() is not None:
            config = preset_config(source, tokenizer())
        elif source not in PRESETS and is_hf_folder(source):
            config = AutoConfig.from_pretrained(source)
        else:
            continue
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        for name, lora in settings.items():
            try:
                check_targets(model, lora)
            except ValueError as err:
                raise ValueError(f"relearn (attack setting {name!r}): model.{err} (model {source!r})") from None


def _tokenizer_or_none(datamodule):
    """The data's tokenizer, or None when it cannot be loaded here (a hub tokenizer offline): the first stage then
    reports that itself, before anything trains; the checks that need it are skipped."""
    try:
        return datamodule.tokenizer
    except ValueError:
        return None


def _model_facts(name: str, tokenizer: Callable[[], Any]) -> dict[str, int] | None:
    """``vocab_size`` and ``num_hidden_layers`` of a preset (sized by ``tokenizer()``) or a local model folder (None:
    a hub id, not known before it is downloaded, or a preset whose tokenizer cannot be loaded here)."""
    from undo_lightning.models import PRESETS, is_hf_folder, preset_config

    if name in PRESETS:
        if tokenizer() is None:
            return None
        config = preset_config(name, tokenizer()).to_dict()
    elif is_hf_folder(name):
        with open(Path(name) / "config.json") as f:
            config = json.load(f)
        config = config.get("text_config", config)  # multimodal checkpoints nest the language model's config
    else:
        return None
    return {k: config[k] for k in ("vocab_size", "num_hidden_layers") if isinstance(config.get(k), int)}


def _check_models(stages: list[Stage], modules: dict[str, Any], tokenizer: Callable[[], Any]) -> None:
    """What can be known about each stage's model before it exists, checked before anything trains: the size of the
    model each stage builds or reads follows from the presets and existing folders the experiment starts from, so a
    vocabulary smaller than the data tokenizer, a student init whose vocabulary differs from its teacher's, or an RMU
    layer beyond the model's depth fail here instead of after the earlier stages have trained. ``tokenizer()`` (the
    first stage's data tokenizer) is only loaded when a preset or local folder needs it: a config of hub models
    validates offline."""
    facts: dict[str, dict[str, int] | None] = {}  # model folder / preset -> facts
    known = lambda path: facts[path] if path in facts else _model_facts(path, tokenizer)  # noqa: E731

    for stage in stages:
        module = modules[stage.name]
        if stage.module_cls.endswith("DistillModule"):
            teacher, init = module.teacher_path, module.hparams.student_init
            model = known(teacher)
            student = model if init in ("random", "teacher") else known(init)
            if model and student and model.get("vocab_size") != student.get("vocab_size"):
                raise ValueError(f"{stage.name}: model.student_init={init!r} has vocab_size={student['vocab_size']} "
                                 f"but model.teacher={teacher!r} has vocab_size={model['vocab_size']}; distillation "
                                 "compares full-vocabulary distributions: both must use the same tokenizer")
            model = student
        else:
            model = known(module.model_name)
            check_depth = getattr(getattr(module, "method", None), "check_depth", None)
            if model and check_depth is not None and "num_hidden_layers" in model:
                try:
                    check_depth(model["num_hidden_layers"])
                except ValueError as err:
                    raise ValueError(f"{stage.name}: model.method: {err}") from None
        if model and "vocab_size" in model and tokenizer() is not None and model["vocab_size"] < len(tokenizer()):
            raise ValueError(f"{stage.name}: its model has vocab_size={model['vocab_size']} but the data tokenizer has "
                             f"{len(tokenizer())} tokens; give the stage the data (tokenizer) its model was trained "
                             "with")
        facts[stage.hf] = model


def _check_budget(name: str, trainer: dict) -> None:
    """A stage must train: ``max_steps`` > 0, or ``max_steps: -1`` with ``max_epochs`` >= 1 (one pass over the data)."""
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if steps == -1 and epochs is not None and epochs >= 1:
        return
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"{name}: trainer.max_steps={steps}: expected a positive number of optimizer steps, or -1 "
                         f"with trainer.max_epochs >= 1 (max_epochs={epochs})")


def _check_resume_point(stage: Stage, ckpt: Path) -> None:
    """A stage resumes from ``last.ckpt``: refuse one that cannot be read (a truncated or foreign file) with the
    command that restarts the stage, instead of a traceback from deep inside ``torch.load``."""
    import zipfile

    try:
        with zipfile.ZipFile(ckpt) as archive:  # torch.save writes a zip archive; truncation loses its directory
            archive.getinfo(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    except (zipfile.BadZipFile, StopIteration, OSError) as err:
        raise ValueError(f"{stage.name}: cannot resume from {ckpt}: not a readable checkpoint "
                         f"({type(err).__name__}: {err or 'no data.pkl'}); delete it to restart this stage from "
                         f"scratch (rm {ckpt}) and run the same command again") from None


def prepare_out_dir(out: Path, cfg: dict, stages: list[Stage], overwrite: bool = False,
                    dry_run: bool = False) -> tuple[dict[str, str], int]:
    """Makes ``out`` hold only results of ``cfg`` before any training, reusing what it can.

    A folder of another experiment (another ``name`` in its ``config.yaml``) or a non-empty folder that is no run
    folder is refused unless ``overwrite`` (then it is emptied). Otherwise every stage folder and attack run whose
    record (:func:`stage_records`, :func:`run_records`) differs from what ``cfg`` asks for is removed, with the reason
    in the log; those the config no longer has are removed too; the rest is reused. Folders written before records
    existed are judged by the records of the ``config.yaml`` they were made with. ``config.yaml`` is then ``cfg``.
    With ``dry_run`` nothing is changed: the log says what would be.

    Returns:
        What a run does with each stage (``finished, reused``, ``resumes from its last checkpoint`` or ``runs``) and
        how many attack runs are finished and reused.
    """
    saved = out / "config.yaml"
    previous = None
    if saved.is_file():
        with open(saved) as f:
            previous = yaml.safe_load(f) or {}
        if previous.get("name") != cfg["name"]:
            if not overwrite:
                raise ValueError(f"{out} holds the experiment {previous.get('name')!r}, not {cfg['name']!r}; pass "
                                 "--overwrite to replace it, or choose another out_dir")
            _replace(out, dry_run)
            previous = None
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not an undo pipeline run folder (no config.yaml); pass --overwrite "
                             "to replace it, or choose another out_dir")
        _replace(out, dry_run)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    records = stage_records(cfg, stages)
    old_stages, old_runs = _previous_records(previous, out)
    recorded = {path.parent.name for path in out.glob(f"*/{STAGE_RECORD}")}
    for name in sorted((set(old_stages) | recorded) - set(records)):
        _remove(out, name, "the config no longer has this stage", dry_run)
    states = {}
    for stage in stages:
        folder = out / stage.name
        states[stage.name] = "runs"
        if not folder.is_dir():
            continue
        old = reuse.read_record(folder / STAGE_RECORD) if (folder / STAGE_RECORD).is_file() \
            else old_stages.get(stage.name)
        if old != records[stage.name]:
            _remove(out, stage.name, reuse.describe_change(old, records[stage.name]), dry_run)
            continue
        if not dry_run:
            reuse.write_record(folder / STAGE_RECORD, records[stage.name])  # a folder from before records: adopted
        if (folder / DONE).is_file():
            states[stage.name] = "finished, reused"
        elif (folder / "checkpoints" / "last.ckpt").is_file():
            states[stage.name] = "resumes from its last checkpoint"
    kept = _prepare_runs(out, run_records(cfg, stages, records), old_runs, dry_run,
                         (cfg.get("relearn") or {}).get("search_rounds", 0))
    if not dry_run:
        _remove_stale_summaries(out, list(attack_sweeps(cfg)))
        atomic_yaml(saved, cfg)
    return states, kept


def _replace(out: Path, dry_run: bool) -> None:
    _log(f"{'would replace' if dry_run else 'replacing'} {out} (--overwrite)")
    if not dry_run:
        shutil.rmtree(out)


def _previous_records(previous: dict | None, out: Path) -> tuple[dict[str, dict], dict[Path, dict]]:
    """The stage and run records of the config a folder was made with (empty if it cannot be planned any more)."""
    if previous is None:
        return {}, {}
    try:
        stages = plan({**previous, "out_dir": str(out)})
        records = stage_records(previous, stages)
        return records, run_records(previous, stages, records)
    except (ValueError, TypeError, KeyError, AttributeError):  # a config of an older version: nothing is trusted
        return {}, {}


def _remove(out: Path, stage: str, why: str, dry_run: bool = False) -> None:
    """Removes a stage's folder and its attack runs, logging why."""
    _log(f"{stage}: {why}; {'would remove' if dry_run else 'removing'} {out / stage} and its attack runs"
         + ("" if "no longer" in why else " to redo them"))
    if not dry_run:
        shutil.rmtree(out / stage, ignore_errors=True)
        shutil.rmtree(out / "relearn" / stage, ignore_errors=True)


def _base(record: dict[str, Any]) -> str:
    """What an attack run's record says beyond its LR, seed and search round (its model's grid, setting, data...)."""
    return json.dumps({k: v for k, v in record.items() if k not in ("lr", "seed", "search_round")}, sort_keys=True)


def _prepare_runs(out: Path, expected: dict[Path, dict], previous: dict[Path, dict], dry_run: bool = False,
                  search_rounds: int = 0) -> int:
    """Removes attack runs the config no longer asks for and those whose record changed (one log line per reason);
    returns how many finished runs are kept. Runs of the attacker's LR search (``search_round`` in their record, up
    to ``search_rounds``) are kept while their model's grid record is still expected."""
    from collections import Counter

    from undo_lightning.experiment.sweep import RUN_RECORD

    redo: Counter[str] = Counter()
    gone, kept = [], 0
    bases = {(key.parent.name, _base(record)) for key, record in expected.items()}
    for folder in sorted((out / "relearn").glob("*/*")):
        if not folder.is_dir():
            continue
        key = folder.relative_to(out)
        if key not in expected:
            record = reuse.read_record(folder / RUN_RECORD) if (folder / RUN_RECORD).is_file() else None
            if record and 0 < record.get("search_round", 0) <= search_rounds and \
                    (folder.parent.name, _base(record)) in bases:
                continue  # a run of the attacker's LR search on a grid that is still valid: the search reuses it
            gone.append(key)
        else:
            old = reuse.read_record(folder / RUN_RECORD) if (folder / RUN_RECORD).is_file() else previous.get(key)
            if old == expected[key]:
                if not dry_run:
                    reuse.write_record(folder / RUN_RECORD, expected[key])
                kept += (folder / "curve.json").is_file() and (out / folder.parent.name / DONE).is_file()
                continue
            if not (folder / "curve.json").is_file():  # an unfinished run is redone by the sweep anyway
                continue
            redo[reuse.describe_change(old, expected[key])] += 1
        if not dry_run:
            shutil.rmtree(folder)
    verb = "would remove" if dry_run else "removed"
    if gone:
        _log(f"relearn: {verb} {len(gone)} attack run(s) the config no longer asks for (e.g. {gone[0]})")
    for why, count in redo.items():
        _log(f"relearn: {why.replace('its input model', 'the attacked model')}: {count} attack run(s) "
             f"{'would be redone' if dry_run else 'to redo'}")
    return kept


def _remove_stale_summaries(out: Path, settings: list[str]) -> None:
    """Summaries and curves plots of attack settings the config no longer has (the report would not rewrite them)."""
    from undo_lightning.experiment.report import curves_plot_name
    from undo_lightning.experiment.sweep import summary_path

    keep = {summary_path(out, s).name for s in settings} | {curves_plot_name(s) for s in settings}
    for path in [*out.glob("relearn_summary*.json"), *out.glob("relearn_curves*.png")]:
        if path.name not in keep:
            path.unlink()


def atomic_yaml(path: Path, data: dict) -> None:
    from undo_lightning.io import write_text_atomic

    write_text_atomic(str(path), yaml.safe_dump(data, sort_keys=False))


def _log(msg: str) -> None:
    print(f"[undo pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _logged_in_pipeline_format(logger: str, phase: str):
    """A phase's own log lines (one per attack run, per probed model) in the pipeline's format, so a long phase is not
    silent; Lightning's per-run banners and transformers' loading bars are hidden meanwhile."""
    from undo_lightning.experiment.sweep import quiet

    phase_log = logging.getLogger(logger)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[undo pipeline %(asctime)s] {phase}: %(message)s", "%H:%M:%S"))
    level, propagate = phase_log.level, phase_log.propagate
    phase_log.addHandler(handler)
    phase_log.setLevel(logging.INFO)
    phase_log.propagate = False
    try:
        with quiet():
            yield
    finally:
        phase_log.removeHandler(handler)
        phase_log.setLevel(level)
        phase_log.propagate = propagate


def run_stage(stage: Stage, cfg: dict, out: Path, record: dict[str, Any]) -> dict:
    """Trains one stage (resuming from its last checkpoint if one exists) and marks it done.

    ``record`` (:func:`stage_records`) is written to ``<stage>/stage.json`` before training starts.

    A stage of an existing model (``evaluate_only``) is validated once instead: its ``metrics.json`` holds the
    "before" numbers of the report and no model is exported (later stages read ``stage.hf`` directly).
    """
    import lightning as L

    from undo_lightning.io import write_json_atomic

    root = out / stage.name
    if (root / DONE).is_file():
        _log(f"{stage.name}: done already, skipped")
        return json.loads((root / "metrics.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    reuse.write_record(root / STAGE_RECORD, record)
    ckpt = root / "checkpoints" / "last.ckpt"
    _log(f"{stage.name}: " + (f"evaluating the existing model {stage.hf}" if stage.evaluate_only else "start")
         + (f" (resuming from {ckpt})" if ckpt.is_file() else ""))
    started = time.perf_counter()
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    trainer_kwargs = _trainer_kwargs(cfg, stage)
    callbacks = [instantiate(import_object(c["class_path"]), c.get("init_args", {}), f"stage {stage.name!r} callback")
                 for c in trainer_kwargs.pop("callbacks", [])]
    trainer = L.Trainer(default_root_dir=str(root), callbacks=callbacks,
                        logger=tensorboard_logger(root),
                        **trainer_kwargs)
    module = _instantiate(stage)
    datamodule = _datamodule(cfg, stage.data)
    if stage.evaluate_only:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        if trainer.global_rank == 0:
            write_json_atomic(str(root / "metrics.json"), {
                "stage": stage.name, "global_step": 0, "val": module.last_val_metrics,
                "wall_time_s": round(time.perf_counter() - started, 3), **module.summary()})
    else:
        # (Ctrl-C: Lightning stops gracefully and exits with 1; `undo` says how to resume)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt.is_file() else None)
    metrics = json.loads((root / "metrics.json").read_text())
    metrics.update({"role": stage.role.value, **stage.record})
    write_json_atomic(str(root / "metrics.json"), metrics)
    _check_collapse(stage, cfg, out, metrics)
    (root / DONE).write_text(f"{time.perf_counter() - started:.1f}\n")  # written last: the stage is complete
    _log(f"{stage.name}: finished in {time.perf_counter() - started:.1f} s "
         f"(retain_acc={metrics['val'].get('val/retain_acc', float('nan')):.3f}, "
         f"forget_acc={metrics['val'].get('val/forget_acc', float('nan')):.3f})")
    return metrics


def _check_collapse(stage: Stage, cfg: dict, out: Path, metrics: dict) -> None:
    """An unlearning stage must not destroy the model it starts from; one that does is left unfinished (no ``DONE``)
    with a message, instead of becoming the teacher of every later stage.

    Destroyed means: its retain accuracy ends more than ``collapse_guard`` below the reference's, or its retain CE ends
    above the CE of guessing uniformly over the vocabulary (``ln V``; catches collapse where there is no answer
    accuracy, e.g. language data, or where the reference's is already 0).
    """
    import math

    limit = cfg.get("collapse_guard")
    reference = out / "reference" / "metrics.json"
    if limit is None or stage.role not in (Role.TEACHER, Role.BASELINE) or not reference.is_file():
        return
    before, after = json.loads(reference.read_text())["val"], metrics["val"]
    fix = ("Lower the stage's learning rate (model.optimizer.lr) or raise its method's retain weight and run the same "
           "command again (the stage and everything after it are redone); collapse_guard: null turns the guard off")
    acc0, acc1 = before.get("val/retain_acc"), after.get("val/retain_acc")
    if acc0 is not None and acc1 is not None and acc0 - acc1 > limit:
        raise ValueError(f"{stage.name}: retain accuracy fell from {acc0:.3f} (reference) to {acc1:.3f}, more than "
                         f"collapse_guard={limit}: the unlearning destroyed the model instead of removing the forget "
                         f"capability. {fix}")
    ce0, ce1 = before.get("val/retain_ce"), after.get("val/retain_ce")
    config = out / stage.name / "hf" / "config.json"
    if ce1 is not None and config.is_file():
        vocab = json.loads(config.read_text()).get("vocab_size")
        if vocab and ce1 > math.log(vocab):
            raise ValueError(f"{stage.name}: retain CE rose from {ce0 if ce0 is None else round(ce0, 3)} (reference) "
                             f"to {ce1:.3f}, worse than guessing uniformly over the {vocab}-token vocabulary "
                             f"(ln {vocab} = {math.log(vocab):.3f}): the unlearning destroyed the model. {fix}")


def attack_sweeps(cfg: dict) -> dict[str, dict[str, Any]]:
    """``run_sweep`` keyword arguments (all but ``models`` and ``out_dir``) of each attack setting of the config's
    ``relearn:`` section, by setting name: the shared data and Trainer (but its ``enable_progress_bar``) merged with
    the section's and the setting's."""
    spec = dict(cfg.get("relearn") or {})
    attacks = spec.pop("attacks", None) or {"forget": {}}
    data = deep_merge(cfg.get("data", {}), spec.pop("data", {}))
    # an attack run is short and the sweep logs one line per run: a progress bar per run only if relearn.trainer
    # asks for it, not because the stages show theirs
    shared = {k: v for k, v in (cfg.get("trainer") or {}).items() if k != "enable_progress_bar"}
    trainer = deep_merge(shared, spec.pop("trainer", {}))
    # the attacker's LR search keeps the report's utility bound
    floor = (cfg.get("report") or {}).get("max_retain_drop")
    return {name: {**spec, "lrs": setting.get("lrs") or spec.get("lrs"), "attack": setting.get("train_on", "forget"),
                   "setting": name, "trainer": trainer, "data": deep_merge(data, setting.get("data", {})),
                   "module": dict(setting.get("model") or {}), "max_retain_drop": floor}
            for name, setting in attacks.items()}


def _check_attacks(cfg: dict) -> None:
    """Every attack setting's sweep settings and data, checked before any stage trains."""
    from undo_lightning.data import RetainForgetDataModule
    from undo_lightning.experiment.sweep import check_sweep_settings

    for name, sweep in attack_sweeps(cfg).items():
        try:
            check_sweep_settings(**{k: v for k, v in sweep.items() if k not in ("data", "reference")})
            RetainForgetDataModule.from_config(sweep["data"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"relearn (attack setting {name!r}): {err}") from None


def run_relearn(cfg: dict, out: Path, stages: list[Stage], model_ids: dict[str, str]) -> None:
    """Every attack setting's sweep over every stage's model; ``model_ids`` are the stages' record digests."""
    from undo_lightning.experiment.sweep import run_sweep

    models = {s.name: s.hf for s in stages}
    sweeps = attack_sweeps(cfg)
    _log(f"relearn: attacking {len(models)} models with {len(sweeps)} attack setting(s): {', '.join(sweeps)}")
    started = time.perf_counter()
    with _logged_in_pipeline_format("undo_lightning.experiment.sweep", "relearn"):
        for sweep in sweeps.values():
            run_sweep(models=models, out_dir=str(out), model_ids=model_ids, **sweep)
    _log(f"relearn: finished in {time.perf_counter() - started:.1f} s")


def probe_data(cfg: dict) -> dict:
    """The probes' evaluation data: the shared ``data:``, then ``relearn.data`` (what the attacks evaluate), then
    ``probes.data``."""
    probes = cfg.get("probes") or {}
    return deep_merge(deep_merge(cfg.get("data", {}), (cfg.get("relearn") or {}).get("data", {})),
                      probes.get("data", {}))


def _check_probes(cfg: dict) -> None:
    """The probes' settings, checked before any stage trains."""
    from undo_lightning.experiment.probes import interpolation_points
    from undo_lightning.quantize import check_bits

    probes = cfg.get("probes") or {}
    quantize, weights = probes.get("quantize"), probes.get("weights")
    try:
        if quantize is not None:
            if not quantize["bits"]:
                raise ValueError("quantize.bits=[]: give the weight bits to probe (4, 8) or set quantize: null")
            for bits in quantize["bits"]:
                check_bits(bits)
            if quantize["group_size"] < 1:
                raise ValueError(f"quantize.group_size={quantize['group_size']}: expected a positive integer")
        if weights is not None:
            interpolation_points(weights["points"])
    except ValueError as err:
        raise ValueError(f"probes: {err}") from None


def run_probes(cfg: dict, out: Path, stages: list[Stage], model_ids: dict[str, str]) -> None:
    """The quantisation probe and the weight-space diagnostics over every stage's model (each when configured)."""
    probes = cfg.get("probes") or {}
    if probes.get("quantize") is None and probes.get("weights") is None:
        return
    from undo_lightning.experiment.probes import quantization_probe, weight_probe

    models = {s.name: s.hf for s in stages}
    datamodule = _datamodule(cfg, probe_data(cfg))
    trainer = dict(cfg.get("trainer") or {})
    started = time.perf_counter()
    with _logged_in_pipeline_format("undo_lightning.experiment.probes", "probes"):
        if probes.get("quantize") is not None:
            _log(f"probes: quantisation ({probes['quantize']}) of {len(models)} models")
            quantization_probe(out, models, model_ids, datamodule, trainer=trainer, **probes["quantize"])
        if probes.get("weights") is not None:
            roles = {s.role.value: s.name for s in stages}
            _log(f"probes: weight space ({probes['weights']['points']} points per path) of {len(models)} models")
            weight_probe(out, models, model_ids, datamodule, teacher=roles.get("teacher"),
                         reference=roles.get("reference"), points=probes["weights"]["points"], trainer=trainer)
    _log(f"probes: finished in {time.perf_counter() - started:.1f} s")


def run_pipeline(config: str | os.PathLike | None = None, out_dir: str | None = None, overwrite: bool = False,
                 only: list[str] | None = None, check: bool = False) -> dict:
    """Run the whole UNDO experiment (pretrain, unlearn, distill, UNDO, relearn, report); resumable.

    Args:
        config: experiment YAML (default: ``configs/arithmetic/quick.yaml``, the CPU demo).
        out_dir: run folder (default: the config's ``out_dir``).
        overwrite: replace a run folder that holds another experiment (another ``name``) or is no run folder; a
            folder of the same experiment is always reused stage by stage (changed stages are redone).
        only: run just these stages (and nothing after them), e.g. ``[reference, oracle]``.
        check: only validate the whole experiment and say what a run would do to ``out_dir`` (nothing changes).

    Returns:
        The report dictionary (also written to ``<out_dir>/report.json``); empty with ``only`` or ``check``.
    """
    cfg = load_config(config)
    if out_dir is not None:
        cfg["out_dir"] = out_dir
    return run_experiment(cfg, overwrite, only, check)


def run_experiment(cfg: dict, overwrite: bool = False, only: list[str] | None = None, check: bool = False) -> dict:
    """:func:`run_pipeline` of a resolved config (:func:`~undo_lightning.experiment.config.load_config`)."""
    stages = validate(cfg)
    names = [s.name for s in stages]
    for name in only or ():
        if name not in names:
            raise ValueError(f"only={only}: {name!r} is not a training stage of this experiment"
                             f"{did_you_mean(name, names)}; stages: {names}")
    out = Path(cfg["out_dir"])
    states, finished = prepare_out_dir(out, cfg, stages, overwrite, dry_run=check)
    if check:
        print(check_summary(cfg, stages, out, states, finished))
        return {}
    records = stage_records(cfg, stages)
    for stage in stages:  # before any training: a stage that would resume from a broken file
        ckpt = out / stage.name / "checkpoints" / "last.ckpt"
        if ckpt.is_file() and not (out / stage.name / DONE).is_file():
            _check_resume_point(stage, ckpt)
    _log(f"{cfg['name']}: {len(stages)} training stages -> {out}")
    started = time.perf_counter()
    for stage in stages:
        if only is None or stage.name in only:
            run_stage(stage, cfg, out, records[stage.name])
    if only is not None:
        return {}
    model_ids = {name: reuse.digest(record) for name, record in records.items()}
    run_relearn(cfg, out, stages, model_ids)
    run_probes(cfg, out, stages, model_ids)
    from undo_lightning.experiment.report import write_report

    # the report shows the attack settings the sweep ran, in the config's order
    report = write_report(out, **cfg.get("report", {}), attacks=list(attack_sweeps(cfg)))
    _log(f"all done in {time.perf_counter() - started:.1f} s; report: {out / 'report.md'}")
    print((out / "report.md").read_text())
    return report


def check_summary(cfg: dict, stages: list[Stage], out: Path, states: dict[str, str], finished: int) -> str:
    """What ``undo pipeline --check`` prints: the experiment is valid, each stage with what a run would do to it
    (``states``, from :func:`prepare_out_dir`), and the attack grid with its ``finished`` runs."""
    sweeps = attack_sweeps(cfg)
    grid = next(iter(sweeps.values()))
    total = sum(len(stages) * len(sweep["lrs"]) * len(sweep["seeds"]) for sweep in sweeps.values())
    lines = [f"{cfg['name']}: valid; {len(stages)} training stages and {total} attack runs -> {out}"]
    width = max(16, *(len(stage.name) for stage in stages))  # one column, whatever the students are called
    for stage in stages:
        kind = "evaluated" if stage.evaluate_only else stage.module_cls.rsplit(".", 1)[-1]
        lines.append(f"  {stage.name:<{width}} {stage.role.value:<9} {kind:<16} {states[stage.name]}")
    lrs = {len(sweep["lrs"]) for sweep in sweeps.values()}
    lrs_text = f"{lrs.pop()} LRs" if len(lrs) == 1 else "(" + ", ".join(
        f"{name}: {len(sweep['lrs'])}" for name, sweep in sweeps.items()) + ") LRs"
    lines.append(f"  attacks: {', '.join(sweeps)} x {len(stages)} models x {lrs_text} x "
                 f"{len(grid['seeds'])} seeds, {grid['steps']} steps each: {finished} finished, reused; "
                 f"{total - finished} to run")
    probes = cfg.get("probes") or {}
    on = [k for k in ("quantize", "weights") if probes.get(k) is not None]
    if on:
        lines.append(f"  probes: {', '.join(on)} of {len(stages)} models")
    return "\n".join(lines)


def pipeline_command(argv: list[str]) -> None:
    """``undo pipeline [-c CONFIG] [--print_config] [--out_dir DIR] [--overwrite true] [--only '[STAGE, ...]']``,
    any config key overridable on the command line (``--relearn.steps 50``).

    Raises:
        ValueError: a bad config, option or run folder (``undo`` prints it as one line, exit code 2).
        jsonargparse.ArgumentError: a bad option or a value of the wrong type (likewise).
    """
    cfg, options = parse_argv(argv)
    run_experiment(cfg, **options)


def parse_argv(argv: list[str]) -> tuple[dict, dict[str, Any]]:
    """``undo pipeline``'s command line -> the resolved experiment (every ``-c`` applied in order, e.g. an overlay
    such as ``configs/arithmetic/attacks.yaml`` over the demo, then the ``--key value`` overrides) and the run options
    (``overwrite``, ``only``, ``check``). ``--print_config`` prints the experiment and exits."""
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"config={path!r}: no such file")
        with open(path) as f:
            check_keys(yaml.safe_load(f) or {}, path)
    namespace = parser().parse_args(argv)  # --print_config prints the resolved experiment and exits here
    cfg = namespace.as_dict()
    options = {key: cfg.pop(key) for key in ("overwrite", "only", "check")}
    cfg.pop("config", None)
    return finish(cfg, Path(paths[-1]).stem), options
