"""Report on a hand-made run folder: exact table numbers, markdown rows, PNGs, determinism, CLI."""

import json
import math

import pytest

from undo_lightning.experiment.report import build_report, main, write_report

STEPS = [0, 50, 100, 200]  # attack length 200: a requested step 300 must fall back to 200
LRS = (0.001, 0.0001)

# model -> {(lr, seed): forget accuracy at STEPS}; per-seed worst cases and their mean/std are derived in comments.
FORGET = {
    # seed 0 max: [0, .6, .9, .9]; seed 1 max: [0, .4, .7, .9] -> mean [0, .5, .8, .9], std [0, .1, .1, 0]
    "teacher": {(LRS[0], 0): [0.0, 0.6, 0.8, 0.9], (LRS[1], 0): [0.0, 0.4, 0.9, 0.8],
                (LRS[0], 1): [0.0, 0.4, 0.7, 0.9], (LRS[1], 1): [0.0, 0.2, 0.5, 0.7]},
    # mean [0, .1, .2, .3], std 0
    "oracle": {(LRS[0], s): [0.0, 0.1, 0.2, 0.3] for s in (0, 1)} | {(LRS[1], s): [0.0, 0.0, 0.1, 0.2] for s in (0, 1)},
    # seed 0 max: [0, .3, .4, .6]; seed 1 max: [0, .2, .3, .4] -> mean [0, .25, .35, .5], std [0, .05, .05, .1]
    "undo_a0.6": {(LRS[0], 0): [0.0, 0.2, 0.4, 0.6], (LRS[1], 0): [0.0, 0.3, 0.3, 0.3],
                  (LRS[0], 1): [0.0, 0.2, 0.3, 0.4], (LRS[1], 1): [0.0, 0.1, 0.1, 0.1]},
    "undo_a0.2": {(lr, s): [0.0, 0.5, 0.7, 0.8] for lr in LRS for s in (0, 1)},
    "distill": {(lr, s): [0.0, 0.15, 0.25, 0.35] for lr in LRS for s in (0, 1)},
    "reference": {(lr, s): [0.9, 0.95, 0.95, 0.95] for lr in LRS for s in (0, 1)},
}

STAGES = {  # name: (role, alpha, beta, retain_acc, forget_acc, flops, tokens, wall_time_s)
    "reference": ("reference", None, None, 0.95, 0.90, 2e12, 2_000_000, 20.0),
    "oracle": ("oracle", None, None, 0.94, 0.05, 1e12, 1_000_000, 10.0),
    "teacher": ("teacher", None, None, 0.93, 0.02, 1e11, 100_000, 5.0),
    "undo_a0.6": ("student", 0.6, 0.1, 0.92, 0.03, 2.5e11, 250_000, 7.5),
    "undo_a0.2": ("student", 0.2, 0.1, 0.93, 0.02, 1e11, 100_000, 4.0),
    "distill": ("student", None, None, 0.91, 0.04, 5e11, 500_000, 12.0),
    "maxent_sam": ("baseline", None, None, 0.90, 0.10, 1.5e11, 150_000, 6.0),  # never attacked
}


SPLIT_TOKENS = {"reference": {"tokens_by_split": {"retain": 1_000_000, "forget": 1_000_000}},
                "oracle": {"tokens_by_split": {"retain": 1_000_000, "forget": 0}}}


def ce(acc):  # a forget CE that falls as accuracy rises, for the mode="min" (language-style) check
    return round(3.0 - 2.0 * acc, 10)


def make_run(root, retain_override=None):
    for name, (role, alpha, beta, ret, fgt, flops, tokens, wall) in STAGES.items():
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps({
            "stage": name, "role": role, "alpha": alpha, "beta": beta,
            "val": {"val/retain_acc": ret, "val/forget_acc": fgt, "val/retain_ce": 1.0, "val/forget_ce": ce(fgt)},
            "compute": {"tokens": tokens, "flops": flops, **SPLIT_TOKENS.get(name, {})}, "wall_time_s": wall,
            "global_step": 100}))
    for model, runs in FORGET.items():
        for (lr, seed), acc in runs.items():
            d = root / "relearn" / model / f"lr={lr}_seed={seed}"
            d.mkdir(parents=True)
            retain = (retain_override or {}).get((model, lr, seed), [0.9] * len(STEPS))
            (d / "curve.json").write_text(json.dumps({
                "model": model, "lr": lr, "seed": seed, "attack": "forget", "steps": STEPS,
                "metrics": {"val/forget_acc": acc, "val/retain_acc": retain,
                            "val/forget_ce": [ce(a) for a in acc], "val/retain_ce": [1.0] * len(STEPS)}}))
    # a retain-data attack on the teacher that must not leak into the forget-attack worst case
    d = root / "relearn" / "teacher" / "lr=0.01_seed=0_retain"
    d.mkdir()
    (d / "curve.json").write_text(json.dumps({
        "model": "teacher", "lr": 0.01, "seed": 0, "attack": "retain", "steps": STEPS,
        "metrics": {"val/forget_acc": [1.0] * 4, "val/retain_acc": [1.0] * 4, "val/forget_ce": [ce(1.0)] * 4,
                    "val/retain_ce": [1.0] * 4}}))
    return root


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def by_name(report, attack="forget"):
    """Each model's entry, with the given attack setting's results merged in."""
    return {m["name"]: {**m, **m["attacks"][attack]} for m in report["models"]}


def test_report_json_numbers(run):
    rep = write_report(run, steps=[50, 100, 300])
    assert json.loads((run / "report.json").read_text()) == rep
    # every attack setting with runs is reported, forget first; each says what it trained on
    assert list(rep["attacks"]) == ["forget", "retain"]
    assert rep["attacks"]["retain"]["train_on"] == "retain" and "RETAIN-ONLY" in rep["attacks"]["retain"]["description"]
    assert [m["name"] for m in rep["models"]] == [
        "reference", "oracle", "teacher", "undo_a0.2", "undo_a0.6", "distill", "maxent_sam"]
    assert rep["anchors"] == {"oracle": "oracle", "teacher": "teacher"}
    assert rep["steps"] == [50, 100, 300] and rep["relative_robustness_step"] == 300
    m = by_name(rep)
    undo = m["undo_a0.6"]
    assert undo["role"] == "student" and undo["alpha"] == 0.6 and undo["beta"] == 0.1
    assert undo["full_distill"] is False and m["distill"]["full_distill"] is True
    assert (undo["retain_before"], undo["forget_before"]) == (0.92, 0.03)
    # per-seed worst cases: two seeds, so the bootstrap means are a, (a + b) / 2 and b: the 95 % interval is [b, a]
    assert undo["after"] == [
        {"requested_step": 50, "step": 50, "mean": 0.25, "std": 0.05, "ci": [0.2, 0.3]},
        {"requested_step": 100, "step": 100, "mean": 0.35, "std": 0.05, "ci": [0.3, 0.4]},
        # beyond the attack: last step, recorded
        {"requested_step": 300, "step": 200, "mean": 0.5, "std": 0.1, "ci": [0.4, 0.6]},
    ]
    # trapezoids 50*(0+.25)/2 + 50*(.25+.35)/2 + 100*(.35+.5)/2 = 63.75 over 200 steps
    assert undo["auc"] == 0.31875
    # (0.5 - 0.9) / (0.3 - 0.9)
    assert undo["relative_robustness"] == 0.666667
    # paired seeds (teacher 0.9/0.9, oracle 0.3/0.3): seed 0 alone (0.6) gives 0.5, seed 1 alone (0.4) 0.833333
    assert undo["relative_robustness_ci"] == [0.5, 0.833333]
    assert undo["relative_compute"] == 0.25 and undo["flops"] == 2.5e11
    assert undo["tokens"] == 250_000 and "wall_time_s" not in undo and undo["global_step"] == 100
    assert undo["runs"] == {"n_runs": 4, "lrs": [0.0001, 0.001], "seeds": [0, 1]}

    assert m["teacher"]["after"][-1] == {"requested_step": 300, "step": 200, "mean": 0.9, "std": 0.0,
                                         "ci": [0.9, 0.9]}
    assert m["teacher"]["after"][0]["mean"] == 0.5 and m["teacher"]["after"][0]["std"] == 0.1
    assert m["teacher"]["runs"]["n_runs"] == 4  # the retain-data attack is not counted
    retain = by_name(rep, "retain")
    assert retain["teacher"]["runs"]["n_runs"] == 1 and retain["teacher"]["after"][-1]["mean"] == 1.0
    assert retain["undo_a0.6"]["runs"] is None and retain["undo_a0.6"]["after"][-1]["mean"] is None
    rr = {n: e["relative_robustness"] for n, e in m.items()}
    assert rr == {"reference": -0.0833333, "oracle": 1.0, "teacher": 0.0, "undo_a0.2": 0.166667,
                  "undo_a0.6": 0.666667, "distill": 0.916667, "maxent_sam": None}
    rc = {n: e["relative_compute"] for n, e in m.items()}
    assert rc == {"reference": 2.0, "oracle": 1.0, "teacher": 0.1, "undo_a0.2": 0.1, "undo_a0.6": 0.25,
                  "distill": 0.5, "maxent_sam": 0.15}
    # never attacked: numbers before the attack only, NaN -> null
    sam = m["maxent_sam"]
    assert sam["runs"] is None and sam["auc"] is None and sam["relative_robustness_ci"] == [None, None]
    assert sam["after"][0] == {"requested_step": 50, "step": None, "mean": None, "std": None, "ci": [None, None]}
    assert rep["curves"]["forget"]["undo_a0.6"] == {"steps": STEPS, "mean": [0.0, 0.25, 0.35, 0.5],
                                                    "std": [0.0, 0.05, 0.05, 0.1]}
    assert "maxent_sam" not in rep["curves"]["forget"] and list(rep["curves"]["retain"]) == ["teacher"]


def test_report_md_rows(run):
    write_report(run, steps=[50, 100, 300])
    md = (run / "report.md").read_text()
    assert ("| model | role | α | β | retain_acc before | forget_acc before | rel. compute | wall time (s) | "
            "tokens (retain / forget) |") in md
    # the anchors' exposure to each split is stated
    assert "- reference `reference` trained on 2,000,000 (1,000,000 / 1,000,000) tokens" in md
    assert "- oracle `oracle` trained on 1,000,000 (1,000,000 / 0) tokens" in md
    assert "| oracle | oracle | – | – | 0.940 | 0.050 | 100 % | 10.0 | 1,000,000 (1,000,000 / 0) |" in md
    assert "| undo_a0.6 | student | 0.6 | 0.1 | 0.920 | 0.030 | 25 % | 7.5 | 250,000 |" in md
    assert "| maxent_sam | baseline | – | – | 0.900 | 0.100 | 15 % | 6.0 | 150,000 |" in md
    # one table per attack setting, forget first
    forget, retain = md.index("## attack `forget` (fine-tuned on forget data)"), \
        md.index("## attack `retain` (fine-tuned on retain data only)")
    assert forget < retain
    assert ("| model | worst forget_acc @50 | worst forget_acc @100 | worst forget_acc @300 | AUC | "
            "rel. robustness @300 | runs (LRs × seeds) |") in md
    assert ("| undo_a0.6 | 0.250 ± 0.050 [0.200, 0.300] | 0.350 ± 0.050 [0.300, 0.400] | "
            "0.500 ± 0.100 [0.400, 0.600] (@200) | 0.319 | 0.667 [0.500, 0.833] | 2 × 2 |") in md[forget:retain]
    assert "| oracle | 0.100 ± 0.000 [0.100, 0.100] | 0.200 ± 0.000 [0.200, 0.200] |" in md[forget:retain]
    assert "| maxent_sam | – | – | – | – | – | – |" in md[forget:retain]
    assert "| teacher | 1.000 ± 0.000 [1.000, 1.000] |" in md[retain:]
    assert "| teacher |" in md and "-0.000" not in md  # (0.9 - 0.9) / negative is shown as 0.000
    for word in ("worst case", "rel. robustness", "rel. compute", "Legend"):
        assert word.lower() in md.lower()


def test_budget_hit_students_are_flagged(run):
    record = json.loads((run / "distill" / "metrics.json").read_text())
    (run / "distill" / "metrics.json").write_text(json.dumps({**record, "budget_hit": True}))
    record = json.loads((run / "undo_a0.2" / "metrics.json").read_text())
    (run / "undo_a0.2" / "metrics.json").write_text(json.dumps({**record, "budget_hit": False}))
    report = write_report(run, steps=[50, 100, 300])
    flags = {m["name"]: m["budget_hit"] for m in report["models"]}
    assert (flags["distill"], flags["undo_a0.2"], flags["reference"]) == (True, False, None)
    md = (run / "report.md").read_text()
    assert "| distill ⚠ budget hit | student |" in md and "| undo_a0.2 | student |" in md
    assert "*⚠ budget hit*" in md  # explained in the legend


def test_pngs_written_and_valid(run):
    from matplotlib.image import imread

    write_report(run, steps=[50, 300], tradeoff_y="relative_robustness")
    for name in ("relearn_curves.png", "relearn_curves_retain.png", "robustness_vs_compute.png",
                 "retain_vs_forget.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        img = imread(run / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_rerun_is_byte_identical(run):
    write_report(run)
    first = (run / "report.json").read_bytes()
    first_md = (run / "report.md").read_bytes()
    write_report(run)
    assert (run / "report.json").read_bytes() == first
    assert (run / "report.md").read_bytes() == first_md
    json.loads(first)  # valid strict JSON (no NaN tokens)
    assert b"NaN" not in first


def test_default_steps_and_attack_length(run):
    rep = build_report(run)  # steps (25, 100, 300); evaluated at 0, 50, 100, 200
    undo = by_name(rep)["undo_a0.6"]
    assert [(a["requested_step"], a["step"]) for a in undo["after"]] == [(25, 0), (100, 100), (300, 200)]
    assert undo["after"][0]["mean"] == 0.0
    assert math.isnan(by_name(rep)["maxent_sam"]["auc"])  # build_report keeps NaN; only the JSON has null


def test_language_setting_ce_min(run):
    # forget CE = 3 - 2 * acc: the attacker's min CE per seed mirrors the max accuracy, so relative robustness
    # is unchanged and worst-case CE = 3 - 2 * worst-case accuracy.
    rep = write_report(run, steps=[100, 300], metric="val/forget_ce", mode="min")
    assert rep["retain_metric"] == "val/retain_ce"
    undo = by_name(rep)["undo_a0.6"]
    assert undo["after"][-1] == {"requested_step": 300, "step": 200, "mean": 2.0, "std": 0.2, "ci": [1.8, 2.2]}
    assert undo["relative_robustness"] == 0.666667
    assert undo["forget_before"] == 2.94 and undo["retain_before"] == 1.0
    assert "worst forget_ce @300" in (run / "report.md").read_text()


def test_utility_bound_and_compute_basis(tmp_path):
    # seed 0, lr 1e-3 of undo_a0.6 loses 0.4 retain accuracy from step 100 on: with a 0.2 bound it is ignored
    # there, so seed 0's worst case becomes [0, .3, .3, .3] and the step-200 mean (0.3 + 0.4) / 2 = 0.35.
    run = make_run(tmp_path / "run", {("undo_a0.6", 0.001, 0): [0.9, 0.9, 0.5, 0.5]})
    rep = write_report(run, steps=[300], max_retain_drop=0.2, include_unlearning_compute=True)
    undo = by_name(rep)["undo_a0.6"]
    assert undo["after"] == [{"requested_step": 300, "step": 200, "mean": 0.35, "std": 0.05, "ci": [0.3, 0.4]}]
    # (0.35 - 0.9) / (0.3 - 0.9)
    assert undo["relative_robustness"] == 0.916667
    # distillation 2.5e11 + teacher unlearning 1e11 over oracle 1e12; non-students unchanged
    assert undo["relative_compute"] == 0.35 and by_name(rep)["teacher"]["relative_compute"] == 0.1
    assert "teacher unlearning" in rep["compute_basis"]


def test_missing_anchor_gives_null_relative_robustness(run):
    import shutil

    shutil.rmtree(run / "oracle")
    shutil.rmtree(run / "relearn" / "oracle")
    rep = write_report(run, steps=[300])
    assert rep["anchors"]["oracle"] is None
    assert all(m["relative_robustness"] is None and m["relative_compute"] is None for m in by_name(rep).values())


def test_degenerate_anchors_warn(run):
    with pytest.warns(UserWarning, match="degenerate anchors"):
        rep = build_report(run, steps=[0])  # at step 0 oracle and teacher both sit at 0.0
    assert all(math.isnan(m["relative_robustness"]) for m in by_name(rep).values())


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no <stage>/metrics.json"):
        main(str(tmp_path))
    make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="'avg'"):
        build_report(tmp_path / "run", mode="avg")
    with pytest.raises(ValueError, match="steps"):
        build_report(tmp_path / "run", steps=[])
    with pytest.raises(ValueError, match="'nobody'"):
        build_report(tmp_path / "run", oracle="nobody")


def test_main_through_jsonargparse(run, capsys):
    from jsonargparse import CLI

    CLI(main, args=[str(run), "--steps", "[50, 300]", "--metric", "val/forget_acc", "--mode", "max"])
    out = capsys.readouterr().out
    assert "| undo_a0.6 |" in out and "report.json" in out
    assert json.loads((run / "report.json").read_text())["steps"] == [50, 300]


def test_undo_report_keeps_the_runs_own_settings(run, capsys):
    """`undo report RUN` on a pipeline folder rewrites the pipeline's report: its `report:` section and attack
    settings are the defaults; options given on the command line still win."""
    import yaml
    from jsonargparse import CLI

    (run / "config.yaml").write_text(yaml.safe_dump({"report": {"steps": [50, 300], "ddof": 1, "ci_level": 0.5},
                                                     "relearn": {"attacks": {"forget": {}, "retain": {"data": {
                                                         "forget": {"init_args": {"eval_fact_fraction": 0.5}}}}}}}))
    CLI(main, args=[str(run), "--attacks", "[forget]"])
    rep = json.loads((run / "report.json").read_text())
    assert rep["steps"] == [50, 300] and rep["std_ddof"] == 1 and rep["interval"]["level"] == 0.5
    assert list(rep["attacks"]) == ["forget"]  # as asked, not every setting found (retain)
    assert "relearn_curves_retain.png" not in capsys.readouterr().out
    CLI(main, args=[str(run)])
    rep = json.loads((run / "report.json").read_text())
    assert list(rep["attacks"]) == ["forget", "retain"]  # the run's own settings
    # what each attack changed in the data is stated with it
    assert rep["attacks"]["retain"]["data"] == {"forget.init_args.eval_fact_fraction": 0.5}
    assert "## attack `retain` (fine-tuned on retain data only; data: forget.init_args.eval_fact_fraction=0.5)" in \
        (run / "report.md").read_text()
    (run / "config.yaml").write_text(yaml.safe_dump({"report": {"steps": [50, 300], "ddof": 1, "ci_level": 0.5},
                                                     "relearn": {"attacks": {"forget": {}}}}))
    CLI(main, args=[str(run)])
    assert list(json.loads((run / "report.json").read_text())["attacks"]) == ["forget"]
    CLI(main, args=[str(run), "--steps", "[100]", "--attacks", "[retain]"])
    rep = json.loads((run / "report.json").read_text())
    assert rep["steps"] == [100] and list(rep["attacks"]) == ["retain"] and rep["std_ddof"] == 1
    # the run's retain floor applies unless the command line names another or turns it off
    (run / "config.yaml").write_text(yaml.safe_dump({"report": {"max_retain_drop": 0.2}}))
    for args, floor in (([], 0.2), (["--max_retain_drop", "0.5"], 0.5), (["--max_retain_drop", "off"], None)):
        CLI(main, args=[str(run), *args])
        assert json.loads((run / "report.json").read_text())["max_retain_drop"] == floor, args


def _add_stage(run, name, role, forget_curve, **record):
    (run / name).mkdir()
    (run / name / "metrics.json").write_text(json.dumps({
        "stage": name, "role": role, "alpha": None, "beta": None, "val": {"val/retain_acc": 0.9, "val/forget_acc": 0.0},
        "compute": {"tokens": 1, "flops": 1e11}, "global_step": 10, **record}))
    for lr in LRS:
        for seed in (0, 1):
            d = run / "relearn" / name / f"lr={lr}_seed={seed}"
            d.mkdir(parents=True)
            (d / "curve.json").write_text(json.dumps({
                "model": name, "lr": lr, "seed": seed, "attack": "forget", "steps": STEPS,
                "metrics": {"val/forget_acc": forget_curve, "val/retain_acc": [0.9] * 4}}))


def test_a_student_of_a_baseline_is_measured_against_its_own_teacher(run):
    # graddiff relearns to 0.7 at step 200, its student to 0.5; oracle 0.3: (0.5 - 0.7) / (0.3 - 0.7) = 0.5
    _add_stage(run, "graddiff", "baseline", [0.0, 0.5, 0.6, 0.7])
    _add_stage(run, "distill_graddiff", "student", [0.0, 0.2, 0.4, 0.5], teacher_stage="graddiff",
               student_init="random")
    # oracle matching: a student of the oracle, initialised from the reference; not an unlearned teacher's student
    _add_stage(run, "match_reference", "student", [0.0, 0.1, 0.2, 0.3], teacher_stage="oracle",
               student_init="runs/x/reference/hf")
    rep = write_report(run, steps=[300], attacks=["forget"])
    m = by_name(rep)
    assert m["distill_graddiff"]["teacher_anchor"] == "graddiff"
    assert m["distill_graddiff"]["relative_robustness"] == 0.5
    assert m["distill_graddiff"]["relative_robustness_ci"] == [0.5, 0.5]
    # the experiment's anchor for the rest: graddiff itself (0.7 - 0.9) / (0.3 - 0.9) = 0.333333
    assert m["graddiff"]["teacher_anchor"] == "teacher" and m["graddiff"]["relative_robustness"] == 0.333333
    assert m["match_reference"]["teacher_anchor"] == "teacher" and m["match_reference"]["relative_robustness"] == 1.0
    assert m["match_reference"]["full_distill"] is False and m["distill_graddiff"]["full_distill"] is True
    md = (run / "report.md").read_text()
    assert "| distill_graddiff | 0.500 ± 0.000 [0.500, 0.500] (@200) | " in md
    assert "0.500 [0.500, 0.500] (vs graddiff)" in md


def test_undo_students_over_noise_seeds_are_summarised_per_alpha(run):
    # a second noise seed of α 0.6: worst case at step 200 is 0.7 for both attack seeds -> RR (0.7 - 0.9) / -0.6
    _add_stage(run, "undo_a0.6_n1", "student", [0.0, 0.3, 0.5, 0.7], teacher_stage="unlearn", student_init="teacher")
    for name, seed in (("undo_a0.6_n1", 1), ("undo_a0.6", 0)):
        record = json.loads((run / name / "metrics.json").read_text())
        record.update({"alpha": 0.6, "beta": 0.1, "noise_seed": seed, "student_init": "teacher"})
        (run / name / "metrics.json").write_text(json.dumps(record))
    # a noised student of the `students:` section with the same α is a point of its own, not a noise seed of α 0.6
    _add_stage(run, "other_a0.6", "student", [0.0, 0.0, 0.0, 0.0], alpha=0.6, beta=0.1, noise_seed=2,
               student_init="teacher", group="students")
    rep = write_report(run, steps=[300], attacks=["forget"], ddof=0)
    [group] = rep["noise_seed_groups"]  # α 0.2 has one student: no group
    assert (group["alpha"], group["beta"], group["noise_seeds"]) == (0.6, 0.1, [0, 1])
    assert sorted(group["members"]) == ["undo_a0.6", "undo_a0.6_n1"]
    # worst case 0.5 and 0.7; relative robustness 0.666667 and 0.333333
    assert group["attacks"]["forget"]["worst_case"] == {"mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7}
    rr = group["attacks"]["forget"]["relative_robustness"]
    assert rr["mean"] == 0.5 and rr["min"] == 0.333333 and rr["max"] == 0.666667 and rr["std"] == 0.166667
    md = (run / "report.md").read_text()
    assert "## UNDO students over noise seeds" in md
    assert ("| 0.6 | 0.1 | 0, 1 | 0.600 ± 0.100 (range 0.500 – 0.700) | 0.500 ± 0.167 (range 0.333 – 0.667) |"
            in md)


def test_pareto_frontier_by_hand():
    from undo_lightning.experiment.report import pareto_frontier

    points = [("a", 0.5, 0.2), ("b", 0.3, 0.6), ("c", 0.8, 0.9), ("d", 0.3, 0.4),  # d: same compute, less robust
              ("e", 0.9, 0.9),  # e: as robust as c, more compute
              ("f", 0.2, float("nan")), ("g", 1.2, 0.95)]
    assert pareto_frontier(points) == ["b", "c", "g"]
    assert pareto_frontier([]) == [] and pareto_frontier([("x", 0.1, 0.1)]) == ["x"]


def test_report_lists_the_students_frontier(run):
    rep = write_report(run, steps=[300], attacks=["forget"])
    # students: undo_a0.2 (compute 0.1, RR 0.166667), undo_a0.6 (0.25, 0.666667), distill (0.5, 0.916667)
    assert rep["frontier"] == {"forget": ["undo_a0.2", "undo_a0.6", "distill"]}
    md = (run / "report.md").read_text()
    assert ("- attack `forget`: `undo_a0.2` (10 %, 0.167) → `undo_a0.6` (25 %, 0.667) → `distill` (50 %, 0.917)"
            in md)


def test_an_attack_scoring_trained_and_held_out_facts_is_two_column_groups_of_one_run_set(run):
    """A held-out-facts attack whose curves also carry ``val/forget_trained_acc`` is reported twice from the same
    runs: ``heldout`` reads the held-out facts, ``heldout.trained`` the facts the attacker trains on."""
    held = {"teacher": [0.0, 0.3, 0.5, 0.6], "oracle": [0.0, 0.0, 0.1, 0.2], "undo_a0.6": [0.0, 0.1, 0.2, 0.3]}
    trained = {"teacher": [0.0, 0.6, 0.8, 1.0], "oracle": [0.0, 0.2, 0.4, 0.5], "undo_a0.6": [0.0, 0.3, 0.5, 0.6]}
    for model in held:
        for lr in LRS:
            d = run / "relearn" / model / f"lr={lr}_seed=0_heldout"
            d.mkdir()
            (d / "curve.json").write_text(json.dumps({
                "model": model, "lr": lr, "seed": 0, "attack": "heldout", "train_on": "forget", "steps": STEPS,
                "metrics": {"val/forget_acc": held[model], "val/forget_trained_acc": trained[model],
                            "val/retain_acc": [0.9] * 4}}))
    rep = write_report(run, steps=[300], attacks=["forget", "heldout"])
    assert list(rep["attacks"]) == ["forget", "heldout", "heldout.trained"]
    assert rep["attacks"]["heldout.trained"]["runs"] == "heldout"
    assert rep["attacks"]["heldout.trained"]["metric"] == "val/forget_trained_acc"
    h, t = by_name(rep, "heldout"), by_name(rep, "heldout.trained")
    assert h["teacher"]["after"][-1]["mean"] == 0.6 and t["teacher"]["after"][-1]["mean"] == 1.0
    assert h["undo_a0.6"]["runs"]["n_runs"] == t["undo_a0.6"]["runs"]["n_runs"] == 2
    # (0.3 - 0.6) / (0.2 - 0.6) and (0.6 - 1.0) / (0.5 - 1.0)
    assert h["undo_a0.6"]["relative_robustness"] == 0.75 and t["undo_a0.6"]["relative_robustness"] == 0.8
    assert by_name(rep)["teacher"]["after"][-1]["mean"] == 0.9  # the forget attack's own runs are untouched
    md = (run / "report.md").read_text()
    assert "## attack `heldout` (fine-tuned on forget data; scored on the material it never trains on)" in md
    assert ("## attack `heldout.trained` (fine-tuned on forget data; the runs of `heldout` scored on the material "
            "they train on)") in md
    assert (run / "relearn_curves_heldout.trained.png").is_file()
