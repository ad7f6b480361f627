"""The paired comparison's statistics and tables (topd_jax.eval.compare; bench/compare_opd_topd.py)."""

import numpy as np
import pytest

from topd_jax.eval.compare import (comparison_table, delta_mark, label_table, mean_sd, paired_bootstrap_ci,
                                   paired_deltas)


def test_bootstrap_ci_of_a_constant_difference_is_that_constant():
    mean, lo, hi = paired_bootstrap_ci(np.full((3, 50), 0.25))
    assert mean == lo == hi == pytest.approx(0.25)


def test_bootstrap_ci_matches_the_normal_approximation_on_iid_differences():
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(3, 512))
    mean, lo, hi = paired_bootstrap_ci(d, resamples=4000, seed=3)
    assert mean == pytest.approx(d.mean())
    # stratified by seed: the standard error of the grand mean is sqrt(mean of within-seed variances / (S * P))
    se = np.sqrt(d.var(axis=1).mean() / d.size)
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.3 * se)


def test_bootstrap_resamples_prompts_within_each_seed():
    # seed 0: every prompt +1, seed 1: every prompt -1. Within-seed resampling keeps each seed's
    # weight, so every resample's mean is 0 (pooled resampling over cells would spread it).
    d = np.stack([np.ones(40), -np.ones(40)])
    assert paired_bootstrap_ci(d) == (0.0, 0.0, 0.0)


def test_bootstrap_is_reproducible_and_validates_its_input():
    d = np.random.default_rng(0).normal(size=(2, 30))
    assert paired_bootstrap_ci(d, seed=5) == paired_bootstrap_ci(d, seed=5)
    with pytest.raises(ValueError, match=r"\[seeds, prompts\]"):
        paired_bootstrap_ci(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap_ci(np.array([[0.0, np.nan]]))


def _runs():
    runs = []
    for seed in (0, 1):
        base = np.array([1.0, 0.5, 0.0, 0.25] * 25)  # 100 prompts
        runs.append(dict(arm="OPD", seed=seed, steps=10, pass1=base, greedy=(base > 0.4).astype(float), train_s=10.0,
                         step_s=0.1, labels={"label_true_surface_share": 0.2 + 0.1 * seed}))
        better = np.minimum(base + 0.25, 1.0)
        runs.append(dict(arm="TOPD", seed=seed, steps=10, pass1=better, greedy=(base > 0.4).astype(float),
                         train_s=30.0, step_s=0.3, guided_per_rollout=0.9, grad_norm_opd=0.5, grad_norm_traj=0.25,
                         labels={"label_true_surface_share": 0.4, "label_auroc": 0.75}))
    return runs


def test_paired_deltas_are_per_prompt_differences_against_the_baseline():
    d = paired_deltas(_runs(), "TOPD", "OPD", "pass1")
    assert d["seeds"] == [0, 1]
    assert d["per_seed"] == pytest.approx([0.1875, 0.1875])  # +0.25 on three of four prompts
    assert d["mean"] == pytest.approx(0.1875) and 0 < d["lo"] <= d["mean"] <= d["hi"]
    assert paired_deltas(_runs(), "TOPD", "nobody", "pass1") is None


def test_comparison_table_rows_hold_the_measured_numbers():
    table = comparison_table(_runs(), baseline="OPD", before={"pass1": [0.0, 1.0], "greedy": [0.0, 0.0]})
    lines = table.splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert lines[2].startswith("| initial student | 0 | — | 50.0 |")
    opd, topd = lines[3], lines[4]
    assert opd.startswith("| OPD | 10 | 43.8 / 43.8 | 43.8 ± 0.0 | — |")
    cells = [c.strip() for c in topd.split("|")[1:-1]]
    assert cells[:4] == ["TOPD", "10", "62.5 / 62.5", "62.5 ± 0.0"]
    assert cells[4].startswith("+18.8 [") and cells[4].endswith("] * (+18.8 / +18.8)")  # CI excludes 0
    assert cells[6] == "+0.0 [+0.0, +0.0] (+0.0 / +0.0)"  # greedy unchanged: no star
    assert cells[7:] == ["30", "0.300", "0.90", "0.500", "0.250"]


def test_a_ci_excluding_zero_with_seeds_of_both_signs_is_marked_apart():
    assert delta_mark({"mean": 0.07, "lo": 0.05, "hi": 0.09, "per_seed": [0.03, -0.1, 0.29]}) == "(*)"
    assert delta_mark({"mean": -0.09, "lo": -0.1, "hi": -0.08, "per_seed": [-0.08, -0.11, -0.08]}) == "*"
    assert delta_mark({"mean": 0.01, "lo": -0.01, "hi": 0.03, "per_seed": [0.01, 0.01]}) == ""


def test_label_table_averages_each_metric_over_seeds():
    lines = label_table(_runs()).splitlines()
    assert lines[2].split("|")[2].strip() == "25.0"  # (20 + 30) / 2 %
    assert lines[3].split("|")[2].strip() == "40.0"
    assert lines[3].split("|")[5].strip() == "0.750"  # AUROC as a number
    assert lines[2].split("|")[5].strip() == "n/a"


def test_mean_sd_ignores_missing_values():
    assert mean_sd([None, float("nan")]) is None
    assert mean_sd([2.0]) == (2.0, 0.0)
    assert mean_sd([1.0, None, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))
