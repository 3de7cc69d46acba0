"""Every shipped YAML parses against the code's signatures (the typed __init__ is the config)."""

import glob
import os
import subprocess
import sys

import pytest
import yaml

from undo_lightning.cli import _lightning_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
PIPELINE_CONFIGS = {"quick.yaml", "paper.yaml", "smoke.yaml", "local.yaml", "pipeline.yaml"}  # experiment files read by `undo pipeline`
QUICK = os.path.join(ROOT, "configs", "arithmetic", "quick.yaml")  # the CPU demo
SCALE = os.path.join(ROOT, "configs", "arithmetic", "claims", "scale.yaml")  # the demo at the claims' scale
#: the paper's claims: overlays of the demo at the claims' scale (`-c quick.yaml -c claims/scale.yaml -c <claim>`)
CLAIMS_CONFIGS = sorted(c for c in glob.glob(os.path.join(ROOT, "configs", "arithmetic", "claims", "*.yaml"))
                        if c != SCALE)
DATA_CONFIGS = [c for c in CONFIGS if os.path.basename(c) == "data.yaml"]  # shared `data:` blocks of stage configs
STRATEGY_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "strategies", "*.yaml")))  # trainer overlays
#: experiment overlays: applied over the demo (`undo pipeline -c quick.yaml -c attacks.yaml`)
ATTACKS, CONTROLS = (os.path.join(ROOT, "configs", "arithmetic", f"{n}.yaml") for n in ("attacks", "controls"))
OVERLAY_CONFIGS = [ATTACKS, CONTROLS]
STAGE_CONFIGS = [c for c in CONFIGS if os.path.basename(c) not in PIPELINE_CONFIGS and c not in DATA_CONFIGS
                 and c not in CLAIMS_CONFIGS + [SCALE] and c not in STRATEGY_CONFIGS and c not in OVERLAY_CONFIGS]


def test_there_are_configs():
    assert len(STAGE_CONFIGS) >= 2 and DATA_CONFIGS


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shared_data_blocks_parse_and_reach_the_stages_that_name_them(path, tmp_path):
    from undo_lightning.data import RetainForgetDataModule
    from undo_lightning.experiment.sweep import data_kwargs_from_config

    with open(path) as f:
        block = yaml.safe_load(f)
    expected = RetainForgetDataModule.config_kwargs(block)
    users = [c for c in STAGE_CONFIGS if os.path.dirname(c) == os.path.dirname(path)
             and yaml.safe_load(open(c)).get("data") == os.path.basename(path)]
    assert users
    for stage in users:
        cli = _lightning_cli(["--config", stage, f"--trainer.default_root_dir={tmp_path}"], run=False)
        assert (cli.datamodule.block_size, cli.datamodule.mixture) == (expected["block_size"], expected["mixture"])
        assert cli.datamodule.forget.operations == expected["forget"].operations
        # `undo relearn --data_config` reads it too
        assert data_kwargs_from_config(stage)["retain"] == expected["retain"]


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_stage_config_parses_and_instantiates(path, tmp_path):
    cli = _lightning_cli(["--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)
    from undo_lightning.modules import UndoModule

    assert isinstance(cli.model, UndoModule)
    assert cli.trainer.max_steps > 0
    assert cli.datamodule.mixture and cli.datamodule.block_size > 1
    with open(path) as f:
        assert f.readline().startswith("#"), "each config opens with a comment naming the command that runs it"


@pytest.mark.parametrize("path", STRATEGY_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_strategy_overlay_applies_over_a_stage_config(path, tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    stage = os.path.join(ROOT, "configs", "arithmetic", "distill.yaml")
    cli = _lightning_cli(["--config", stage, "--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (cli.trainer.num_devices, 1)
    assert cli.model.holds_frozen_model and cli.trainer.max_steps > 0  # the stage's own settings are kept
    with open(path) as f:
        assert f.readline().startswith("#")


def test_undo_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "undo_lightning.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("fit", "validate", "report"):
        assert command in out


@pytest.mark.slow
def test_print_config_round_trips(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "undo_lightning.cli", "fit", "-c",
                           os.path.join(ROOT, "configs", "arithmetic", "pretrain_oracle.yaml"), "--print_config"],
                          capture_output=True, text=True, check=True)
    assert "undo_lightning.PretrainModule" in proc.stdout and "retain: 1.0" in proc.stdout


@pytest.mark.parametrize("name", sorted(PIPELINE_CONFIGS))
def test_pipeline_configs_validate(name):
    """Experiment files: every stage's module and data module are built from them (models load lazily)."""
    from undo_lightning.experiment.pipeline import load_config, validate

    for path in [c for c in CONFIGS if os.path.basename(c) == name]:
        names = [s.name for s in validate(load_config(path))]
        assert names[0] == "reference" and "unlearn" in names and any(n.startswith("undo_a") for n in names)
        with open(path) as f:
            assert f.readline().startswith("#")


#: the stages each claims config adds to those of the demo at the claims' scale (the paper's three arithmetic claims,
#: one command each)
DEMO_STAGES = ["reference", "oracle", "unlearn", "distill", "undo_a0.2", "undo_a0.5", "undo_a0.8"]
CLAIM_STAGES = {
    "oracle_matching.yaml": DEMO_STAGES + ["match_reference", "match_random"],
    "methods.yaml": DEMO_STAGES[:3] + ["graddiff", "rmu"] + DEMO_STAGES[3:] + ["distill_graddiff", "distill_rmu"],
    "alpha_grid.yaml": DEMO_STAGES[:4] + [f"undo_a{a}_n{n}" for a in (0.1, 0.3, 0.5, 0.7, 0.9) for n in (0, 1)],
    "frontier.yaml": DEMO_STAGES[:4] + ["undo_a0.2", "undo_a0.4", "undo_a0.6", "undo_a0.8", "beta0.5_a0.2",
                                         "beta0.5_a0.4", "beta1_a0.2", "mlp_only_a0.4", "attn_only_a0.4",
                                         "forget_heavy_a0.4", "balanced_a0.4"],
}


def test_claims_scale_is_the_demo_with_more_facts_and_steps():
    """claims/scale.yaml over the demo: the same experiment (name, stages, methods, optimizers, stop rule, attack LRs
    and seeds) with operands 1-20 instead of 1-12, longer step budgets and a 16-block attack."""
    from undo_lightning.data import RetainForgetDataModule
    from undo_lightning.experiment.pipeline import attack_sweeps, load_config, parse_argv, validate

    demo = load_config(QUICK)
    cfg, _ = parse_argv(["-c", QUICK, "-c", SCALE])
    assert cfg["name"] == demo["name"] and cfg["out_dir"] == "runs/claims/scale"
    assert [s.name for s in validate(cfg)] == [s.name for s in validate(demo)] == DEMO_STAGES
    for section in ("pretrain", "unlearn", "distill", "undo"):
        assert cfg[section]["model"] == demo[section]["model"] and cfg[section]["data"] == demo[section]["data"]
        assert cfg[section]["trainer"]["max_steps"] > demo[section]["trainer"]["max_steps"] or section == "unlearn"
    data, demo_data = RetainForgetDataModule.from_config(cfg["data"]), RetainForgetDataModule.from_config(demo["data"])
    assert (data.retain.add_sub_range, data.forget.mul_div_range) == ((1, 20), (1, 20))
    assert (demo_data.retain.add_sub_range, demo_data.forget.mul_div_range) == ((1, 12), (1, 12))
    assert (data.block_size, data.batch_size, data.eval_prompts_per_set) == \
        (demo_data.block_size, demo_data.batch_size, demo_data.eval_prompts_per_set)
    sweep, demo_sweep = attack_sweeps(cfg)["heldout"], attack_sweeps(demo)["heldout"]
    assert (sweep["batch_size"], demo_sweep["batch_size"]) == (16, 8)
    assert {k: v for k, v in sweep.items() if k not in ("batch_size", "data")} == \
        {k: v for k, v in demo_sweep.items() if k not in ("batch_size", "data")}
    with open(SCALE) as f:
        assert f.readline().startswith("#")


@pytest.mark.parametrize("path", CLAIMS_CONFIGS, ids=os.path.basename)
def test_claims_configs_validate(path):
    """Each claims config is an overlay of the demo at the claims' scale: the stages it keeps have that run's records
    (so a copy of its finished folder is reused), and it adds the stages and attack seeds of its claim."""
    from undo_lightning.experiment.pipeline import attack_sweeps, parse_argv, stage_records, validate

    cfg, _ = parse_argv(["-c", QUICK, "-c", SCALE, "-c", path])
    demo, _ = parse_argv(["-c", QUICK, "-c", SCALE])
    stages = {s.name: s for s in validate(cfg)}
    assert list(stages) == CLAIM_STAGES[os.path.basename(path)]
    records, demo_records = stage_records(cfg, list(stages.values())), stage_records(demo, validate(demo))
    assert all(records[name] == demo_records[name] for name in DEMO_STAGES if name in stages)
    assert cfg["name"] == demo["name"]  # runs in a copy of the demo's folder without --overwrite
    # at least 3 attack seeds (the demo has 2) of the demo's attack, which scores trained and held-out facts
    sweeps = attack_sweeps(cfg)
    frontier = os.path.basename(path) == "frontier.yaml"
    assert list(sweeps) == ["heldout"] and sweeps["heldout"]["data"] == attack_sweeps(demo)["heldout"]["data"]
    assert all(len(s["seeds"]) >= 3 for s in sweeps.values())
    assert all(s["lrs"] == demo["relearn"]["lrs"] for s in sweeps.values())
    assert cfg["out_dir"].startswith("runs/claims/")
    if "match_reference" in stages:  # oracle matching: the oracle into the reference and into a random init
        ref, rnd = stages["match_reference"], stages["match_random"]
        assert ref.module["teacher"] == rnd.module["teacher"] == stages["oracle"].hf
        assert (ref.module["student_init"], rnd.module["student_init"]) == (stages["reference"].hf, "random")
        assert ref.trainer == rnd.trainer and ref.module["stop_threshold"] is None  # equal compute, no stop rule
    if "graddiff" in stages:  # each method's teacher distilled with the same settings
        for method in ("graddiff", "rmu"):
            student = stages[f"distill_{method}"]
            assert student.module["teacher"] == stages[method].hf and student.record["teacher_stage"] == method
            assert {k: v for k, v in student.module.items() if k != "teacher"} == \
                {k: v for k, v in stages["distill"].module.items() if k != "teacher"}
            assert student.data == stages["distill"].data
    if frontier:  # each variant is the teacher's noised copy, distilled with the shared settings
        for name in CLAIM_STAGES["frontier.yaml"][8:]:
            assert stages[name].module["student_init"] == "teacher" and stages[name].record["alpha"] in (0.2, 0.4)
            assert stages[name].module["stop_threshold"] == stages["distill"].module["stop_threshold"]
        assert stages["mlp_only_a0.4"].module["noise_include"] == "mlp"
        assert stages["forget_heavy_a0.4"].data["mixture"] == {"retain": 0.1, "forget": 0.9}
        assert stages["beta1_a0.2"].data == stages["distill"].data
    if "undo_a0.1_n0" in stages:  # 2 noise seeds per alpha
        assert stages["undo_a0.5_n1"].module["noise_seed"] == 1 and stages["undo_a0.5_n0"].module["noise_seed"] == 0
    with open(path) as f:
        assert f.readline().startswith("#")


@pytest.mark.slow
def test_cli_console_shows_no_expected_warnings(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "undo_lightning.cli", "fit", "-c",
                           os.path.join(ROOT, "configs", "arithmetic", "pretrain.yaml"),
                           "--model.init_args.model=gemma2-micro", "--trainer.max_steps=2",
                           "--trainer.val_check_interval=2", "--data.eval_prompts_per_set=2",
                           "--data.retain.init_args.train_documents=200", "--data.forget.init_args.train_documents=200",
                           f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert out.count("GPU available") == 1  # Lightning's other messages stay
    assert "Tip:" not in out and "litlogger" not in out
    assert "will override existing callbacks" not in out and "LeafSpec" not in out  # expected, not actionable
    assert "Warning" not in out, out[-2000:]  # no other warning reaches the console either
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_attacks_overlay_adds_attackers_and_probes_to_the_demo():
    """configs/arithmetic/attacks.yaml over the demo: the demo's stages unchanged (a finished demo is reused), its two
    attack settings unchanged, plus a LoRA, a few-shot, a mixture and an unseen-facts attacker and both probes."""
    from undo_lightning.experiment.pipeline import (
        attack_sweeps,
        load_config,
        parse_argv,
        run_records,
        stage_records,
        validate,
    )

    cfg, options = parse_argv(["-c", QUICK, "-c", ATTACKS])
    demo = load_config(QUICK)
    assert options == {"overwrite": False, "only": None, "check": False}
    assert cfg["name"] == demo["name"] and cfg["out_dir"] == "runs/arithmetic-attacks"
    stages, demo_stages = validate(cfg), validate(demo)
    records = stage_records(cfg, stages)
    assert records == stage_records(demo, demo_stages)
    # the demo's attack runs are this experiment's too (reused when it runs in the demo's folder)
    runs, demo_runs = run_records(cfg, stages, records), run_records(demo, demo_stages, records)
    assert len(demo_runs) == 28 and {k: runs[k] for k in demo_runs} == demo_runs and len(runs) == 28 + 5 * 28
    sweeps, demo_sweeps = attack_sweeps(cfg), attack_sweeps(demo)
    assert list(sweeps) == ["forget", "heldout", "lora", "fewshot", "mix", "unseen"]
    assert sweeps["mix"]["attack"] == "mixture" and sweeps["mix"]["data"]["mixture"] == {"retain": 0.875, "forget": 0.125}
    assert sweeps["lora"]["module"] == {"lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear"}}
    assert sweeps["lora"]["lrs"] == [0.001, 0.003] and sweeps["fewshot"]["lrs"] == demo_sweeps["heldout"]["lrs"]
    assert sweeps["fewshot"]["data"]["few_shot"] == 16
    # unseen facts: the demo's forget source with operands outside everything the models were trained on
    unseen, demo_forget = sweeps["unseen"]["data"]["forget"]["init_args"], demo["data"]["forget"]["init_args"]
    assert unseen["mul_div_range"][0] > demo_forget["mul_div_range"][1]
    assert cfg["probes"]["quantize"]["bits"] == [8, 4] and cfg["probes"]["weights"]["points"] == 5
    assert cfg["report"]["max_retain_drop"] == 0.2
    with open(ATTACKS) as f:
        assert f.readline().startswith("#")


def test_controls_overlay_repeats_full_distillation_with_other_seeds_teachers_and_temperature():
    """configs/arithmetic/controls.yaml over the demo: the demo's stages and attack runs unchanged, plus full
    distillation repeated with other seeds, the oracle and the reference as teachers and a softened teacher, every
    variant otherwise the demo's `distill`; every model attacked by the demo's attack and by unseen facts."""
    from undo_lightning.experiment.pipeline import attack_sweeps, load_config, parse_argv, run_records, stage_records, \
        validate

    cfg, _ = parse_argv(["-c", QUICK, "-c", CONTROLS])
    demo = load_config(QUICK)
    stages, demo_stages = {s.name: s for s in validate(cfg)}, validate(demo)
    assert cfg["name"] == demo["name"] and cfg["out_dir"] == "runs/arithmetic-controls"
    records = stage_records(cfg, list(stages.values()))
    assert {s.name: records[s.name] for s in demo_stages} == stage_records(demo, demo_stages)
    base = stages["distill"]
    # each variant's module arguments that differ from the demo's `distill`
    expected = {"distill_seed1": {"seed": 1}, "distill_seed2": {"seed": 2},
                "distill_oracle_teacher": {"teacher": stages["oracle"].hf},
                "distill_reference_teacher": {"teacher": stages["reference"].hf},
                "distill_T2": {"teacher_temperature": 2.0}, "distill_T2_seed1": {"teacher_temperature": 2.0, "seed": 1},
                "distill_T2_seed2": {"teacher_temperature": 2.0, "seed": 2}}
    assert [n for n in stages if n not in DEMO_STAGES] == list(expected)
    for name, want in expected.items():
        changed = {k: v for k, v in stages[name].module.items() if base.module.get(k, "absent") != v}
        assert changed == want, name
        assert stages[name].data == base.data and stages[name].trainer == base.trainer
    sweeps = attack_sweeps(cfg)
    assert list(sweeps) == ["heldout", "unseen"] and sweeps["heldout"] == attack_sweeps(demo)["heldout"]
    unseen = attack_sweeps(parse_argv(["-c", QUICK, "-c", ATTACKS])[0])["unseen"]  # the same attack as attacks.yaml's
    assert {k: v for k, v in sweeps["unseen"].items() if k != "max_retain_drop"} == \
        {k: v for k, v in unseen.items() if k != "max_retain_drop"}  # (attacks.yaml's report has a retain floor)
    runs, demo_runs = run_records(cfg, list(stages.values()), records), run_records(demo, demo_stages, records)
    assert {k: runs[k] for k in demo_runs} == demo_runs and len(runs) == 2 * 2 * 2 * len(stages)
    with open(CONTROLS) as f:
        assert f.readline().startswith("#")
