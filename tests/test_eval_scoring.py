"""Eval scoring without a model: records from completions, summary numbers against NumPy
and the estimators, the table."""

import numpy as np
import pytest

from topd_jax.eval.scoring import (
    SampleRecord,
    default_ks,
    format_table,
    grade_sample,
    macro_average,
    summarize,
)
from topd_jax.rewards.estimators import pass_at_k


def _rec(pid, j, correct, *, extracted=None, length=10, truncated=False, status=None):
    extracted = extracted if extracted is not None else ("1" if correct else "0")
    return SampleRecord("set", pid, j, f"\\boxed{{{extracted}}}", extracted, correct,
                        status or ("correct" if correct else "wrong"), length, truncated)


def test_grade_sample_records_extraction_and_verdict():
    r = grade_sample(dataset="aime24", id="p1", sample=3, completion="so \\boxed{\\frac{1}{2}}",
                     gold="0.5", length=12, truncated=False)
    assert (r.extracted, r.correct, r.status, r.sample, r.length) == ("\\frac{1}{2}", True, "correct", 3, 12)
    r = grade_sample(dataset="aime24", id="p1", sample=0, completion="no answer", gold="2",
                     length=64, truncated=True)
    assert (r.extracted, r.correct, r.status, r.truncated) == (None, False, "no_box", True)


def test_summary_numbers_match_numpy_and_estimators():
    rng = np.random.default_rng(0)
    correct = rng.random((7, 4)) < 0.4  # [problems, samples]
    records = [_rec(f"p{i}", j, bool(correct[i, j]), length=i + j, truncated=(i == j))
               for i in range(7) for j in range(4)]
    s = summarize(records)
    assert s["problems"] == 7 and s["samples_per_problem"] == 4
    rounds = correct.mean(axis=0)  # accuracy of each sample round
    assert s["pass@1"] == pytest.approx(correct.mean())
    assert s["pass@1_stderr"] == pytest.approx(rounds.std(ddof=1) / np.sqrt(4))
    for k in (2, 4):
        want = np.mean([pass_at_k(4, int(c), k) for c in correct.sum(axis=1)])
        assert s[f"pass@{k}"] == pytest.approx(want)
    assert s["mean_length"] == pytest.approx(np.mean([i + j for i in range(7) for j in range(4)]))
    assert s["truncation_rate"] == pytest.approx(4 / 28)
    assert s["status_counts"] == {"correct": int(correct.sum()), "wrong": int((~correct).sum())}


def test_maj_at_k_in_summary_uses_answer_clusters():
    # problem a: 2 right, 3 equal wrong answers -> majority wrong; problem b: all right
    recs = [_rec("a", 0, True), _rec("a", 1, True)] + [
        _rec("a", j, False, extracted="7") for j in (2, 3, 4)
    ] + [_rec("b", j, True) for j in range(5)]
    s = summarize(recs, ks=[5])
    assert s["maj@5"] == pytest.approx(0.5)
    assert s["pass@5"] == 1.0


def test_default_ks_are_powers_of_two_and_n():
    assert default_ks(1) == [1]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(6) == [1, 2, 4, 6]


def test_single_sample_has_no_stderr_and_table_shows_dash():
    s = summarize([_rec("a", 0, True), _rec("b", 0, False)])
    assert s["pass@1"] == 0.5 and s["pass@1_stderr"] is None
    table = format_table({"set": s})
    assert "50.0" in table.splitlines()[2] and " - " in table.splitlines()[2]


def test_uneven_samples_and_bad_k_are_errors():
    with pytest.raises(ValueError, match="problem 'b' has samples \\[0\\], expected 0..1"):
        summarize([_rec("a", 0, True), _rec("a", 1, True), _rec("b", 0, True)])
    with pytest.raises(ValueError, match="1..n=2"):
        summarize([_rec("a", 0, True), _rec("a", 1, True)], ks=[3])
    with pytest.raises(ValueError, match="no records"):
        summarize([])


def test_macro_average_and_table_rows():
    s1 = summarize([_rec("a", 0, True), _rec("a", 1, False)])
    s2 = summarize([_rec("b", 0, True), _rec("b", 1, True)])
    avg = macro_average({"x": s1, "y": s2})
    assert avg["pass@1"] == pytest.approx(0.75) and avg["pass@2"] == 1.0
    table = format_table({"x": s1, "y": s2, "avg": avg})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["dataset", "problems", "n", "pass@1"]
    assert lines[-1].startswith("avg") and "75.0" in lines[-1]
