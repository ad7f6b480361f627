"""The detector-vs-labels scoring core (topd_jax.eval.detector_roc) on hand-made candidates."""

import numpy as np
import pytest

from topd_jax.data.labelled import FORCED, FORK, RECOVERY, SURFACE
from topd_jax.eval import detector_roc as roc


def test_evaluate_counts_auroc_false_alarms_and_guided_points_by_hand():
    # two rollouts x three candidate slots
    d = np.array([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])
    lab = np.array([SURFACE, SURFACE, FORK, FORK, RECOVERY, FORCED])
    ok = np.ones(6, bool)
    row = roc.evaluate(d, ok, ok, lab, None, q=0.3, slots_per_row=3)
    # -D ranks surface above fork/recovery in 5 of the 6 (surface, fork-or-recovery) pairs
    assert row["auroc_surf_vs_fork_rec"] == pytest.approx(5 / 6)
    assert row["auroc_surf_vs_fork"] == pytest.approx(3 / 4) and row["auroc_surf_vs_rec"] == pytest.approx(1.0)
    # q = 0.3 of the six D values is 0.25 (linear): false alarms are D 0.1 (surface) and 0.2 (forced)
    assert row["quantile_share"] == pytest.approx(2 / 6)
    assert row["quantile_precision"] == pytest.approx(1 / 2) and row["quantile_recall"] == pytest.approx(1 / 2)
    # guided per rollout: the most divergent kept candidate, 0.5 (surface) and 0.9 (fork)
    assert row["guided_fork_precision"] == pytest.approx(1 / 2)
    assert row["undefined"] == 0 and row["classified"] == 6


def test_evaluate_leaves_out_undefined_windows_and_applies_the_teacher_null_rule():
    # six slots as above (same shapes: no new compilation), one with an empty window
    d = np.array([0.1, 0.5, 0.3, 0.9, 0.4, 0.6])
    lab = np.array([SURFACE, SURFACE, FORK, FORK, FORCED, FORCED])
    valid = np.ones(6, bool)
    defined = np.array([True, True, True, False, True, True])  # counted, not classified
    null = np.array([0.2, 0.2, 0.4, 5.0, 0.1, 0.1])  # D <= null: slots 0 (surface) and 2 (fork)
    row = roc.evaluate(d, valid, defined, lab, null, q=0.3, slots_per_row=3)
    assert row["undefined"] == 1 and row["classified"] == 5
    assert row["auroc_surf_vs_fork"] == pytest.approx(1 / 2)  # surface (0.1, 0.5) vs the defined fork 0.3
    assert row["null_share"] == pytest.approx(2 / 5)
    assert row["null_precision"] == pytest.approx(1 / 2) and row["null_recall"] == pytest.approx(1 / 2)


def test_candidate_slots_and_the_rollout_suffix():
    cand = np.array([[False, True, False, True, False], [False, False, False, False, False]])
    pos, valid = roc.slots_of(cand)
    np.testing.assert_array_equal(pos, [[1, 3], [1, 1]])
    np.testing.assert_array_equal(valid, [[True, True], [False, False]])
    ids = np.arange(10).reshape(2, 5)
    mask = np.array([[True] * 5, [True, True, True, False, False]])
    toks, m = roc.suffix(ids, mask, pos, 3)
    np.testing.assert_array_equal(toks, [[1, 2, 3], [3, 4, 4], [6, 7, 8], [6, 7, 8]])
    np.testing.assert_array_equal(m, [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]])
