"""Detector measurement: Mann–Whitney AUROC (ties ½) against a brute-force pair count and
scipy.stats.mannwhitneyu, the teacher-null false-alarm rule, and label metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu

from topd_jax.losses.detection import auroc, detector_label_metrics, teacher_null_false_alarms

SETTINGS = settings(max_examples=30, deadline=None)
jit_auroc = jax.jit(auroc)


def brute_force_auroc(scores, pos, neg):
    p, n = scores[pos], scores[neg]
    wins = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    return wins / (len(p) * len(n))


@SETTINGS
@given(seed=st.integers(0, 2**31), size=st.sampled_from([5, 40]), levels=st.sampled_from([3, 1000]))
def test_auroc_equals_the_pair_count_with_ties_as_half(seed, size, levels):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (2, size)).astype(np.float32)  # levels=3: many ties
    cls = rng.integers(0, 3, (2, size))  # 0 positive, 1 negative, 2 neither
    pos, neg = cls == 0, cls == 1
    if not pos.any() or not neg.any():
        assert np.isnan(jit_auroc(scores, pos, neg))
        return
    got = float(jit_auroc(scores, pos, neg))
    assert got == pytest.approx(brute_force_auroc(scores, pos, neg), abs=1e-6)
    u = mannwhitneyu(scores[pos], scores[neg], alternative="two-sided").statistic
    assert got == pytest.approx(u / (pos.sum() * neg.sum()), abs=1e-6)


def test_auroc_extremes_infinities_and_empty_classes():
    s = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    assert float(auroc(s, s >= 2, s < 2)) == 1.0
    assert float(auroc(s, s < 2, s >= 2)) == 0.0
    assert float(auroc(np.zeros(4), s >= 2, s < 2)) == 0.5  # all tied
    inf = np.array([np.inf, np.inf, 0.0, 5.0], np.float32)
    pos, neg = np.array([1, 0, 0, 0], bool), np.array([0, 1, 1, 1], bool)
    assert float(auroc(inf, pos, neg)) == pytest.approx(brute_force_auroc(inf, pos, neg))
    assert np.isnan(auroc(s, np.zeros(4, bool), s < 2))


def test_teacher_null_rule_compares_with_the_teachers_own_spread():
    cand = np.array([[1, 1, 1, 0, 1]], bool)
    d = np.array([[0.2, 0.5, 0.3, 0.0, 0.9]], np.float32)
    null = np.array([[0.3, 0.4, 0.3, 1.0, 0.1]], np.float32)
    got = teacher_null_false_alarms(cand, d, null)
    np.testing.assert_array_equal(got, [[True, False, True, False, False]])  # ties count
    defined = np.array([[1, 1, 0, 1, 1]], bool)
    got = teacher_null_false_alarms(cand, d, null, defined=defined)
    np.testing.assert_array_equal(got, [[True, False, False, False, False]])
    with pytest.raises(ValueError, match="null_divergence"):
        teacher_null_false_alarms(cand, d, null[:, :3])


def test_label_metrics_count_what_they_say():
    # 6 candidates: 3 surface, 2 fork, 1 forced; 3 false alarms: 2 surface, 1 fork.
    cand = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], bool)
    surface = np.array([[1, 1, 1, 0, 0, 0, 1, 0]], bool)
    fork = np.array([[0, 0, 0, 1, 1, 0, 0, 1]], bool)
    fa = np.array([[1, 1, 0, 1, 0, 0, 1, 0]], bool)  # the last one is not a candidate
    guided = np.array([[0, 0, 0, 0, 1, 1, 0, 0]], bool)
    loss = np.array([[1, 1, 2, 4, 0, 0, 2, 0]], np.float32)
    m = jax.jit(detector_label_metrics)(cand, fa, surface, fork, token_loss=loss,
                                        mask=np.ones_like(cand), guided=guided)
    ratio = {k: float(s) / float(c) for k, (s, c) in m.items()}
    assert ratio["true_surface_share"] == pytest.approx(3 / 6)
    assert ratio["fork_share"] == pytest.approx(2 / 6)
    assert ratio["suppressed_share"] == pytest.approx(3 / 6)
    assert ratio["false_alarm_precision"] == pytest.approx(2 / 3)
    assert ratio["false_alarm_recall"] == pytest.approx(2 / 3)
    assert ratio["fork_suppressed"] == pytest.approx(1 / 2)
    assert ratio["loss_surface_share"] == pytest.approx(6 / 10)
    assert ratio["guided_fork_precision"] == pytest.approx(1 / 2)
    assert set(detector_label_metrics(cand, fa, surface, fork)) == {
        "true_surface_share", "fork_share", "suppressed_share", "false_alarm_precision",
        "false_alarm_recall", "fork_suppressed"}
    with pytest.raises(ValueError, match="surface"):
        detector_label_metrics(cand, fa, surface[:, :4], fork)
