"""End to end: the seconds-scale pipeline writes every artifact of the run folder, resumes, and refuses mixed runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from undo_lightning.data import RetainForgetDataModule
from undo_lightning.experiment.pipeline import load_config, plan, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "arithmetic" / "smoke.yaml"
STAGES = ["reference", "oracle", "unlearn", "distill", "undo_a0.3", "undo_a0.7"]


@pytest.mark.slow
def test_every_artifact_is_written(smoke_run):
    out, report = smoke_run
    assert [s.name for s in plan(load_config(SMOKE))] == STAGES
    assert yaml.safe_load((out / "config.yaml").read_text())["out_dir"] == str(out)
    roles = {}
    for stage in STAGES:
        root = out / stage
        assert (root / "DONE").is_file() and (root / "hf" / "model.safetensors").is_file()
        assert (root / "hf" / "tokenizer.json").is_file() and (root / "checkpoints" / "last.ckpt").is_file()
        assert list((root / "tb").glob("events.out.tfevents.*"))
        metrics = json.loads((root / "metrics.json").read_text())
        roles[stage] = metrics["role"]
        assert metrics["compute"]["flops"] > 0 and "val/retain_acc" in metrics["val"]
        runs = sorted(p.name for p in (out / "relearn" / stage).iterdir())
        assert runs == ["lr=0.001_seed=0", "lr=0.003_seed=0"]
        curve = json.loads((out / "relearn" / stage / runs[0] / "curve.json").read_text())
        assert curve["steps"] == [0, 3, 6] and curve["attack"] == "forget"
    assert roles == {"reference": "reference", "oracle": "oracle", "unlearn": "teacher", "distill": "student",
                     "undo_a0.3": "student", "undo_a0.7": "student"}
    assert json.loads((out / "undo_a0.7" / "metrics.json").read_text())["alpha"] == 0.7
    for name in ("report.md", "report.json", "relearn_curves.png", "robustness_vs_compute.png",
                 "retain_vs_forget.png"):
        assert (out / name).stat().st_size > 0
    assert {m["name"] for m in report["models"]} == set(STAGES)


@pytest.mark.slow
def test_rerun_skips_finished_stages(smoke_run):
    out, report = smoke_run
    stamps = {s: (out / s / "DONE").stat().st_mtime_ns for s in STAGES}
    curve = out / "relearn" / "unlearn" / "lr=0.001_seed=0" / "curve.json"
    curve_stamp = curve.stat().st_mtime_ns
    again = run_pipeline(str(SMOKE), out_dir=str(out))
    assert {s: (out / s / "DONE").stat().st_mtime_ns for s in STAGES} == stamps
    assert curve.stat().st_mtime_ns == curve_stamp
    assert again == report


@pytest.mark.slow
def test_refuses_a_folder_holding_another_experiment(smoke_run, tmp_path):
    out, _ = smoke_run
    other = yaml.safe_load(SMOKE.read_text())
    other["name"] = "another-experiment"
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match="holds the experiment 'arithmetic-smoke', not 'another-experiment'"):
        run_pipeline(str(path), out_dir=str(out))
    assert (out / "unlearn" / "DONE").is_file()


def _stamps(out: Path) -> dict[str, int]:
    """Modification time of every stage's DONE and every attack run's curve.json, by path."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in [*out.glob("*/DONE"), *out.glob("relearn/*/*/curve.json")]}


@pytest.mark.slow
def test_a_changed_setting_redoes_only_what_depends_on_it(smoke_run, tmp_path, capsys):
    """Per-stage reuse: an attack-only change redoes attack runs only; a teacher change redoes the teacher and every
    stage and run downstream of it, keeps the reference and the oracle, and the log says which and why."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    before = _stamps(out)
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["relearn"]["lrs"] = [0.001, 0.002]  # 0.003 dropped, 0.002 new
    cfg["trainer"]["enable_progress_bar"] = True  # cosmetic: redoes nothing
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    report = run_pipeline(str(path), out_dir=str(out))
    after = _stamps(out)
    err = capsys.readouterr().err
    kept = {k for k in before if after.get(k) == before[k]}
    assert {k for k in before if k.endswith("DONE")} <= kept  # no stage retrained
    assert {k for k in after if "lr=0.001_" in k} <= kept
    assert not any("lr=0.003_" in k for k in after) and sum("lr=0.002_" in k for k in after) == len(STAGES)
    assert "removed 6 attack run(s) the config no longer asks for" in err
    assert all(m["attacks"]["forget"]["runs"]["lrs"] == [0.001, 0.002] for m in report["models"])

    cfg["unlearn"]["model"]["optimizer"]["lr"] = 0.002
    path.write_text(yaml.safe_dump(cfg))
    before = after
    run_pipeline(str(path), out_dir=str(out))
    after = _stamps(out)
    err = capsys.readouterr().err
    changed = {k.split("/")[0] if not k.startswith("relearn") else k.split("/")[1]
               for k in before if after.get(k) != before[k]}
    assert changed == {"unlearn", "distill", "undo_a0.3", "undo_a0.7"}
    assert "unlearn: settings changed: model.optimizer.lr 0.001 -> 0.002; removing" in err
    assert "distill: its input unlearn changed; removing" in err
    record = json.loads((out / "undo_a0.7" / "stage.json").read_text())
    assert record["model"]["teacher"] == "<stage unlearn>" and set(record["inputs"]) == {"unlearn"}


@pytest.mark.slow
def test_attacker_search_runs_are_reused_and_removed_with_the_search(smoke_run, tmp_path):
    """relearn.search_rounds: each model gets 2 more LRs (every seed), a re-run reuses them, and a config without the
    search removes them while keeping the grid."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["relearn"]["search_rounds"] = 1
    cfg["report"]["max_retain_drop"] = 0.5
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    grid = _stamps(out)
    run_pipeline(str(path), out_dir=str(out))
    searched = {k: v for k, v in _stamps(out).items() if k not in grid}
    assert len(searched) == 2 * len(STAGES) and {k: v for k, v in _stamps(out).items() if k in grid} == grid
    for key in searched:
        record = json.loads((out / Path(key).parent / "run.json").read_text())
        assert record["search_round"] == 1 and record["lr"] not in cfg["relearn"]["lrs"]
    summary = json.loads((out / "relearn_summary.json").read_text())
    assert summary["search"]["max_retain_drop"] == 0.5
    assert all(len(lrs) == 4 for lrs in summary["search"]["lrs"].values())
    run_pipeline(str(path), out_dir=str(out))
    assert _stamps(out) == {**grid, **searched}  # nothing redone
    cfg["relearn"]["search_rounds"] = 0
    path.write_text(yaml.safe_dump(cfg))
    run_pipeline(str(path), out_dir=str(out))
    assert _stamps(out) == grid


@pytest.mark.slow
def test_a_stage_the_config_drops_is_removed_with_its_runs(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["undo"]["alphas"] = [0.3]
    path = tmp_path / "fewer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = run_pipeline(str(path), out_dir=str(out))
    assert not (out / "undo_a0.7").exists() and not (out / "relearn" / "undo_a0.7").exists()
    assert "undo_a0.7" not in {m["name"] for m in report["models"]}


def test_bad_config_fails_before_training(tmp_path):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["unlearn"]["model"]["method"] = "forget-harder"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="forget-harder"):
        run_pipeline(str(path), out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["reporting"] = {}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="reporting"):
        run_pipeline(str(path), out_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["undo"].update(modle={"lr": 0.1}), r"undo: unknown key\(s\) \['modle'\]"),  # one level down
    (lambda c: c["relearn"].update(stepz=5), r"relearn: unknown key\(s\) \['stepz'\]"),
    (lambda c: c["undo"].update(modle={}), r"\['modle'\]"),  # an empty mapping too
    (lambda c: c["report"].update(steps=7), r"report.steps"),
    (lambda c: c["distill"]["model"].update(stop_treshold=0.1), "stop_treshold"),  # inside a module's arguments
    (lambda c: c["unlearn"].update(module=c["unlearn"].pop("model")), "rename `module:` to `model:`"),
    # attack settings: a misspelt key inside one, a bad kind, a bad name, the old single `attack:`, bad data/LRs
    (lambda c: c["relearn"].update(attacks={"heldout": {"dta": {}}}), r"relearn.attacks.heldout: unknown key"),
    (lambda c: c["relearn"].update(attacks={"x": {"train_on": "both"}}), "train_on"),
    (lambda c: c["relearn"].update(attacks={"a/b": {}}), "attack setting name 'a/b'"),
    (lambda c: c["relearn"].update(attack="retain"), r"write `attacks: \{retain: \{train_on: retain\}\}`"),
    (lambda c: c["relearn"].update(attacks={"mix": {"train_on": "mixture", "data": {"mixture": {"forget": 2.0}}}}),
     r"relearn \(attack setting 'mix'\): .*mixture"),
    (lambda c: c["relearn"].update(lrs=[0.001, -1.0]), r"relearn \(attack setting 'forget'\): lrs="),
])
def test_misspelt_or_mistyped_keys_anywhere_fail_before_training(tmp_path, edit, match):
    _refused(tmp_path, edit, match)


def _refused(tmp_path: Path, edit, match: str) -> None:
    """The smoke config edited by ``edit`` is refused with ``match`` before any run folder exists."""
    cfg = yaml.safe_load(SMOKE.read_text())
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=match):
        run_pipeline(str(path), out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("trainer, match", [
    ({"max_steps": 0}, r"unlearn: trainer.max_steps=0: expected a positive number of optimizer steps"),
    ({"max_steps": -1}, r"unlearn: trainer.max_steps=-1: .*trainer.max_epochs >= 1 \(max_epochs=None\)"),
])
def test_a_stage_without_a_step_budget_fails_before_training(tmp_path, trainer, match):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["unlearn"]["trainer"].update(trainer)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=match):
        run_pipeline(str(path), out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_truncated_checkpoint_is_named_before_any_training(tmp_path, monkeypatch):
    import undo_lightning.experiment.pipeline as pipeline

    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    def no_training(*args):
        raise RuntimeError("a stage started")

    monkeypatch.setattr(pipeline, "run_stage", no_training)
    with pytest.raises(RuntimeError, match="a stage started"):  # lays out the run folder (config.yaml) only
        run_pipeline(str(path))
    ckpt = tmp_path / "run" / "distill" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(64)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # a copy cut short
    with pytest.raises(ValueError, match=rf"distill: cannot resume from {ckpt}: not a readable checkpoint .*"
                                         rf"rm {ckpt}\) and run the same command again"):
        run_pipeline(str(path))


def test_print_config_round_trips_and_cli_overrides_apply(tmp_path):
    env = dict(os.environ)
    printed = subprocess.run([sys.executable, "-m", "undo_lightning.cli", "pipeline", "-c", str(SMOKE),
                              "--relearn.steps", "4", "--print_config"], env=env, capture_output=True, text=True,
                             check=True).stdout
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    expected = load_config(SMOKE)
    expected["relearn"]["steps"] = 4
    assert load_config(path) == expected  # every default made explicit, the override applied


@pytest.mark.slow
def test_sigkill_during_a_stage_then_resume_gives_the_same_report(smoke_run, tmp_path):
    """Kill -9 the pipeline once the reference stage has a checkpoint, re-run: same report as uninterrupted."""
    _, report = smoke_run
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "undo_lightning.cli", "pipeline", "-c", str(SMOKE), "--out_dir",
                             str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "reference" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (out / "reference" / "DONE").exists(), "the kill must land inside the stage"
    assert run_pipeline(str(SMOKE), out_dir=str(out)) == report


@pytest.mark.slow
def test_existing_reference_model_and_no_oracle(smoke_run, tmp_path):
    """`reference: {model: PATH}` evaluates that model instead of pretraining; `oracle: null` leaves the oracle out."""
    smoke_out, _ = smoke_run
    existing = smoke_out / "reference" / "hf"
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg.update(reference={"model": str(existing)}, oracle=None, undo={**cfg["undo"], "alphas": [0.5]})
    path = tmp_path / "existing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    report = run_pipeline(str(path), out_dir=str(out))

    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["distill", "reference", "relearn", "undo_a0.5",
                                                                   "unlearn"]
    assert not (out / "reference" / "hf").exists() and (out / "reference" / "DONE").is_file()
    # same model, same data and prompts: its evaluation equals the metrics the smoke run's reference stage wrote
    before = json.loads((smoke_out / "reference" / "metrics.json").read_text())["val"]
    evaluated = json.loads((out / "reference" / "metrics.json").read_text())
    assert evaluated["role"] == "reference" and evaluated["model"] == str(existing)
    for key in ("val/retain_acc", "val/forget_acc", "val/retain_ce", "val/forget_ce"):
        assert evaluated["val"][key] == pytest.approx(before[key], abs=1e-6), key
    assert json.loads((out / "unlearn" / "metrics.json").read_text())["model"] == str(existing)
    assert (out / "relearn" / "reference" / "lr=0.001_seed=0" / "curve.json").is_file()

    assert report["anchors"]["oracle"] is None and "oracle = none" in (out / "report.md").read_text()
    rows = {m["name"]: m for m in report["models"]}
    assert set(rows) == {"reference", "unlearn", "distill", "undo_a0.5"}
    assert all(m["attacks"]["forget"]["relative_robustness"] is None and m["relative_compute"] is None
               for m in rows.values())  # no oracle
    assert rows["reference"]["retain_before"] == pytest.approx(before["val/retain_acc"], abs=1e-6)
    for name in ("report.md", "relearn_curves.png", "robustness_vs_compute.png", "retain_vs_forget.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("section, match", [
    ({"reference": None}, "every experiment needs a reference"),
    ({"reference": {"model": "runs/x/hf", "trainer": {"max_steps": 5}}}, "it is not trained, so it takes no"),
    ({"oracle": {"model": ""}}, "an existing model is given as"),
    ({"reference": "runs/x/hf"}, r"'runs/x/hf': expected a section"),
])
def test_bad_reference_or_oracle_section(section, match):
    cfg = {**load_config(SMOKE), **section}
    with pytest.raises(ValueError, match=match):
        plan(cfg)


def test_each_attack_setting_is_one_sweep_with_its_own_data(monkeypatch, tmp_path, capsys):
    """`relearn: {data: ...}` is merged into the shared data for every attack setting, each setting's `data:` over
    that, for the sweep only; each setting is one sweep under its own name."""
    import undo_lightning.experiment.sweep as attack
    from undo_lightning.experiment.pipeline import run_relearn

    cfg = load_config(SMOKE)
    cfg["relearn"] = {**cfg["relearn"], "data": {"forget": {"init_args": {"train_documents": 1500}}}, "attacks": {
        "forget": {},
        "heldout": {"data": {"forget": {"init_args": {"eval_fact_fraction": 0.5}}}},
        "authors_mix": {"train_on": "mixture", "data": {"mixture": {"retain": 0.875, "forget": 0.125}}}}}
    cfg["trainer"]["enable_progress_bar"] = True  # the stages' bars; attack runs log one line each instead
    seen = []

    def sweep(**kwargs):
        seen.append(kwargs)
        attack.log.info("[1/1] %s: one attack run", kwargs["setting"])

    monkeypatch.setattr(attack, "run_sweep", sweep)
    run_relearn(cfg, tmp_path, plan(cfg), {})
    # the sweep's per-run lines reach the console in the pipeline's format, and only while the pipeline attacks
    err = capsys.readouterr().err
    assert re.search(r"\[undo pipeline \d\d:\d\d:\d\d\] relearn: \[1/1\] heldout: one attack run", err)
    assert not attack.log.handlers
    assert [(s["setting"], s["attack"]) for s in seen] == [
        ("forget", "forget"), ("heldout", "forget"), ("authors_mix", "mixture")]
    data = {s["setting"]: RetainForgetDataModule.config_kwargs(s["data"]) for s in seen}
    for kwargs in data.values():  # the shared settings stay, the relearn section's override applies to all
        assert kwargs["forget"].operations == ("mul", "div") and kwargs["forget"].mul_div_range == (1, 5)
        assert kwargs["forget"].train_documents == 1500 and kwargs["retain"].eval_fact_fraction is None
    assert data["heldout"]["forget"].eval_fact_fraction == 0.5 and data["forget"]["forget"].eval_fact_fraction is None
    assert data["authors_mix"]["mixture"] == {"retain": 0.875, "forget": 0.125}
    assert all(s["lrs"] == [0.001, 0.003] and set(s["models"]) == set(STAGES) for s in seen)
    assert all("enable_progress_bar" not in s["trainer"] and s["trainer"]["accelerator"] == "cpu" for s in seen)
    from undo_lightning.experiment.pipeline import _datamodule

    for stage in plan(cfg):  # the training stages never see the attack's override
        assert _datamodule(cfg, stage.data).forget.eval_fact_fraction is None, stage.name


def test_students_name_their_teacher_and_init_by_stage():
    """Oracle matching and distilling a baseline teacher: `students:` resolve stage names to model folders."""
    cfg = load_config(SMOKE)
    cfg["baselines"] = {"graddiff": {"model": {"method": "graddiff"}}}
    cfg["students"] = {"match_reference": {"model": {"teacher": "oracle", "student_init": "reference"}},
                       "distill_graddiff": {"model": {"teacher": "graddiff"}},
                       "undo_graddiff": {"model": {"teacher": "graddiff", "student_init": "teacher", "alpha": 0.4}}}
    stages = {s.name: s for s in plan(cfg)}
    out = Path(cfg["out_dir"])
    match = stages["match_reference"]
    assert (match.module["teacher"], match.module["student_init"]) == (str(out / "oracle/hf"),
                                                                       str(out / "reference/hf"))
    assert match.record == {"alpha": None, "beta": None, "teacher_stage": "oracle", "student_init_stage": "reference",
                            "group": "students"}
    assert match.module["optimizer"] == cfg["distill"]["model"]["optimizer"]  # merged over the distill section
    assert match.trainer == cfg["distill"]["trainer"]
    graddiff = stages["distill_graddiff"]
    assert graddiff.module["teacher"] == str(out / "graddiff/hf") and graddiff.module["student_init"] == "random"
    assert stages["undo_graddiff"].record["alpha"] == 0.4 and stages["undo_graddiff"].record["beta"] == 0.1
    assert stages["distill"].record["teacher_stage"] == "unlearn"
    assert list(stages)[-3:] == ["match_reference", "distill_graddiff", "undo_graddiff"]
    cfg["students"] = {"oracle": {"model": {"teacher": "unlearn"}}}
    with pytest.raises(ValueError, match="students.oracle: a stage named 'oracle' exists already"):
        plan(cfg)


def test_a_misspelt_key_in_a_student_fails(tmp_path):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["students"] = {"match": {"modle": {"teacher": "oracle"}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"students.match: unknown key\(s\) \['modle'\]"):
        run_pipeline(str(path), out_dir=str(tmp_path / "run"))


def test_noise_seeds_give_one_student_per_alpha_and_seed():
    cfg = load_config(SMOKE)
    cfg["undo"]["noise_seeds"] = [3, 4]
    stages = {s.name: s for s in plan(cfg)}
    names = [n for n in stages if n.startswith("undo_")]
    assert names == ["undo_a0.3_n3", "undo_a0.3_n4", "undo_a0.7_n3", "undo_a0.7_n4"]
    a, b = stages["undo_a0.7_n3"], stages["undo_a0.7_n4"]
    assert (a.module["noise_seed"], b.module["noise_seed"]) == (3, 4) and a.module["seed"] == b.module["seed"] == 0
    assert {k: v for k, v in a.module.items() if k != "noise_seed"} == {k: v for k, v in b.module.items()
                                                                        if k != "noise_seed"}
    assert a.record == {"alpha": 0.7, "beta": 0.1, "teacher_stage": "unlearn", "noise_seed": 3, "group": "undo"}
    cfg["undo"]["noise_seeds"] = None  # one seed: the plain stage names, the model's noise_seed if it sets one
    cfg["undo"]["model"]["noise_seed"] = 9
    assert [s.module["noise_seed"] for s in plan(cfg) if s.name.startswith("undo_")] == [9, 9]
    assert [s.name for s in plan(cfg) if s.name.startswith("undo_")] == ["undo_a0.3", "undo_a0.7"]
    cfg["undo"]["noise_seeds"] = [1, 2]
    with pytest.raises(ValueError, match="both model.noise_seed and noise_seeds"):
        plan(cfg)
    del cfg["undo"]["model"]["noise_seed"]
    cfg["undo"]["noise_seeds"] = [1, 1]
    with pytest.raises(ValueError, match=r"undo.noise_seeds=\[1, 1\]: expected distinct"):
        plan(cfg)


def test_oracle_exposure_equal_retain_tokens_scales_its_step_budget():
    cfg = load_config(SMOKE)
    stages = {s.name: s for s in plan(cfg)}
    assert stages["oracle"].trainer["max_steps"] == stages["reference"].trainer["max_steps"] == 30  # equal steps
    cfg["oracle_exposure"] = "equal_retain_tokens"
    stages = {s.name: s for s in plan(cfg)}
    # the reference trains on a 50/50 mixture, the oracle on retain only: half the steps, the same retain tokens
    assert stages["oracle"].trainer["max_steps"] == 15 and stages["reference"].trainer["max_steps"] == 30
    assert stages["oracle"].record["exposure"] == "equal_retain_tokens"
    cfg["oracle"] = {"data": {"batch_size": 8}}  # half the rows per step: back to 30 steps
    assert {s.name: s for s in plan(cfg)}["oracle"].trainer["max_steps"] == 30
    cfg["oracle"] = {"trainer": {"max_steps": 7}}
    with pytest.raises(ValueError, match="remove oracle.trainer.max_steps"):
        plan(cfg)
    cfg["oracle"] = None
    with pytest.raises(ValueError, match="needs a pretrained reference and a pretrained oracle"):
        plan(cfg)


def test_deep_merge_merges_mappings_but_replaces_an_object_of_another_class():
    from undo_lightning.experiment.pipeline import deep_merge

    base = {"model": {"method": {"class_path": "undo_lightning.MaxEnt", "init_args": {"retain_weight": 1.0,
                                                                                       "convex": False}},
                      "optimizer": {"lr": 0.1, "schedule": "constant"}}}
    same = deep_merge(base, {"model": {"method": {"init_args": {"retain_weight": 2.0}}, "optimizer": {"lr": 0.2}}})
    assert same["model"]["method"]["init_args"] == {"retain_weight": 2.0, "convex": False}
    assert same["model"]["optimizer"] == {"lr": 0.2, "schedule": "constant"}
    other = deep_merge(base, {"model": {"method": {"class_path": "undo_lightning.RMU", "init_args": {"layer": 1}}}})
    assert other["model"]["method"] == {"class_path": "undo_lightning.RMU", "init_args": {"layer": 1}}  # no MaxEnt args
    assert base["model"]["method"]["init_args"] == {"retain_weight": 1.0, "convex": False}  # inputs untouched


def test_collapse_guard_leaves_a_destroyed_teacher_unfinished(tmp_path):
    from undo_lightning.experiment.pipeline import _check_collapse

    cfg = load_config(SMOKE)
    stages = {s.name: s for s in plan(cfg)}
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "metrics.json").write_text(json.dumps({"val": {"val/retain_acc": 0.84}}))
    collapsed = {"val": {"val/retain_acc": 0.0, "val/forget_acc": 0.0}}
    with pytest.raises(ValueError, match=r"unlearn: retain accuracy fell from 0.840 \(reference\) to 0.000, more "
                                         r"than collapse_guard=0.5.*model.optimizer.lr"):
        _check_collapse(stages["unlearn"], cfg, tmp_path, collapsed)
    _check_collapse(stages["unlearn"], cfg, tmp_path, {"val": {"val/retain_acc": 0.40}})  # a drop of 0.44 passes
    _check_collapse(stages["distill"], cfg, tmp_path, collapsed)  # students are not unlearning stages
    _check_collapse(stages["unlearn"], {**cfg, "collapse_guard": None}, tmp_path, collapsed)  # guard off
    # without a config.json the vocabulary is unknown: CE is not judged
    _check_collapse(stages["unlearn"], cfg, tmp_path, {"val": {"val/retain_ce": 9.0}})
    # with one: a retain CE above ln V (a uniform guess) is a collapse even where accuracy says nothing (language data,
    # or a reference whose own accuracy is 0); just below ln V passes
    (tmp_path / "unlearn" / "hf").mkdir(parents=True)
    (tmp_path / "unlearn" / "hf" / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    (tmp_path / "reference" / "metrics.json").write_text(json.dumps({"val": {"val/retain_ce": 2.5}}))
    with pytest.raises(ValueError, match=r"unlearn: retain CE rose from 2.5 \(reference\) to 6.910, worse than guessing "
                                         r"uniformly over the 1000-token vocabulary \(ln 1000 = 6.908\)"):
        _check_collapse(stages["unlearn"], cfg, tmp_path, {"val": {"val/retain_ce": 6.91}})
    _check_collapse(stages["unlearn"], cfg, tmp_path, {"val": {"val/retain_ce": 6.90}})


@pytest.mark.slow
def test_check_validates_and_says_what_a_run_would_do_without_changing_anything(smoke_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    before = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["undo"]["model"]["beta"] = 0.2  # both UNDO students change
    cfg["relearn"]["seeds"] = [0, 1]  # new runs for every model
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert run_pipeline(str(path), out_dir=str(out), check=True) == {}
    captured = capsys.readouterr()
    assert {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert re.search(r"undo_a0.3: settings changed: model.beta 0.1 -> 0.2; .*would remove", captured.err)
    states = dict(re.findall(r"^  (\S+) .* (finished, reused|runs)$", captured.out, re.M))
    assert states == {**{s: "finished, reused" for s in STAGES[:4]}, "undo_a0.3": "runs", "undo_a0.7": "runs"}
    # 6 models x 2 LRs x 2 seeds; finished and reused: the 4 unchanged models' seed-0 runs
    assert "6 training stages and 24 attack runs" in captured.out and "8 finished, reused; 16 to run" in captured.out
    # a fresh folder: nothing is created
    assert run_pipeline(str(SMOKE), out_dir=str(tmp_path / "fresh"), check=True) == {}
    assert not (tmp_path / "fresh").exists()


def test_only_names_stages_of_the_experiment(tmp_path):
    with pytest.raises(ValueError, match=r"only=\['refrence'\]: 'refrence' is not a training stage of this "
                                         r"experiment \(did you mean 'reference'\?\)"):
        run_pipeline(str(SMOKE), out_dir=str(tmp_path / "run"), only=["refrence"])
    assert not (tmp_path / "run").exists()


def test_model_dependent_settings_fail_before_training(tmp_path):
    """RMU's layer against the preset's depth, a student init folder with another vocabulary than the teacher, and a
    block shorter than one example: refused before the first stage, though the models do not exist yet."""
    from undo_lightning.data.tokenizers import load_tokenizer
    from undo_lightning.models import build_model, export_model

    def refused(edit, match):
        _refused(tmp_path, edit, match)

    refused(lambda c: c["unlearn"]["model"].update(method={"class_path": "undo_lightning.RMU",
                                                            "init_args": {"layer": 2}}),
            r"unlearn: model.method: RMU layer=2, .*block index 2 is out of range; the model has 2 decoder layers")
    refused(lambda c: c["data"].update(block_size=5),
            r"reference: data.block_size=5: shorter than one answer-scored example \('.*' -> '.*' takes \d+ tokens")
    # a folder whose vocabulary is larger than the data's (another tokenizer) as the init of a student
    tokenizer = load_tokenizer("arithmetic")
    model = build_model("gemma2-micro", tokenizer, seed=0)
    model.resize_token_embeddings(512)
    other = export_model(model, tokenizer, str(tmp_path / "other" / "hf"))
    refused(lambda c: c.update(students={"odd": {"model": {"student_init": other}}}),
            r"odd: model.student_init='.*other/hf' has vocab_size=512 but model.teacher='.*unlearn/hf' has "
            r"vocab_size=\d+")
