"""Statistics and tables of a paired comparison of training arms (``bench/compare_opd_topd.py``).

Every arm is trained with the same seeds (paired random numbers: same step-0 rollouts, same
prompt order) and evaluated on the same held-out prompts with the same evaluation key, so
the per-prompt accuracy *difference* to the baseline arm is the quantity to average:

    lo, mean, hi = paired_bootstrap_ci(acc_arm - acc_base)   # [seeds, prompts] -> 95 % CI
    print(comparison_table(runs, baseline="OPD"))

NumPy only (no JAX): runs are plain dicts, see ``comparison_table``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def paired_bootstrap_ci(diff: np.ndarray, *, resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of per-prompt differences and its percentile bootstrap CI.

    Args:
      diff: ``[seeds, prompts]`` per-prompt accuracy differences (arm - baseline) of the same
        prompts under the same seeds (paired). The mean is the mean over seeds of each seed's
        mean over prompts.
      resamples: bootstrap resamples; each draws, within every seed, ``prompts`` (seed,
        prompt) cells with replacement (stratified by seed, so every seed keeps its weight).
      level: the CI's coverage (0.95: the 2.5 % and 97.5 % percentiles).
      seed: the NumPy generator's seed (the CI is reproducible).

    Seed-to-seed training variance enters only through the seeds present (they are not
    resampled): with 3 seeds, read the per-seed differences beside the CI.
    """
    d = np.asarray(diff, np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"diff must be [seeds, prompts] with both >= 1, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not np.isfinite(d).all():
        raise ValueError("diff holds non-finite values")
    rng = np.random.default_rng(seed)
    s, p = d.shape
    idx = rng.integers(p, size=(resamples, s, p))                  # [B, S, P]
    means = d[np.arange(s)[None, :, None], idx].mean(axis=(1, 2))  # [B]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(lo), float(hi)


def mean_sd(xs: Sequence[float | None]) -> tuple[float, float] | None:
    """``(mean, sample sd)`` of the finite values (sd 0 for one value), or None if none."""
    v = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _pct(ms: tuple[float, float] | None) -> str:
    return "n/a" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _num(ms: tuple[float, float] | None, fmt: str = ".3f") -> str:
    return "n/a" if ms is None else f"{ms[0]:{fmt}}"


def delta_mark(d: dict[str, Any]) -> str:
    """``"*"``: the CI excludes 0 and every seed's Δ has the mean's sign; ``"(*)"``: the CI
    excludes 0 but the seeds disagree in sign (the CI resamples prompts, not training runs,
    so it does not see seed-to-seed training variance); ``""``: the CI covers 0."""
    if not (d["lo"] > 0 or d["hi"] < 0):
        return ""
    agree = all(np.sign(x) == np.sign(d["mean"]) for x in d["per_seed"])
    return "*" if agree else "(*)"


def _delta(d: dict[str, Any] | None) -> str:
    if d is None:
        return "n/a"
    mark = delta_mark(d)
    seeds = " / ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
    return f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{' ' + mark if mark else ''} ({seeds})"


def paired_deltas(runs: Sequence[dict], arm: str, baseline: str, metric: str, *, resamples: int = 2000,
                  seed: int = 0) -> dict[str, Any] | None:
    """Paired Δ of ``metric`` (a per-prompt list in each run) of ``arm`` against ``baseline``
    over the seeds both have: ``{"mean", "lo", "hi", "per_seed": [Δ per seed], "seeds"}``, or
    None when they share no seed."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted(s for (a, s) in by if a == arm and (baseline, s) in by)
    if not seeds:
        return None
    diff = np.array([np.asarray(by[(arm, s)][metric], np.float64) - np.asarray(by[(baseline, s)][metric], np.float64)
                     for s in seeds])
    mean, lo, hi = paired_bootstrap_ci(diff, resamples=resamples, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "per_seed": diff.mean(axis=1).tolist(), "seeds": seeds}


def comparison_table(runs: Sequence[dict], *, baseline: str, arms: Sequence[str] | None = None,
                     before: dict | None = None, resamples: int = 2000, seed: int = 0) -> str:
    """The headline markdown table.

    ``runs``: one dict per (arm, seed) with ``arm``, ``seed``, ``steps``, ``pass1`` (per-prompt
    pass@1 ``[prompts]``: the share of correct samples), ``greedy`` (per-prompt 0/1),
    ``train_s`` (training wall seconds), ``step_s`` (median step seconds), and optional
    ``guided_per_rollout``, ``grad_norm_opd``, ``grad_norm_traj`` (means over training, None
    if not logged). ``before``: the step-0 evaluation ``{"pass1": [...], "greedy": [...]}``
    shared by every arm. Δ columns: paired against ``baseline``, mean [95 % bootstrap CI]
    (``paired_bootstrap_ci``) mark (per-seed Δ); the mark is ``delta_mark``'s.
    """
    arms = list(arms) if arms is not None else list(dict.fromkeys(r["arm"] for r in runs))
    head = (f"| arm | steps | pass@1 per seed (%) | pass@1 mean ± sd (%) | Δ pass@1 vs {baseline} [95 % CI] (pts) | "
            f"greedy mean ± sd (%) | Δ greedy vs {baseline} [95 % CI] (pts) | train wall (s) | step (s) | "
            "guided / rollout | ‖∇L_OPD‖ | ‖∇λL_traj‖ |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    if before is not None:
        lines.append(f"| initial student | 0 | — | {100 * float(np.mean(before['pass1'])):.1f} | — | "
                     f"{100 * float(np.mean(before['greedy'])):.1f} | — | — | — | — | — | — |")
    for arm in arms:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        acc = [float(np.mean(r["pass1"])) for r in rs]
        greedy = [float(np.mean(r["greedy"])) for r in rs]
        steps = sorted({int(r["steps"]) for r in rs})
        dp = dg = None
        if arm != baseline:
            dp = paired_deltas(runs, arm, baseline, "pass1", resamples=resamples, seed=seed)
            dg = paired_deltas(runs, arm, baseline, "greedy", resamples=resamples, seed=seed)
        lines.append(
            f"| {arm} | {'/'.join(map(str, steps))} | {' / '.join(f'{100 * a:.1f}' for a in acc)} | "
            f"{_pct(mean_sd(acc))} | {_delta(dp) if arm != baseline else '—'} | {_pct(mean_sd(greedy))} | "
            f"{_delta(dg) if arm != baseline else '—'} | {_num(mean_sd([r['train_s'] for r in rs]), '.0f')} | "
            f"{_num(mean_sd([r['step_s'] for r in rs]))} | "
            f"{_num(mean_sd([r.get('guided_per_rollout') for r in rs]), '.2f')} | "
            f"{_num(mean_sd([r.get('grad_norm_opd') for r in rs]))} | "
            f"{_num(mean_sd([r.get('grad_norm_traj') for r in rs]))} |")
    return "\n".join(lines)


LABEL_COLUMNS = (
    ("label_true_surface_share", "true surface share of candidates"),
    ("label_false_alarm_precision", "FA precision"),
    ("label_false_alarm_recall", "FA recall"),
    ("label_auroc", "AUROC (surface vs fork)"),
    ("label_guided_fork_precision", "guided fork precision"),
    ("label_rollout_accuracy", "rollout accuracy"),
)


def label_table(runs: Sequence[dict], *, arms: Sequence[str] | None = None,
                columns: Sequence[tuple[str, str]] = LABEL_COLUMNS) -> str:
    """Per arm, the means over seeds of the per-step label metrics (each run's ``labels``:
    ``{name: mean over training steps}``; missing or None: n/a), in percent except AUROC."""
    arms = list(arms) if arms is not None else list(dict.fromkeys(r["arm"] for r in runs))
    lines = ["| arm | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        cells = []
        for key, _ in columns:
            ms = mean_sd([r.get("labels", {}).get(key) for r in rs])
            cells.append("n/a" if ms is None else f"{ms[0]:.3f}" if key == "label_auroc" else f"{100 * ms[0]:.1f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
