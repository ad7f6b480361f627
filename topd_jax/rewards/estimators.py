"""Sample-based accuracy estimators: pass@k, maj@k, mean with standard error. Pure Python.

All estimators take the n samples drawn for one problem and return the expected score of
k samples drawn from them uniformly without replacement, so they are unbiased for the
population pass@k / maj@k when the n samples are i.i.d. (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code", eq. 1, for pass@k).
"""

from __future__ import annotations

import math
from fractions import Fraction
from collections.abc import Sequence


def _check_nk(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: P(at least one of k samples drawn from n without replacement is
    correct) given c of the n are correct, i.e. ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (Chen et al. 2021), which never forms
    the huge binomials and stays accurate in float64.
    """
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def maj_at_k_from_clusters(
    n_correct: int, wrong_clusters: Sequence[int], n_abstain: int, k: int
) -> float:
    """Expected majority-vote accuracy of k samples drawn without replacement from n.

    The n samples are grouped by their (equivalent) final answers: ``n_correct`` samples
    give the right answer (one cluster), ``wrong_clusters[j]`` samples give wrong answer j,
    ``n_abstain`` samples give no answer (no box; they do not vote). A draw is correct when
    the right answer gets strictly the most votes; a tie at the top between the right answer
    and t wrong answers counts 1/(t+1) (a uniform random tie-break, taken in expectation). A
    draw with no votes at all is wrong.

    Exact: for each vote count v >= 1 of the right answer, a DP over the wrong clusters
    counts the draws of the other k - v samples in which every wrong cluster gets <= v votes,
    split by how many get exactly v. Cost ~ O(k^2 · #clusters · v) integer operations.
    """
    if n_correct < 0 or n_abstain < 0 or any(s < 1 for s in wrong_clusters):
        raise ValueError(
            f"counts must be >= 0 and wrong clusters >= 1, got n_correct={n_correct},"
            f" wrong_clusters={list(wrong_clusters)}, n_abstain={n_abstain}"
        )
    n = n_correct + sum(wrong_clusters) + n_abstain
    _check_nk(n, k)
    # Exact integer arithmetic: the binomials overflow float64 for n in the hundreds. Tie
    # shares 1/(t+1) are scaled by lcm(1..#clusters+1) so they stay integers.
    scale = math.lcm(*range(1, len(wrong_clusters) + 2))
    total = 0
    for v in range(1, min(n_correct, k) + 1):
        rest = k - v
        # ways[s][t]: draws of s samples from the abstainers and the wrong clusters seen so
        # far, with every wrong cluster at <= v votes and t of them at exactly v.
        ways = [[math.comb(n_abstain, s)] + [0] * len(wrong_clusters) for s in range(rest + 1)]
        for size in wrong_clusters:
            new = [[0] * (len(wrong_clusters) + 1) for _ in range(rest + 1)]
            for s in range(rest + 1):
                for t, w in enumerate(ways[s]):
                    if w == 0:
                        continue
                    for x in range(0, min(v, size, rest - s) + 1):
                        new[s + x][t + (x == v)] += w * math.comb(size, x)
            ways = new
        share = sum(w * (scale // (t + 1)) for t, w in enumerate(ways[rest]))
        total += math.comb(n_correct, v) * share
    return float(Fraction(total, scale * math.comb(n, k)))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(len)).

    The standard error is NaN for fewer than two values (it is undefined, not zero).
    """
    m = len(values)
    if m == 0:
        raise ValueError("mean_and_stderr of an empty sequence")
    mean = math.fsum(values) / m
    if m < 2:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in values) / (m - 1)
    return mean, math.sqrt(var / m)
