"""pass@k, maj@k and mean ± standard error against brute-force enumeration and NumPy."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.rewards.estimators import maj_at_k_from_clusters, mean_and_stderr, pass_at_k


def _brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_pass_at_k_equals_enumeration_over_all_draws(data):
    n = data.draw(st.integers(1, 12))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_edges():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # fewer than k wrong samples: every draw holds a right one


def test_pass_at_k_stays_accurate_for_large_n():
    # 1 - C(n-c,k)/C(n,k) with exact integers, vs the product form
    n, c, k = 1000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(
    "n,c,k,msg",
    [(0, 0, 1, "n >= 1"), (4, 5, 1, "c=5"), (4, -1, 1, "c=-1"), (4, 1, 0, "k=0"), (4, 1, 5, "k=5")],
)
def test_pass_at_k_rejects_bad_counts_naming_them(n, c, k, msg):
    with pytest.raises(ValueError, match=msg):
        pass_at_k(n, c, k)


def _brute_maj_at_k(labels, k):
    """labels: per sample "C" (right answer), "A<j>" (wrong answer j) or None (no answer)."""
    total = 0.0
    draws = list(itertools.combinations(labels, k))
    for d in draws:
        votes = Counter(x for x in d if x is not None)
        if not votes:
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        total += ("C" in tied) / len(tied)
    return total / len(draws)


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_maj_at_k_equals_enumeration_with_ties_split(data):
    n_correct = data.draw(st.integers(0, 5))
    wrong = data.draw(st.lists(st.integers(1, 4), max_size=4))
    n_abstain = data.draw(st.integers(0, 3))
    n = n_correct + sum(wrong) + n_abstain
    if n == 0:
        return
    k = data.draw(st.integers(1, min(n, 9)))
    labels = ["C"] * n_correct + [f"A{j}" for j, s in enumerate(wrong) for _ in range(s)]
    labels += [None] * n_abstain
    got = maj_at_k_from_clusters(n_correct, wrong, n_abstain, k)
    assert got == pytest.approx(_brute_maj_at_k(labels, k), abs=1e-12)


def test_maj_at_n_is_plain_majority_vote():
    assert maj_at_k_from_clusters(5, [3, 2], 6, 16) == 1.0  # 5 right vs 3 and 2 wrong
    assert maj_at_k_from_clusters(3, [5], 0, 8) == 0.0
    assert maj_at_k_from_clusters(4, [4], 0, 8) == 0.5  # tie: coin flip in expectation
    assert maj_at_k_from_clusters(0, [], 4, 4) == 0.0  # nobody answered


def test_maj_at_k_is_exact_for_hundreds_of_samples():
    # binomials far beyond float64: must not overflow; all-right samples give 1
    assert maj_at_k_from_clusters(600, [], 0, 300) == 1.0
    assert 0.0 < maj_at_k_from_clusters(300, [200, 100], 100, 200) <= 1.0


def test_maj_at_k_rejects_empty_wrong_cluster():
    with pytest.raises(ValueError, match="wrong_clusters"):
        maj_at_k_from_clusters(2, [0], 0, 1)


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=40))
@settings(max_examples=100, deadline=None)
def test_mean_and_stderr_match_numpy(values):
    mean, se = mean_and_stderr(values)
    arr = np.asarray(values, dtype=np.float64)
    assert mean == pytest.approx(arr.mean(), abs=1e-9)
    assert se == pytest.approx(arr.std(ddof=1) / np.sqrt(len(arr)), abs=1e-9)


def test_stderr_of_one_value_is_nan_and_empty_is_an_error():
    mean, se = mean_and_stderr([0.25])
    assert mean == 0.25 and math.isnan(se)
    with pytest.raises(ValueError, match="empty"):
        mean_and_stderr([])
