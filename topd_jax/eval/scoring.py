"""Scoring generated samples: per-sample records and per-dataset summaries. No model code.

A run produces, for each problem of each dataset, n samples. ``grade_sample`` turns one into
a ``SampleRecord``; ``summarize`` turns a dataset's records into its summary:

- ``pass@1``: mean accuracy; its standard error is taken over the n sample rounds
  (round j = sample j of every problem, a full eval run), i.e. the spread you would see
  between independent runs on this fixed problem set. None for n = 1.
- ``pass@k`` (unbiased, Chen et al. 2021) and ``maj@k`` (exact expected majority vote,
  ties split), averaged over problems, for k in ``ks`` (k <= n).
- ``mean_length`` (generated tokens), ``truncation_rate`` (samples that hit
  max_new_tokens without a stop token) and the count of each grading status.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from topd_jax.rewards.math import DEFAULT_TIMEOUT_S, grade_detailed, maj_at_k
from topd_jax.rewards.estimators import mean_and_stderr, pass_at_k


@dataclass(frozen=True)
class SampleRecord:
    """One graded sample: a line of ``samples.jsonl``."""

    dataset: str
    id: str
    sample: int  # index among the problem's n samples
    completion: str
    extracted: str | None
    correct: bool
    status: str  # a topd_jax.rewards.math.STATUSES value
    length: int  # generated tokens (stop token included when there is one)
    truncated: bool  # hit max_new_tokens without a stop token

    def to_dict(self) -> dict:
        return asdict(self)


def grade_sample(
    *,
    dataset: str,
    id: str,
    sample: int,
    completion: str,
    gold: str | Sequence[str],
    length: int,
    truncated: bool,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> SampleRecord:
    v = grade_detailed(completion, gold, timeout_s=timeout_s)
    return SampleRecord(dataset, id, sample, completion, v.extracted, v.correct, v.status,
                        length, truncated)


def default_ks(n: int) -> list[int]:
    """k values to report for n samples: powers of two below n, and n itself."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < n]
    return ks + [n]


def summarize(
    records: Sequence[SampleRecord],
    *,
    ks: Sequence[int] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> dict:
    """Summary of one dataset's records (every problem must have the same n samples,
    numbered 0..n-1). See the module docstring for the definitions."""
    if not records:
        raise ValueError("summarize: no records")
    by_id: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_id.setdefault(r.id, []).append(r)
    n = len(next(iter(by_id.values())))
    for pid, recs in by_id.items():
        if sorted(r.sample for r in recs) != list(range(n)):
            raise ValueError(
                f"problem {pid!r} has samples {sorted(r.sample for r in recs)}, expected 0..{n - 1}"
            )
    ks = default_ks(n) if ks is None else sorted(set(ks))
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k must be in 1..n={n}, got {list(ks)}")

    rounds = [0.0] * n  # accuracy of sample round j over all problems
    for recs in by_id.values():
        for r in recs:
            rounds[r.sample] += r.correct / len(by_id)
    p1, p1_se = mean_and_stderr(rounds)
    pass_k, maj_k = {}, {}
    for k in ks:
        pass_k[f"pass@{k}"] = sum(
            pass_at_k(n, sum(r.correct for r in recs), k) for recs in by_id.values()
        ) / len(by_id)
    for recs in by_id.values():
        recs.sort(key=lambda r: r.sample)
        answers = [r.extracted for r in recs]
        correct = [r.correct for r in recs]
        for k in ks:
            key = f"maj@{k}"
            maj_k[key] = maj_k.get(key, 0.0) + maj_at_k(
                answers, correct, k, timeout_s=timeout_s
            ) / len(by_id)
    return {
        "problems": len(by_id),
        "samples_per_problem": n,
        "pass@1": p1,
        "pass@1_stderr": None if math.isnan(p1_se) else p1_se,  # None: JSON has no NaN
        **pass_k,
        **maj_k,
        "mean_length": sum(r.length for r in records) / len(records),
        "truncation_rate": sum(r.truncated for r in records) / len(records),
        "status_counts": dict(sorted(Counter(r.status for r in records).items())),
    }


def macro_average(summaries: dict[str, dict]) -> dict:
    """Unweighted mean over datasets of every pass@/maj@ metric they all report (the paper's
    "avg" column), plus mean_length and truncation_rate."""
    if not summaries:
        raise ValueError("macro_average: no datasets")
    keys = set.intersection(*(set(s) for s in summaries.values()))
    keys = [k for k in next(iter(summaries.values())) if k in keys
            and (k.startswith(("pass@", "maj@")) and not k.endswith("_stderr")
                 or k in ("mean_length", "truncation_rate"))]
    return {k: sum(s[k] for s in summaries.values()) / len(summaries) for k in keys}


def format_table(summaries: dict[str, dict]) -> str:
    """A plain-text table, one row per entry of ``{name: summary}`` (values in percent);
    keys a row lacks (e.g. the stderr of a ``macro_average`` row) print as "-"."""
    if not summaries:
        return "(no datasets)"
    metric_keys: list[str] = []
    for s in summaries.values():
        metric_keys += [k for k in s if k.startswith(("pass@", "maj@")) and k != "pass@1"
                        and not k.endswith("_stderr") and k not in metric_keys]

    def pct(s, key):
        v = s.get(key)
        return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    header = ["dataset", "problems", "n", "pass@1", "± se", *metric_keys, "mean len", "trunc %"]
    rows = [
        [name, str(s.get("problems", "-")), str(s.get("samples_per_problem", "-")),
         pct(s, "pass@1"), pct(s, "pass@1_stderr"), *(pct(s, k) for k in metric_keys),
         "-" if "mean_length" not in s else f"{s['mean_length']:.0f}", pct(s, "truncation_rate")]
        for name, s in summaries.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
