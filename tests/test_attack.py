import json
import os

import numpy as np
import pytest
from conftest import small_datamodule

import undo_lightning.experiment.sweep as attack
from undo_lightning.data import ArithmeticSource, DocumentSource
from undo_lightning.experiment.sweep import format_lr, parse_models, run_folder, run_sweep
from undo_lightning.models import build_model, export_model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Two exported gemma2-micro models (different inits) standing in for trained stages."""
    root = tmp_path_factory.mktemp("stages")
    return {name: export_model(build_model("gemma2-micro", tokenizer, seed=seed), tokenizer, str(root / name / "hf"))
            for name, seed in (("reference", 1), ("teacher", 2))}


def _data(tokenizer):
    return lambda seed: small_datamodule(tokenizer, seed=seed, docs=300, prompts=4)


def _curve(out, name, lr, seed=0, attack_="forget"):
    return json.loads((run_folder(out, name, lr, seed, attack_) / "curve.json").read_text())


@pytest.fixture
def count_runs(monkeypatch):
    calls = []
    real = attack.run_attack

    def counted(*args, **kwargs):
        calls.append(args[:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(attack, "run_attack", counted)
    return calls


def test_sweep_writes_runs_and_summary_then_resumes(tokenizer, models, tmp_path, count_runs):
    lrs = [1e-3, 3e-3]
    kwargs = dict(lrs=lrs, seeds=[0], out_dir=tmp_path, steps=4, eval_every=2, data=_data(tokenizer),
                  report_steps=[2, 4])
    summary = run_sweep(models, **kwargs)
    assert len(count_runs) == 4
    for name in models:
        for lr in lrs:
            folder = tmp_path / "relearn" / name / f"lr={format_lr(lr)}_seed=0"
            assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder / "tb"))
            curve = _curve(tmp_path, name, lr)
            assert curve["steps"] == [0, 2, 4] and curve["model"] == name and curve["lr"] == lr
    # the worst case over LRs, AUC and steps-to-reach, recomputed here from the curve files
    on_disk = json.loads((tmp_path / "relearn_summary.json").read_text())
    assert on_disk["models"].keys() == set(models) and on_disk["lrs"] == lrs
    for name in models:
        ce = np.array([_curve(tmp_path, name, lr)["metrics"]["val/forget_ce"] for lr in lrs])
        best = ce.min(axis=0)  # the attacker wants the lowest forget CE
        wc = on_disk["models"][name]["worst_case"]["val/forget_ce"]
        np.testing.assert_allclose(wc["mean"], best)
        assert wc["std"] == [0.0, 0.0, 0.0]  # one seed
        assert wc["auc"] == pytest.approx(((best[0] + best[1]) / 2 + (best[1] + best[2]) / 2) / 2)
        assert wc["at"]["2"]["mean"] == pytest.approx(best[1])
        acc = np.array([_curve(tmp_path, name, lr)["metrics"]["val/forget_acc"] for lr in lrs]).max(axis=0)
        np.testing.assert_allclose(on_disk["models"][name]["worst_case"]["val/forget_acc"]["mean"], acc)
        assert set(on_disk["models"][name]["final_by_lr"]) == {"0.001", "0.003"}
    ref0 = _curve(tmp_path, "reference", 1e-3)["metrics"]["val/forget_acc"][0]
    assert on_disk["reference"] == "reference" and on_disk["recovery_threshold"] == pytest.approx(0.9 * ref0)
    assert summary["models"]["teacher"]["worst_case"].keys() >= {"val/forget_acc", "val/forget_equation_acc",
                                                                 "val/forget_word_problem_acc", "val/forget_ce"}

    # re-run: finished runs are skipped; a folder without curve.json (interrupted) is redone from scratch
    kept = run_folder(tmp_path, "reference", 1e-3, 0)
    redo = run_folder(tmp_path, "teacher", 3e-3, 0)
    mtime = (kept / "curve.json").stat().st_mtime_ns
    before = _curve(tmp_path, "teacher", 3e-3)
    (redo / "curve.json").unlink()
    (redo / "stale.txt").write_text("half-finished")
    count_runs.clear()
    run_sweep(models, **kwargs)
    assert count_runs == [(models["teacher"], "teacher", 3e-3, 0)]
    assert (kept / "curve.json").stat().st_mtime_ns == mtime
    assert not (redo / "stale.txt").exists()
    # the redone run (first run of a fresh data module) equals the original (fourth run on a reused one)
    after = _curve(tmp_path, "teacher", 3e-3)
    assert after["steps"] == before["steps"] and after["metrics"] == before["metrics"]
    # a later sweep with a smaller grid summarises its own runs only, not every run left in the folder
    count_runs.clear()
    small = run_sweep(models, **{**kwargs, "lrs": [1e-3]})
    assert count_runs == [] and small["lrs"] == [1e-3]
    np.testing.assert_allclose(small["models"]["teacher"]["worst_case"]["val/forget_ce"]["mean"],
                               _curve(tmp_path, "teacher", 1e-3)["metrics"]["val/forget_ce"])
    # a sweep with other steps into the same folders refuses before running anything: finished runs are not deleted
    count_runs.clear()
    with pytest.raises(ValueError, match=r"finished attack run\(s\) of another configuration .*another out_dir"):
        run_sweep(models, **{**kwargs, "steps": 6})
    assert count_runs == [] and (kept / "curve.json").stat().st_mtime_ns == mtime
    # so does one with the same steps on another model under the same name, or another batch size (the run records)
    assert json.loads((kept / "run.json").read_text())["inputs"] == {"model": models["reference"]}
    for other in ({"models": {"reference": models["teacher"]}}, {"batch_size": 3}):
        with pytest.raises(ValueError, match=r"finished attack run\(s\) of another configuration"):
            run_sweep(**{"models": models, **kwargs, **other})
    assert count_runs == [] and (kept / "curve.json").stat().st_mtime_ns == mtime
    # under another setting name it runs beside them
    run_sweep({"teacher": models["teacher"]}, **{**kwargs, "lrs": [1e-3], "steps": 6, "setting": "longer"})
    longer = json.loads((run_folder(tmp_path, "teacher", 1e-3, 0, "longer") / "curve.json").read_text())
    assert (longer["attack"], longer["train_on"], longer["steps"][-1]) == ("longer", "forget", 6)
    assert (tmp_path / "relearn_summary_longer.json").is_file()


def test_same_seed_same_curve_other_seed_differs(tokenizer, models, tmp_path):
    one = {"teacher": models["teacher"]}
    run_sweep(one, [3e-3], [0, 1], tmp_path / "a", steps=3, eval_every=3, data=_data(tokenizer))
    run_sweep(one, [3e-3], [0], tmp_path / "b", steps=3, eval_every=3, data=_data(tokenizer))
    a0, a1, b0 = (_curve(tmp_path / d, "teacher", 3e-3, s) for d, s in (("a", 0), ("a", 1), ("b", 0)))
    assert a0["metrics"] == b0["metrics"]
    assert a0["metrics"]["val/forget_ce"][-1] != a1["metrics"]["val/forget_ce"][-1]
    summary = json.loads((tmp_path / "a" / "relearn_summary.json").read_text())
    wc = summary["models"]["teacher"]["worst_case"]["val/forget_ce"]
    finals = [a0["metrics"]["val/forget_ce"][-1], a1["metrics"]["val/forget_ce"][-1]]
    assert wc["mean"][-1] == pytest.approx(np.mean(finals)) and wc["std"][-1] == pytest.approx(np.std(finals))


def test_attack_seeds_share_documents_and_prompts(models, tmp_path):
    """With data given as arguments, the attack seed changes the batch order only: step 0 (same model, same prompts)
    is identical across seeds, the attacked curves are not."""
    source = "undo_lightning.ArithmeticSource"
    data = {"retain": {"class_path": source, "init_args": {"operations": ["add", "sub"], "train_documents": 300,
                                                           "val_documents": 40, "add_sub_range": [1, 50]}},
            "forget": {"class_path": source, "init_args": {"operations": ["mul", "div"], "train_documents": 300,
                                                           "val_documents": 40, "mul_div_range": [1, 20]}},
            "block_size": 32, "batch_size": 8, "eval_prompts_per_set": 4, "seed": 5}
    run_sweep({"teacher": models["teacher"]}, [3e-3], [0, 1], tmp_path, steps=3, eval_every=3, data=data)
    s0, s1 = (_curve(tmp_path, "teacher", 3e-3, s)["metrics"] for s in (0, 1))
    for key in ("val/forget_ce", "val/retain_ce", "val/forget_acc"):
        assert s0[key][0] == s1[key][0], key
    assert s0["val/forget_ce"][-1] != s1["val/forget_ce"][-1]


def test_retain_only_attack_is_kept_apart(tokenizer, models, tmp_path):
    run_sweep({"teacher": models["teacher"]}, [1e-3], [0], tmp_path, steps=2, eval_every=2, data=_data(tokenizer),
              attack="retain")
    folder = tmp_path / "relearn" / "teacher" / "lr=0.001_seed=0_retain"
    assert json.loads((folder / "curve.json").read_text())["attack"] == "retain"
    summary = json.loads((tmp_path / "relearn_summary_retain.json").read_text())
    assert summary["attack"] == "retain" and "2505.22310" in summary["attack_description"]
    assert not (tmp_path / "relearn_summary.json").exists()


class _Empty(DocumentSource):
    def documents(self, split, seed):
        return []


@pytest.mark.parametrize("change, match", [
    (dict(lrs=[]), r"lrs=\[\]: the LR grid is empty"),
    (dict(lrs=[1e-3, 0.0]), r"positive finite numbers, got \[0.0\]"),
    (dict(lrs=[-1e-4]), r"got \[-0.0001\]"),
    (dict(lrs=[1e-3, 0.001]), "duplicate learning rates"),
    (dict(models={"gone": "/nonexistent/stage/hf"}), r"model 'gone': '/nonexistent/stage/hf' is not a Hugging Face"),
    (dict(seeds=[]), r"seeds=\[\]"),
    (dict(attack="both"), "attack='both'"),
    (dict(report_steps=[-1]), r"report_steps=\[-1\]"),
    (dict(trainer={"max_steps": 9}), r"\['max_steps'\] are set by the relearning sweep"),
    (dict(data={"forget": _Empty(), "retain": ArithmeticSource(train_documents=20, val_documents=20)}),
     "the forget source has an empty train split"),
    (dict(data={"bogus": 1}), "bad data settings"),
])
def test_bad_inputs_fail_before_any_run(tokenizer, models, tmp_path, change, match):
    kwargs = dict(models=models, lrs=[1e-3], seeds=[0], out_dir=tmp_path / "out", steps=2, eval_every=1,
                  data=_data(tokenizer))
    with pytest.raises(ValueError, match=match):
        run_sweep(**{**kwargs, **change})
    assert not (tmp_path / "out").exists()


def test_model_names_and_lr_folders():
    assert parse_models(["runs/x/oracle/hf", "t=runs/x/unlearn_maxent/hf", "/m/plain"]) == {
        "oracle": "runs/x/oracle/hf", "t": "runs/x/unlearn_maxent/hf", "plain": "/m/plain"}
    with pytest.raises(ValueError, match="given twice"):
        parse_models(["a/oracle/hf", "b/oracle/hf"])
    with pytest.raises(ValueError, match="models=\\[\\]"):
        parse_models([])
    for lr, text in ((3e-4, "0.0003"), (1e-6, "0.000001"), (7e-5, "0.00007"), (4.62e-6, "0.00000462"), (1e-3, "0.001")):
        assert format_lr(lr) == text and float(text) == lr
    assert run_folder("o", "m", 3e-4, 2, "retain").as_posix() == "o/relearn/m/lr=0.0003_seed=2_retain"


def test_cli_with_a_stage_config(tmp_path, models, monkeypatch, capsys):
    from undo_lightning.cli import main

    config = tmp_path / "stage.yaml"
    config.write_text("""
data:
  forget:
    class_path: undo_lightning.ArithmeticSource
    init_args: {operations: [mul, div], train_documents: 200, val_documents: 30, eval_forms: [equation]}
  retain:
    class_path: undo_lightning.ArithmeticSource
    init_args: {operations: [add, sub], train_documents: 200, val_documents: 30, eval_forms: [equation]}
  block_size: 32
""")
    main(["relearn", f"[t={models['teacher']}]", "--lrs", "[0.002]", "--steps", "2", "--eval_every", "1",
          "--data_config", str(config), "--out_dir", str(tmp_path / "out"), "--eval_prompts_per_set", "2",
          "--batch_size", "4", "--accelerator", "cpu"])
    curve = _curve(tmp_path / "out", "t", 0.002)
    assert curve["steps"] == [0, 1, 2]
    summary = json.loads((tmp_path / "out" / "relearn_summary.json").read_text())
    assert summary["batch_size"] == 4 and summary["reference"] is None  # no model named 'reference' here
    out = capsys.readouterr().out
    # the stage config's data was used: equations only, so no word-problem metric (the default data has one)
    assert "worst case over LRs of val/forget_acc" in out and "val/forget_equation_acc" in out
    assert "word_problem" not in out and "word_problem" not in json.dumps(curve["metrics"])


def _synthetic_attacker(monkeypatch, calls):
    """run_attack replaced by a synthetic attacker: forget accuracy rises with the LR, and LRs >= 3e-3 wreck retain
    accuracy (drop 0.5 after step 0). Writes curve.json as a finished run does."""
    def fake(model, name, lr, seed, folder, datamodule, steps, eval_every, attack_="forget", trainer=None,
             setting=None, module=None):
        calls.append(lr)
        grid = attack.expected_steps(steps, eval_every)
        level = min(1.0, lr * 300)
        curve = {"model": name, "lr": lr, "seed": seed, "attack": setting or attack_, "steps": grid, "metrics": {
            "val/forget_acc": [0.0] + [level] * (len(grid) - 1),
            "val/retain_acc": [0.9] + [0.4 if lr >= 3e-3 else 0.85] * (len(grid) - 1)}}
        (folder / "curve.json").write_text(json.dumps(curve))
        return curve

    monkeypatch.setattr(attack, "run_attack", fake)


def test_attacker_search_respects_the_retain_floor(tokenizer, models, tmp_path, monkeypatch):
    calls = []
    _synthetic_attacker(monkeypatch, calls)
    one = {"teacher": models["teacher"]}
    kwargs = dict(seeds=[0, 1], steps=4, eval_every=2, data=_data(tokenizer), search_rounds=1)
    # with the floor, 1e-2 only counts at step 0: the best LR is 1e-3, the search tries its two midpoints
    summary = run_sweep(one, [1e-4, 1e-3, 1e-2], out_dir=tmp_path / "floor", max_retain_drop=0.2, **kwargs)
    mids = [0.000316, 0.00316]  # geometric midpoints, 3 digits
    np.testing.assert_allclose(summary["search"]["lrs"]["teacher"], sorted([1e-4, 1e-3, 1e-2, *mids]))
    np.testing.assert_allclose(sorted(set(calls[6:])), mids)  # 2 new LRs x 2 seeds after the 6 grid runs
    assert len(calls) == 10
    record = json.loads((run_folder(tmp_path / "floor", "teacher", mids[0], 1) / "run.json").read_text())
    assert record["search_round"] == 1 and record["seed"] == 1
    # the searched LRs enter the summary beside the grid (the report's utility bound decides which steps count)
    assert set(summary["models"]["teacher"]["final_by_lr"]) == {format_lr(lr) for lr in [1e-4, 1e-3, 1e-2, *mids]}
    # without a floor the best is the largest LR: one midpoint below and one step out
    calls.clear()
    summary = run_sweep(one, [1e-4, 1e-3, 1e-2], out_dir=tmp_path / "free", **kwargs)
    assert sorted(set(calls[6:])) == [0.00316, 0.03]
    # re-run: every grid and search run is finished and skipped
    calls.clear()
    run_sweep(one, [1e-4, 1e-3, 1e-2], out_dir=tmp_path / "free", **kwargs)
    assert calls == []
    with pytest.raises(ValueError, match="search_rounds=-1"):
        run_sweep(one, [1e-3], out_dir=tmp_path / "x", **{**kwargs, "search_rounds": -1})
