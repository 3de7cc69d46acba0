"""The experiment config of ``undo pipeline``: typed sections, parsed and checked by jsonargparse.

Every stage section has the shape of the LightningCLI config it runs: ``model:`` (the stage module's arguments),
``data:`` (overrides of the shared ``RetainForgetDataModule`` arguments) and ``trainer:`` (overrides of the shared
``lightning.Trainer`` arguments). A misspelt key anywhere is an error before anything trains: the sections are
dataclasses here, and each stage's ``model:`` / ``data:`` are checked against the module's and data module's typed
signatures when the pipeline plans its stages. ``undo pipeline -c FILE --print_config`` prints the whole resolved
experiment, defaults included.

YAML anchors compose shared blocks (``data: &unlearn_data`` once, ``data: *unlearn_data`` where it recurs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from undo_lightning.experiment.report import TradeoffY
from undo_lightning.experiment.robustness import Mode
from undo_lightning.io import did_you_mean, json_safe
from undo_lightning.modules.relearn import Attack

#: how much the pretrained oracle trains relative to the reference (see ``ExperimentConfig.oracle_exposure``)
OracleExposure = Literal["equal_steps", "equal_retain_tokens"]
#: command-line options of ``undo pipeline`` that ``--print_config`` writes beside the experiment (not part of it)
RUN_OPTIONS = ("overwrite", "only", "check")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "arithmetic" / "quick.yaml"


@dataclass
class StageSection:
    """One training stage.

    Args:
        model: the stage module's arguments (as ``init_args`` of its LightningCLI config).
        data: ``RetainForgetDataModule`` arguments merged over the shared ``data:`` for this stage.
        trainer: ``lightning.Trainer`` arguments merged over the shared ``trainer:`` (e.g. ``max_steps``).
    """

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSection(StageSection):
    """The reference or the oracle: pretrained with the ``pretrain`` settings (overridden by this section), or an
    existing model that is only evaluated.

    Args:
        model: ``PretrainModule`` arguments (a mapping), or a model folder / hub id (a string): an existing model,
            evaluated once on this section's ``data`` (no ``trainer`` then).
        data: ``RetainForgetDataModule`` arguments merged over the shared ``data:``.
        trainer: ``lightning.Trainer`` arguments merged over the shared ``trainer:``.
    """

    model: dict[str, Any] | str = field(default_factory=dict)


@dataclass
class UndoSection(StageSection):
    """UNDO: the teacher distilled into its own shrunk-and-perturbed copy, one stage ``undo_a<alpha>`` per alpha
    (``undo_a<alpha>_n<noise seed>`` per alpha and noise seed when there are several noise seeds).

    Args:
        alphas: the noise mixes α (paper eq. 1); none: no UNDO stage.
        noise_seeds: seeds of the noise draw N (paper eq. 1), one student per alpha and seed; the report then gives
            each α's spread over noise seeds. Default: the experiment's ``seed`` only.
        model: ``DistillModule`` arguments shared by every alpha (``beta``, ``optimizer``, ``stop_threshold``, ...).
        data: ``RetainForgetDataModule`` arguments merged over the shared ``data:``.
        trainer: ``lightning.Trainer`` arguments merged over the shared ``trainer:``.
    """

    alphas: list[float] = field(default_factory=list)
    noise_seeds: list[int] | None = None


@dataclass
class AttackSetting:
    """One named way of attacking every model (the report shows each setting side by side).

    Args:
        train_on: what the attacker fine-tunes on: ``forget`` data (the paper's arithmetic attack; the strongest per
            step), ``retain`` data only (retain-only attack, arXiv 2505.22310) or the ``mixture`` of the attack's
            data (the authors' default attack: their pretraining mix, about 12.5 % forget tokens; give the mix as
            ``data: {mixture: {retain: 0.875, forget: 0.125}}``).
        data: ``RetainForgetDataModule`` arguments merged over the relearning data for this setting only, e.g.
            ``{forget: {init_args: {eval_fact_fraction: 0.5}}}``: the attacker never trains on the evaluated facts
            (does the *capability* come back, or only memorised facts?); ``{few_shot: 8}``: the attacker holds only
            8 forget documents, repeated (the few-shot attack).
        model: ``RelearnAttackModule`` arguments of this setting's attacker: ``lora`` (a LoRA attacker, e.g.
            ``{lora: {rank: 8, target_modules: all-linear}}``, instead of full fine-tuning) and ``optimizer`` fields
            other than ``lr`` (the LRs are the grid).
        lrs: this setting's own learning-rate grid (default: the section's ``lrs``); e.g. a LoRA attacker's best LRs
            are higher than full fine-tuning's.
    """

    train_on: Attack = "forget"
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    lrs: list[float] | None = None


@dataclass
class RelearnSection:
    """The relearning attack: every model fine-tuned over an LR × seed grid, once per attack setting.

    Args:
        lrs: learning-rate grid (each LR a run; the worst case over LRs is reported).
        seeds: attack seeds (the order of the attack's batches); the report gives mean ± std and a bootstrap
            interval over them.
        steps: attack steps per run.
        eval_every: evaluation interval in steps (step 0 and the last step are always evaluated).
        batch_size: attack batch size (``None``: the data's).
        attacks: the attack settings by name (letters, digits, ``_.-``; the name ``forget`` keeps the plain run
            folders ``lr=<lr>_seed=<s>``, another NAME gets ``..._NAME``); every model is attacked with each. Empty
            (default): ``{forget: {}}``, the forget-data attack alone.
        search_rounds: rounds of the attacker's LR search after the grid, per model and attack setting: each tries
            the geometric midpoints between the best LR so far and its neighbours (one step outward at an end of the
            grid), scored by the best forget accuracy reached within the report's retain floor
            (``report.max_retain_drop``). 0 (default): the grid only.
        report_steps: steps the sweep's ``relearn_summary.json`` reports (default: first evaluation, middle, end).
        reference: model whose step-0 forget accuracy defines "recovered" in the summary.
        recovery_fraction: fraction of that accuracy that counts as recovered.
        data: ``RetainForgetDataModule`` arguments merged over the shared ``data:`` for every attack setting.
        trainer: ``lightning.Trainer`` arguments merged over the shared ``trainer:`` for every attack run.
    """

    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 150
    eval_every: int = 25
    batch_size: int | None = None
    attacks: dict[str, AttackSetting] = field(default_factory=dict)
    search_rounds: int = 0
    report_steps: list[int] | None = None
    reference: str | None = "reference"
    recovery_fraction: float = 0.9
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizeProbe:
    """The quantisation probe: every model evaluated after its Linear weights are quantised (arXiv 2410.16454).

    Args:
        bits: weight bits, each probed on its own (4 or 8).
        group_size: input features that share one quantisation scale.
        method: ``rtn`` (round to nearest, any device) or ``nf4`` (bitsandbytes NormalFloat-4; CUDA only).
        include_embeddings: also quantise the input/output embeddings (kept in full precision by default, as
            bitsandbytes and GPTQ deployments do).
    """

    bits: list[int] = field(default_factory=lambda: [8, 4])
    group_size: int = 128
    method: Literal["rtn", "nf4"] = "rtn"
    include_embeddings: bool = False


@dataclass
class WeightProbe:
    """Weight-space diagnostics: L2 distance of every model to the reference and the teacher, and its metrics along
    the straight line from the teacher (arXiv 2505.22310).

    Args:
        points: points along each teacher → model line, both ends included (at least 2).
    """

    points: int = 5


@dataclass
class ProbeSection:
    """Probes of every model beside the attacks (results under ``probes/``, sections of the report).

    Args:
        quantize: the quantisation probe; ``null`` (default): off.
        weights: the weight-space diagnostics; ``null`` (default): off.
        data: ``RetainForgetDataModule`` arguments merged over the shared ``data:`` and ``relearn.data`` (the
            attack's evaluation data) for the probes' evaluations.
    """

    quantize: QuantizeProbe | None = None
    weights: WeightProbe | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportSection:
    """What ``report.md`` / ``report.json`` show.

    Args:
        steps: attack steps at which the worst-case forget metric is reported (relative robustness at the last).
        metric: forget metric (``val/forget_acc``, ``val/forget_ce``, ...).
        mode: the attacker's direction for ``metric``: ``max`` (accuracy) or ``min`` (CE).
        retain_metric: retain metric of the "before" column (default: ``metric`` with forget -> retain).
        max_retain_drop: utility bound: LRs whose retain metric drops more than this are not counted.
        oracle: stage used as the oracle anchor (default: the one with role ``oracle``).
        teacher: stage used as the unlearn-only anchor (default: the one with role ``teacher``).
        include_unlearning_compute: add the teacher's unlearning FLOPs to the students' relative compute.
        ddof: delta degrees of freedom of the std over seeds.
        tradeoff_y: y axis of ``robustness_vs_compute.png``: ``forget`` or ``relative_robustness``.
        ci_level: level of the bootstrap intervals over attack seeds.
        ci_resamples: bootstrap resamples.
        ci_seed: seed of the bootstrap resampling.
    """

    steps: list[int] = field(default_factory=lambda: [25, 100, 300])
    metric: str = "val/forget_acc"
    mode: Mode = "max"
    retain_metric: str | None = None
    max_retain_drop: float | None = None
    oracle: str | None = None
    teacher: str | None = None
    include_unlearning_compute: bool = False
    ddof: int = 0
    tradeoff_y: TradeoffY = "forget"
    ci_level: float = 0.95
    ci_resamples: int = 2000
    ci_seed: int = 0


@dataclass
class ExperimentConfig:
    """A whole UNDO experiment (``undo pipeline``).

    Args:
        name: experiment name (default: the config file's name).
        out_dir: run folder (default: ``runs/<name>``).
        seed: seed of every stage (model initialisation, data, noise).
        data: ``RetainForgetDataModule`` arguments shared by every stage.
        trainer: ``lightning.Trainer`` arguments shared by every stage.
        pretrain: ``PretrainModule`` settings of the reference and the oracle.
        reference: the model to unlearn (pretrained on retain + forget data, or an existing model).
        oracle: the data-filtering gold standard (pretrained on retain data only, or an existing model); ``null``:
            none (relative robustness and compute are then not available).
        collapse_guard: an unlearning stage (the teacher, a baseline) whose retain accuracy ends more than this below
            the reference's, or whose retain CE ends above that of a uniform guess over the vocabulary (``ln V``),
            fails instead of being marked finished: it destroyed the model rather than removing the forget capability
            (e.g. GradDiff at a too large learning rate). ``null``: no guard.
        oracle_exposure: how much the pretrained oracle trains: ``equal_steps`` (default: the reference's step
            budget, so with a 50/50 reference mixture the oracle sees twice the reference's retain tokens) or
            ``equal_retain_tokens`` (its step budget scaled so that it sees the same retain tokens as the reference;
            the authors kept add/sub exposure equal and filled the rest with English, which this data lacks).
        unlearn: the teacher (``UnlearnModule``).
        baselines: further ``UnlearnModule`` runs by name (merged over ``unlearn``), attacked like every model.
        students: further ``DistillModule`` runs by name (merged over ``distill``), attacked like every model. Their
            ``model.teacher`` and ``model.student_init`` may name a stage of this experiment (``oracle``, a
            baseline, ...): e.g. oracle matching (``{teacher: oracle, student_init: reference}``) or distilling a
            baseline teacher (``{teacher: graddiff}``); a student's relative robustness is measured against its own
            teacher when that is an unlearned model.
        distill: full distillation of the teacher into a random student (``DistillModule``); ``null``: none.
        undo: UNDO students, one per alpha; ``null``: none.
        relearn: the relearning attack.
        probes: the quantisation probe and weight-space diagnostics (both off by default).
        report: the report's settings.
    """

    name: str | None = None
    out_dir: str | None = None
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    pretrain: StageSection = field(default_factory=StageSection)
    reference: ModelSection | None = field(default_factory=ModelSection)
    oracle: ModelSection | None = field(default_factory=ModelSection)
    oracle_exposure: OracleExposure = "equal_steps"
    collapse_guard: float | None = 0.5
    unlearn: StageSection = field(default_factory=StageSection)
    baselines: dict[str, StageSection] = field(default_factory=dict)
    students: dict[str, StageSection] = field(default_factory=dict)
    distill: StageSection | None = field(default_factory=StageSection)
    undo: UndoSection | None = field(default_factory=UndoSection)
    relearn: RelearnSection = field(default_factory=RelearnSection)
    probes: ProbeSection = field(default_factory=ProbeSection)
    report: ReportSection = field(default_factory=ReportSection)


#: (class, field) -> the dataclass a section field holds (checked by check_keys)
_SECTION_TYPES = {(ExperimentConfig, "pretrain"): StageSection, (ExperimentConfig, "reference"): ModelSection,
                  (ExperimentConfig, "oracle"): ModelSection, (ExperimentConfig, "unlearn"): StageSection,
                  (ExperimentConfig, "distill"): StageSection, (ExperimentConfig, "undo"): UndoSection,
                  (ExperimentConfig, "relearn"): RelearnSection, (ExperimentConfig, "report"): ReportSection,
                  (ExperimentConfig, "probes"): ProbeSection, (ProbeSection, "quantize"): QuantizeProbe,
                  (ProbeSection, "weights"): WeightProbe}


def parser(prog: str = "undo pipeline"):
    """The jsonargparse parser of :class:`ExperimentConfig` with ``-c/--config`` (and so ``--print_config``)."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    p = ArgumentParser(prog=prog, exit_on_error=False, default_env=False,
                       description="Run the whole UNDO experiment (pretrain, unlearn, distill, UNDO, relearn, "
                                   "report); resumable.")
    p.add_argument("-c", "--config", action=ActionConfigFile,
                   help="experiment YAML (default: configs/arithmetic/quick.yaml, the CPU demo)")
    p.add_class_arguments(ExperimentConfig, None)
    p.add_argument("--overwrite", action=ActionYesNo, default=False,
                   help="replace a run folder that holds another experiment (another name) or is no run folder; a folder "
                        "of the same experiment is always reused stage by stage (changed stages are redone)")
    p.add_argument("--check", action=ActionYesNo, default=False,
                   help="only validate the whole experiment (every section, module, data, model size, attack) and say "
                        "which stages and attack runs a run would reuse, redo or run; changes nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE",
                   help="run just these training stages (and nothing after them), e.g. --only reference oracle")
    return p


def check_keys(raw: dict, where: str) -> None:
    """Unknown keys in the experiment's sections, named before parsing.

    jsonargparse rejects unknown keys with a value but drops one whose value is an empty mapping (``reporting: {}``);
    checking the sections' keys here leaves nothing unknown unreported. Stage sections were ``module:`` before they
    took LightningCLI's ``model:``; that gets its own message.
    """
    def check(section: Any, cls: type, label: str) -> None:
        if not isinstance(section, dict):
            return  # a wrong type is jsonargparse's to report
        if "module" in section and "model" in {f.name for f in fields(cls)}:
            raise ValueError(f"{where}: section {label!r} has `module:`; stage sections now take the LightningCLI "
                             "shape `model:` (the module's arguments), `data:`, `trainer:` — rename `module:` to "
                             "`model:`")
        if cls is RelearnSection and "attack" in section:
            raise ValueError(f"{where}: relearn: `attack: {section['attack']}` is now one of named attack settings: "
                             f"write `attacks: {{{section['attack']}: {{train_on: {section['attack']}}}}}` (several "
                             "settings are attacked and reported side by side)")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(section) - set(known) - (set(RUN_OPTIONS) if cls is ExperimentConfig else set()))
        if unknown:
            raise ValueError(f"{where}: {label + ': ' if label else ''}unknown key(s) {unknown}"
                             f"{did_you_mean(unknown[0], known)}; expected {sorted(known)}")
        for name, value in section.items():
            kind = _SECTION_TYPES.get((cls, name))
            if kind is not None:
                check(value, kind, f"{label}.{name}".lstrip("."))
        for key in ("baselines", "students"):
            for name, value in (section.get(key) or {}).items() if cls is ExperimentConfig else ():
                check(value, StageSection, f"{key}.{name}")
        for name, value in (section.get("attacks") or {}).items() if cls is RelearnSection else ():
            check(value, AttackSetting, f"{label}.attacks.{name}")

    check(raw, ExperimentConfig, "")


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
          "Problem with given class_path", "NoneType", "Given value")


def error_message(err: Exception) -> str:
    """jsonargparse's message without the union bookkeeping: for an optional section (``X | None``) it lists both
    alternatives; the reader needs the key and what was wrong with it."""
    lines = [line for line in str(err).splitlines() if not any(n in line for n in _NOISE)]
    return "\n".join(line.strip() if i else line for i, line in enumerate(lines)) or str(err)


def finish(cfg: dict, stem: str) -> dict:
    """Fills the name and run folder defaults of a parsed config, as plain YAML values (tuples become lists, so the
    config equals its ``config.yaml`` read back)."""
    cfg = json_safe(cfg)
    cfg["name"] = cfg.get("name") or stem
    cfg["out_dir"] = cfg.get("out_dir") or f"runs/{cfg['name']}"
    return cfg


def load_config(path: str | os.PathLike | None) -> dict:
    """Reads and checks an experiment YAML (the shipped CPU demo when ``path`` is None).

    Returns:
        The resolved config as a plain dict: every section present, defaults filled in.

    Raises:
        ValueError: a missing file, an unknown section or key, or a value of the wrong type, naming it.
    """
    import yaml
    from jsonargparse import ArgumentError

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"config={str(path)!r}: no such file" + (" (the default demo config ships with the source "
                                                                   "checkout; pass -c CONFIG)" if path == DEFAULT_CONFIG
                                                                   else ""))
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    check_keys(raw, str(path))
    try:
        namespace = parser().parse_args(["--config", str(path)])
    except ArgumentError as err:
        raise ValueError(f"{path}: {error_message(err)}") from None
    cfg = namespace.as_dict()
    for key in ("config", *RUN_OPTIONS):  # run options, not part of the experiment
        cfg.pop(key, None)
    return finish(cfg, path.stem)
