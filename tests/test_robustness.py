"""Worst-case aggregation and summary numbers on synthetic curves with hand-derived answers."""

import json
import math
import warnings

import numpy as np
import pytest

from undo_lightning.experiment.robustness import (
    Curve,
    area_under_curve,
    bootstrap_interval,
    bootstrap_relative_robustness,
    common_steps,
    load_curves,
    recovery_threshold,
    relative_robustness,
    resolve_step,
    steps_to_reach,
    value_at,
    worst_case,
)

STEPS = [0, 10, 20]
# (lr, seed) -> forget accuracy at STEPS
FORGET = {
    (1e-3, 0): [0.0, 0.5, 0.6],
    (1e-4, 0): [0.1, 0.3, 0.9],
    (1e-3, 1): [0.0, 0.7, 0.8],
    (1e-4, 1): [0.2, 0.1, 0.4],
}


def curves(table, steps=STEPS):
    return {k: Curve(steps, v) for k, v in table.items()}


def test_worst_case_max_over_lrs_then_mean_std_over_seeds():
    # seed 0: max over LRs = [0.1, 0.5, 0.9]; seed 1: [0.2, 0.7, 0.8]
    # mean = [0.15, 0.6, 0.85]; population std of two values = |a - b| / 2 = [0.05, 0.1, 0.05]
    wc = worst_case(curves(FORGET), mode="max")
    assert wc.steps.tolist() == STEPS
    np.testing.assert_allclose(wc.mean, [0.15, 0.6, 0.85])
    np.testing.assert_allclose(wc.std, [0.05, 0.1, 0.05])
    _steps, mean, _std, per_seed, seeds = wc  # unpacks as the documented (steps, mean, std, per_seed, seeds)
    assert mean is wc.mean and seeds == (0, 1)
    np.testing.assert_allclose(per_seed, [[0.1, 0.5, 0.9], [0.2, 0.7, 0.8]])
    np.testing.assert_allclose(wc.seed_values(15), [0.5, 0.7])  # between evaluations: the last step before it
    assert wc.seed_values(-1).shape == (0,)


def test_worst_case_min_mode_and_sample_std():
    # seed 0 min: [0.0, 0.3, 0.6]; seed 1 min: [0.0, 0.1, 0.4] -> mean [0, 0.2, 0.5]
    wc = worst_case(curves(FORGET), mode="min", ddof=1)
    np.testing.assert_allclose(wc.mean, [0.0, 0.2, 0.5])
    # sample std of two values = |a - b| / sqrt(2)
    np.testing.assert_allclose(wc.std, [0.0, 0.2 / math.sqrt(2), 0.2 / math.sqrt(2)])


def test_worst_case_single_seed_has_zero_std():
    wc = worst_case({k: v for k, v in curves(FORGET).items() if k[1] == 0})
    np.testing.assert_allclose(wc.mean, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(wc.std, [0.0, 0.0, 0.0])


def test_worst_case_ignores_nan_values():
    table = dict(FORGET)
    table[(1e-4, 0)] = [0.1, math.nan, 0.9]  # a failed evaluation of one LR: the other LR still counts
    wc = worst_case(curves(table))
    np.testing.assert_allclose(wc.mean, [0.15, 0.6, 0.85])


def test_utility_bound_excludes_runs_per_step():
    retain = {
        (1e-3, 0): [0.9, 0.85, 0.85],  # drop 0.05 -> kept everywhere
        (1e-4, 0): [0.9, 0.9, 0.6],    # drop 0.3 at step 20 -> excluded there only
        (1e-3, 1): [0.9, 0.5, 0.5],    # drop 0.4 at steps 10, 20 -> excluded
        (1e-4, 1): [0.9, 0.9, 0.5],    # drop 0.4 at step 20 -> excluded
    }
    with pytest.warns(UserWarning, match=r"seed\(s\) \[1\] at step\(s\) \[20\]"):
        wc = worst_case(curves(FORGET), "max", curves(retain), max_retain_drop=0.1)
    # seed 0: step 0 max(0.0, 0.1)=0.1; step 10 max(0.5, 0.3)=0.5; step 20 only lr 1e-3 -> 0.6
    # seed 1: step 0 0.2; step 10 only lr 1e-4 -> 0.1; step 20 every LR excluded -> no value
    np.testing.assert_allclose(wc.mean, [0.15, 0.3, 0.6])
    np.testing.assert_allclose(wc.std, [0.05, 0.2, 0.0])  # step 20: one seed left


def test_utility_bound_every_seed_excluded_gives_nan():
    retain = {k: [0.9, 0.9, 0.1] for k in FORGET}
    with pytest.warns(UserWarning, match="every LR run was excluded"):
        wc = worst_case(curves(FORGET), "max", curves(retain), max_retain_drop=0.1)
    assert math.isnan(wc.mean[2]) and math.isnan(wc.std[2])
    np.testing.assert_allclose(wc.mean[:2], [0.15, 0.6])


def test_utility_bound_lower_is_better_retain_metric():
    # retain CE rising by more than 0.5 above its step-0 value excludes the run
    retain_ce = {k: [1.0, 1.2, 1.2] for k in FORGET}
    retain_ce[(1e-4, 0)] = [1.0, 1.2, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wc = worst_case(curves(FORGET), "max", curves(retain_ce), 0.5, retain_higher_is_better=False)
    np.testing.assert_allclose(wc.mean, [0.15, 0.6, (0.6 + 0.8) / 2])


def test_different_step_grids_use_common_steps_with_warning():
    table = curves(FORGET)
    table[(1e-4, 1)] = Curve([0, 10], [0.2, 0.1])  # interrupted run
    with pytest.warns(UserWarning, match="different step grids"):
        wc = worst_case(table)
    assert wc.steps.tolist() == [0, 10]
    np.testing.assert_allclose(wc.mean, [0.15, 0.6])


def test_no_common_step_raises():
    with pytest.raises(ValueError, match="share no evaluated step"):
        common_steps([[0, 10], [5, 15]])


@pytest.mark.parametrize("kwargs, match", [
    ({"curves": {}}, "empty curve set"),
    ({"curves": curves(FORGET), "mode": "mean"}, "'mean'"),
    ({"curves": curves(FORGET), "max_retain_drop": 0.1}, "go together"),
    ({"curves": curves(FORGET), "retain_curves": curves(FORGET), "max_retain_drop": -1.0}, "-1.0"),
    ({"curves": curves(FORGET), "retain_curves": {}, "max_retain_drop": 0.1}, "no retain curve"),
])
def test_worst_case_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        worst_case(**kwargs)


def test_curve_validation():
    with pytest.raises(ValueError, match="mismatched lengths: 2 steps vs 1 values"):
        Curve([0, 1], [1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        Curve([0, 10, 5], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty curve"):
        Curve([], [])


def test_value_at_exact_previous_and_errors():
    steps, values = [5, 10, 20], [0.1, 0.2, 0.4]
    assert value_at(steps, values, 10) == 0.2
    assert value_at(steps, values, 15) == 0.2   # last evaluated step <= 15
    assert value_at(steps, values, 300) == 0.4  # beyond the attack length -> last step
    assert resolve_step(steps, 300) == 20
    with pytest.raises(ValueError, match="first evaluated step is 5"):
        value_at(steps, values, 4)
    with pytest.raises(ValueError, match="mismatched lengths"):
        value_at(steps, [0.1], 10)


def test_area_under_piecewise_linear_curve():
    # trapezoids: 10 * (0 + 1) / 2 + 20 * (1 + 1) / 2 = 25 over a span of 30
    assert area_under_curve([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx(25 / 30)
    assert area_under_curve([5, 15], [0.2, 0.2]) == pytest.approx(0.2)  # constant -> its level
    assert area_under_curve([7], [0.3]) == 0.3
    assert math.isnan(area_under_curve([0, 1], [0.0, math.nan]))


def test_steps_to_reach_and_recovery_threshold():
    steps, acc = [0, 10, 20], [0.1, 0.4, 0.8]
    assert steps_to_reach(steps, acc, 0.4) == 10  # inclusive
    assert steps_to_reach(steps, acc, 0.05) == 0
    assert steps_to_reach(steps, acc, 0.9) is None
    assert steps_to_reach(steps, [3.0, 2.0, 1.0], 1.5, mode="min") == 20
    assert recovery_threshold(0.8, 0.5) == pytest.approx(0.4)
    # half of the gap from the attacked model's start 0.2 to the reference 0.8
    assert recovery_threshold(0.8, 0.5, start_value=0.2) == pytest.approx(0.5)
    # CE: reference 1.0, start 5.0: 90 % of the way down is 1.4
    thr = recovery_threshold(1.0, 0.9, start_value=5.0)
    assert thr == pytest.approx(1.4)
    assert steps_to_reach([0, 10, 20], [5.0, 2.0, 1.3], thr, mode="min") == 20
    with pytest.raises(ValueError, match="'up'"):
        steps_to_reach(steps, acc, 0.4, mode="up")


def test_relative_robustness_scalar_and_arrays():
    # model relearns to 0.5, unlearn-only to 0.9, oracle to 0.3: (0.5 - 0.9) / (0.3 - 0.9) = 2/3
    r = relative_robustness(0.5, 0.9, 0.3)
    assert isinstance(r, float) and r == pytest.approx(2 / 3)
    assert math.copysign(1.0, relative_robustness(0.9, 0.9, 0.3)) == 1.0  # +0.0, never -0.0
    assert relative_robustness(0.3, 0.9, 0.3) == 1.0
    np.testing.assert_allclose(relative_robustness(np.array([0.5, 0.9, 0.3, 1.2]), 0.9, 0.3),
                               [2 / 3, 0.0, 1.0, -0.5])
    # CE (higher = more robust): same formula
    assert relative_robustness(2.0, 1.0, 3.0) == pytest.approx(0.5)
    assert math.isnan(relative_robustness(0.5, math.nan, 0.3))


def test_relative_robustness_degenerate_anchors_nan_and_warning():
    with pytest.warns(UserWarning, match=r"P_oracle=0.7 P_unlearn=0.7"):
        r = relative_robustness(0.5, 0.7, 0.7)
    assert math.isnan(r)
    with pytest.warns(UserWarning, match="degenerate"):
        out = relative_robustness([0.5, 0.5], [0.9, 0.4], [0.3, 0.4])
    assert out[0] == pytest.approx(2 / 3) and math.isnan(out[1])


def _write_curve(root, model, lr, seed, steps, metrics, attack="forget"):
    d = root / "relearn" / model / f"lr={lr}_seed={seed}"
    d.mkdir(parents=True)
    (d / "curve.json").write_text(json.dumps(
        {"model": model, "lr": lr, "seed": seed, "attack": attack, "steps": steps, "metrics": metrics}))


def test_load_curves_filters_attack_and_reads_nulls(tmp_path):
    _write_curve(tmp_path, "teacher", 0.001, 0, [0, 5], {"val/forget_acc": [0.0, None], "val/retain_acc": [1, 1]})
    _write_curve(tmp_path, "teacher", 0.0001, 1, [0, 5], {"val/forget_acc": [0.1, 0.2]})
    _write_curve(tmp_path, "teacher", 0.01, 0, [0, 5], {"val/forget_acc": [0.5, 0.5]}, attack="retain")
    got = load_curves(tmp_path, "teacher", "val/forget_acc")
    assert list(got) == [(0.0001, 1), (0.001, 0)]
    assert got[(0.001, 0)].steps.tolist() == [0, 5] and math.isnan(got[(0.001, 0)].values[1])
    assert list(load_curves(tmp_path, "teacher", "val/forget_acc", attack="retain")) == [(0.01, 0)]
    with pytest.raises(ValueError, match="'val/forget_ce' not found"):
        load_curves(tmp_path, "teacher", "val/forget_ce")
    with pytest.raises(FileNotFoundError, match="'student'"):
        load_curves(tmp_path, "student", "val/forget_acc")


def test_load_curves_bad_files(tmp_path):
    _write_curve(tmp_path, "m", 0.001, 0, [0, 5, 10], {"val/forget_acc": [0.0, 0.1]})
    with pytest.raises(ValueError, match="mismatched lengths"):
        load_curves(tmp_path, "m", "val/forget_acc")
    d = tmp_path / "relearn" / "m2" / "copy_a"
    d.mkdir(parents=True)
    (d / "curve.json").write_text(json.dumps({"lr": 0.1, "seed": 0, "steps": [0], "metrics": {"x": [1.0]}}))
    d2 = tmp_path / "relearn" / "m2" / "copy_b"
    d2.mkdir(parents=True)
    (d2 / "curve.json").write_text(json.dumps({"lr": 0.1, "seed": 0, "steps": [0], "metrics": {"x": [1.0]}}))
    with pytest.raises(ValueError, match="duplicate relearning run lr=0.1 seed=0"):
        load_curves(tmp_path, "m2", "x")


# ----------------------------------------------------------------------------------------------------------------------
# bootstrap intervals over seeds


def _slow_bootstrap_means(values, resamples, seed):
    """Reference: the same resampling, one resample at a time in plain Python."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return sorted(sum(values[i] for i in row) / len(row) for row in idx.tolist())


def test_bootstrap_interval_matches_a_slow_reference_and_the_normal_theory():
    values = np.random.default_rng(3).normal(0.4, 0.1, size=50)
    lo, hi = bootstrap_interval(values, level=0.9, resamples=4000, seed=7)
    means = _slow_bootstrap_means(values.tolist(), 4000, 7)
    # numpy's linear-interpolation percentile of the sorted resampled means
    assert lo == pytest.approx(np.percentile(means, 5)) and hi == pytest.approx(np.percentile(means, 95))
    # 50 seeds: the percentile interval is close to mean ± 1.645 sigma / sqrt(n)
    half = 1.645 * values.std() / np.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - half, abs=0.006) and hi == pytest.approx(values.mean() + half, abs=0.006)
    assert bootstrap_interval(values, level=0.9, resamples=4000, seed=7) == (lo, hi)  # seeded: reproducible


def test_bootstrap_interval_known_answers():
    assert bootstrap_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)  # no spread, no interval
    # two seeds: resampled means are a, (a + b) / 2, b with probabilities 1/4, 1/2, 1/4 -> the 95 % interval is [a, b]
    assert bootstrap_interval([0.2, 0.6]) == pytest.approx((0.2, 0.6))
    assert bootstrap_interval([0.2, math.nan, 0.6]) == pytest.approx((0.2, 0.6))  # NaN seeds are left out
    lo, hi = bootstrap_interval([math.nan])
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="level=1.5"):
        bootstrap_interval([0.1], level=1.5)
    with pytest.raises(ValueError, match="resamples=0"):
        bootstrap_interval([0.1], resamples=0)


def test_bootstrap_relative_robustness_pairs_seeds():
    # Attack seed 1 is a lucky order for every model alike (+0.2): paired resampling cancels it.
    teacher, oracle = np.array([0.8, 1.0]), np.array([0.2, 0.4])
    model = np.array([0.5, 0.7])  # always halfway between the anchors
    assert bootstrap_relative_robustness(model, teacher, oracle) == pytest.approx((0.5, 0.5))
    lo, hi = bootstrap_relative_robustness(model, teacher, oracle, paired=False)
    assert lo < 0.3 and hi > 0.7  # unpaired, the shared luck widens the interval
    # slow reference of the paired interval on uneven data
    model, teacher, oracle = np.array([0.5, 0.3, 0.6]), np.array([0.9, 0.8, 0.95]), np.array([0.2, 0.3, 0.1])
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, size=(500, 3)).tolist()
    rr = [(np.mean(model[r]) - np.mean(teacher[r])) / (np.mean(oracle[r]) - np.mean(teacher[r])) for r in rows]
    got = bootstrap_relative_robustness(model, teacher, oracle, resamples=500, seed=0)
    assert got == pytest.approx((np.percentile(rr, 2.5), np.percentile(rr, 97.5)))
    with pytest.raises(ValueError, match="paired=False"):
        bootstrap_relative_robustness([0.1, 0.2], [0.9], [0.1])
    assert all(math.isnan(x) for x in bootstrap_relative_robustness([0.1], [0.5], [0.5]))  # anchors coincide


def test_lr_scores_and_refinement_by_hand():
    from undo_lightning.experiment.robustness import lr_scores, refine_lrs

    steps = [0, 10, 20]
    forget = {(1e-4, 0): [0.0, 0.1, 0.2], (1e-4, 1): [0.0, 0.2, 0.4],   # best 0.2 and 0.4: score 0.3
              (1e-3, 0): [0.0, 0.5, 0.4], (1e-3, 1): [0.0, 0.3, 0.7],   # 0.5 and 0.7: 0.6
              (1e-2, 0): [0.0, 0.9, 1.0], (1e-2, 1): [0.0, 0.8, 0.9]}   # 1.0 and 0.9: 0.95 without a floor
    retain = {k: [0.9, 0.85, 0.8] for k in forget} | {(1e-2, s): [0.9, 0.3, 0.1] for s in (0, 1)}  # 1e-2 wrecks it
    curves = {k: Curve(steps, v) for k, v in forget.items()}
    retains = {k: Curve(steps, v) for k, v in retain.items()}
    assert lr_scores(curves) == pytest.approx({1e-4: 0.3, 1e-3: 0.6, 1e-2: 0.95})
    # with the floor 0.2, 1e-2 counts only at step 0 (forget 0.0); the others keep every step (drop 0.1)
    floored = lr_scores(curves, "max", retains, 0.2)
    assert floored == pytest.approx({1e-4: 0.3, 1e-3: 0.6, 1e-2: 0.0})
    assert refine_lrs(floored) == [0.000316, 0.00316]
    assert refine_lrs(lr_scores(curves)) == [0.00316, 0.03]  # an end: one step out
    assert refine_lrs({1e-3: 0.5}) == [0.000333, 0.003]
    assert refine_lrs({1e-3: math.nan, 1e-2: math.nan}) == []
    assert refine_lrs({1e-3: 2.0, 1e-2: 1.0}, mode="min") == [0.00316, 0.03]
    # a midpoint already tried is not proposed again
    assert refine_lrs({1e-4: 0.1, 1e-3: 0.6, 0.00316: 0.2, 1e-2: 0.0}) == [0.000316, 0.00178]
    assert refine_lrs({1e-4: 0.1, 1e-3: 0.6, 0.000316: 0.2, 0.00316: 0.0}) == [0.000562, 0.00178]
