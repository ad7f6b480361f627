"""Measuring the near-future detector (TOPD_REVIEW D1, §4.5): a measured false-alarm rule,
and the detector's quality against ground-truth labels.

The batch-quantile rule (``topd.false_alarms``) marks q of the candidates by construction,
so "the share of high-loss tokens in the low-divergence regime" it yields is q, not a
measurement. Here:

* ``teacher_null_false_alarms``: a candidate is a false alarm when D(teacher, student) is
  no larger than D(teacher, teacher′), the teacher's own resampling spread from the same
  prefix -- a rule whose share of false alarms is measured, not set;
* ``auroc``: Mann–Whitney AUROC with ties counted ½, over masked score sets;
* ``detector_label_metrics``: with boolean ground-truth masks (surface / fork positions,
  e.g. from ``topd_jax.data.labelled``), the true surface share of candidates, the loss
  surface share, false-alarm precision and recall, and guided-point fork precision, all as
  ``(sum, count)`` pairs like every other metric of the library.

Shapes: ``[batch, seq]`` token-indexed arrays (any shape works: everything is elementwise
or reduced over all entries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SumCount = tuple[jax.Array, jax.Array]
FALSE_ALARM_RULES = ("quantile", "teacher_null")


def teacher_null_false_alarms(
    candidates: jax.Array,
    divergence: jax.Array,
    null_divergence: jax.Array,
    *,
    defined: jax.Array | None = None,
) -> jax.Array:
    """False alarms by the teacher-null rule: D(teacher, student) ≤ D(teacher, teacher′).

    Args:
      candidates: ``[batch, seq]`` bool high-loss candidates.
      divergence: ``[batch, seq]`` D_t between a teacher and a student future from c_t.
      null_divergence: ``[batch, seq]`` D between two teacher futures from the same c_t
        (the same detector, the same K).
      defined: optional ``[batch, seq]`` bool, where both D values are defined (e.g. no
        empty window); candidates outside it are never false alarms.

    Returns:
      ``[batch, seq]`` bool, a subset of ``candidates``. Unlike the quantile rule, its
      share of the candidates is a measurement.
    """
    if not (candidates.shape == divergence.shape == null_divergence.shape):
        raise ValueError(f"candidates {candidates.shape}, divergence {divergence.shape} and "
                         f"null_divergence {null_divergence.shape} differ")
    cand = candidates.astype(bool)
    if defined is not None:
        if defined.shape != cand.shape:
            raise ValueError(f"defined {defined.shape} and candidates {cand.shape} differ")
        cand = cand & defined.astype(bool)
    d = lax.stop_gradient(divergence.astype(jnp.float32))
    null = lax.stop_gradient(null_divergence.astype(jnp.float32))
    return cand & (d <= null)


def auroc(scores: jax.Array, positive: jax.Array, negative: jax.Array) -> jax.Array:
    """Mann–Whitney AUROC: P(score of a positive > score of a negative) + ½·P(tie).

    Args:
      scores: ``[...]`` float; e.g. −D to ask "do surface candidates have lower D than
        forks?". NaN scores must be masked out by the caller.
      positive, negative: ``[...]`` bool masks (disjoint) of the two classes.

    Returns:
      ``[]`` float32 in [0, 1]; NaN when either class is empty (no AUROC exists).
      O(N log N): one sort of the negatives and two binary searches per positive.
    """
    if not (scores.shape == positive.shape == negative.shape):
        raise ValueError(f"scores {scores.shape}, positive {positive.shape} and negative "
                         f"{negative.shape} differ")
    s = scores.astype(jnp.float32).reshape(-1)
    pos, neg = positive.astype(bool).reshape(-1), negative.astype(bool).reshape(-1)
    n_pos, n_neg = jnp.sum(pos), jnp.sum(neg)
    # Masked negatives sort last as +inf; clipping the counts at n_neg discards them (and a
    # valid +inf negative still counts as a tie with a +inf positive).
    neg_sorted = jnp.sort(jnp.where(neg, s, jnp.inf))
    below = jnp.minimum(jnp.searchsorted(neg_sorted, s, side="left"), n_neg)
    at_most = jnp.minimum(jnp.searchsorted(neg_sorted, s, side="right"), n_neg)
    wins = jnp.sum(jnp.where(pos, below + 0.5 * (at_most - below), 0.0))
    pairs = (n_pos * n_neg).astype(jnp.float32)
    return jnp.where(pairs > 0, wins / jnp.where(pairs > 0, pairs, 1.0), jnp.nan)


def detector_label_metrics(
    candidates: jax.Array,
    false_alarm: jax.Array,
    surface: jax.Array,
    fork: jax.Array,
    *,
    token_loss: jax.Array | None = None,
    mask: jax.Array | None = None,
    guided: jax.Array | None = None,
) -> dict[str, SumCount]:
    """The detector against ground truth, as ``{name: (sum, count)}`` (TOPD_REVIEW §4.5).

    Args:
      candidates: ``[batch, seq]`` bool high-loss candidates (those classified).
      false_alarm: ``[batch, seq]`` bool, the candidates the rule calls false alarms.
      surface: ``[batch, seq]`` bool positions where every admissible choice keeps the
        answer (labels SURFACE).
      fork: ``[batch, seq]`` bool real forks (labels FORK and RECOVERY).
      token_loss, mask: optional ``[batch, seq]`` ℓ and the valid positions, for the loss
        surface share.
      guided: optional ``[batch, seq]`` bool guided points.

    Returns:
      ``true_surface_share`` |cand ∩ SURF| / |cand| (the measured counterpart of the
      quantile rule's q), ``fork_share`` |cand ∩ FORK| / |cand|, ``suppressed_share``
      |FA| / |cand| (= q by definition under the quantile rule),
      ``false_alarm_precision`` |FA ∩ SURF| / |FA|, ``false_alarm_recall``
      |FA ∩ SURF| / |cand ∩ SURF|, ``fork_suppressed`` |FA ∩ FORK| / |cand ∩ FORK|; with
      ``token_loss``: ``loss_surface_share`` Σ_SURF ℓ / Σ ℓ; with ``guided``:
      ``guided_fork_precision`` |guided ∩ FORK| / |guided|.
    """
    shape = candidates.shape
    for name, arr in (("false_alarm", false_alarm), ("surface", surface), ("fork", fork),
                      ("token_loss", token_loss), ("mask", mask), ("guided", guided)):
        if arr is not None and arr.shape != shape:
            raise ValueError(f"{name} {arr.shape} and candidates {shape} differ")
    cand = candidates.astype(bool)
    fa = false_alarm.astype(bool) & cand
    surf, frk = surface.astype(bool), fork.astype(bool)
    n = lambda b: jnp.sum(b).astype(jnp.float32)  # noqa: E731
    out = {
        "true_surface_share": (n(cand & surf), n(cand)),
        "fork_share": (n(cand & frk), n(cand)),
        "suppressed_share": (n(fa), n(cand)),
        "false_alarm_precision": (n(fa & surf), n(fa)),
        "false_alarm_recall": (n(fa & surf), n(cand & surf)),
        "fork_suppressed": (n(fa & frk), n(cand & frk)),
    }
    if token_loss is not None:
        valid = jnp.ones(shape, bool) if mask is None else mask.astype(bool)
        ell = jnp.where(valid, lax.stop_gradient(token_loss.astype(jnp.float32)), 0.0)
        out["loss_surface_share"] = (jnp.sum(jnp.where(surf, ell, 0.0)), jnp.sum(ell))
    if guided is not None:
        g = guided.astype(bool)
        out["guided_fork_precision"] = (n(g & frk), n(g))
    return out
