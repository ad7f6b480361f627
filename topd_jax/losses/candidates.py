"""High-loss candidate positions per rollout (TOPD §2) and masked quantiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_LOWEST = float(jnp.finfo(jnp.float32).min)


def masked_quantile(x: jax.Array, mask: jax.Array, q: float, *, axis: int | None = -1) -> jax.Array:
    """Quantile of the valid entries, linear interpolation (NumPy's default method).

    Args:
      x: ``[..., T]`` values; masked entries are never read.
      mask: same shape; which entries count.
      q: quantile in [0, 1].
      axis: ``-1`` for one quantile per row (``[...]`` result), ``None`` for one over all
        valid entries (scalar result).

    Returns:
      float32 quantile(s); 0 where a row (or the whole array) has no valid entry.
    """
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"quantile must be in [0, 1], got {q!r}")
    if x.shape != mask.shape:
        raise ValueError(f"values {x.shape} and mask {mask.shape} differ")
    if axis is None:
        x, mask = x.reshape(-1), mask.reshape(-1)
    elif axis != -1:
        x, mask = jnp.moveaxis(x, axis, -1), jnp.moveaxis(mask, axis, -1)
    valid = mask.astype(bool)
    ordered = jnp.sort(jnp.where(valid, x.astype(jnp.float32), jnp.inf), axis=-1)
    count = jnp.sum(valid, axis=-1)
    position = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
    lo = jnp.floor(position).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
    lo_val = jnp.take_along_axis(ordered, lo[..., None], axis=-1)[..., 0]
    hi_val = jnp.take_along_axis(ordered, hi[..., None], axis=-1)[..., 0]
    frac = position - lo.astype(jnp.float32)
    # lo == hi at the top (frac == 0): avoid inf - inf when the next slot is padding.
    value = lo_val + jnp.where(frac > 0, frac * (hi_val - lo_val), 0.0)
    return jnp.where(count > 0, value, 0.0)


def _selection_scores(token_loss: jax.Array, valid: jax.Array) -> jax.Array:
    """Valid entries keep their loss (NaN/-inf become the lowest finite float, so a
    valid position always beats a masked one); masked entries become -inf."""
    score = token_loss.astype(jnp.float32)
    score = jnp.where(jnp.isnan(score), _LOWEST, jnp.maximum(score, _LOWEST))
    return jnp.where(valid, score, -jnp.inf)


def select_candidates(
    token_loss: jax.Array,
    mask: jax.Array,
    *,
    num: int = 3,
    min_separation: int = 8,
) -> jax.Array:
    """Top-``num`` highest-loss valid positions per row, greedily, spaced apart.

    Greedy: repeatedly take the highest remaining loss (ties: the leftmost), then rule out
    every position closer than ``min_separation`` to it (|i − j| < min_separation), so
    any two selected positions are at least ``min_separation`` apart. A row with fewer
    eligible positions yields fewer candidates (possibly none).

    Args:
      token_loss: ``[batch, seq]`` per-token loss ℓ (any leading shape; rows are the last
        axis). Not differentiated.
      mask: ``[batch, seq]`` valid positions.
      num: candidates per row, a static Python int ≥ 0 (TOPD default C = 3).
      min_separation: static Python int ≥ 1 (default 8).

    Returns:
      ``[batch, seq]`` bool.
    """
    if not (isinstance(num, int) and num >= 0):
        raise ValueError(f"num must be a non-negative Python int, got {num!r}")
    if not (isinstance(min_separation, int) and min_separation >= 1):
        raise ValueError(f"min_separation must be a Python int >= 1, got {min_separation!r}")
    if token_loss.shape != mask.shape:
        raise ValueError(f"token_loss {token_loss.shape} and mask {mask.shape} differ")
    valid = mask.astype(bool)
    score = lax.stop_gradient(_selection_scores(token_loss, valid))
    positions = jnp.arange(score.shape[-1])

    def pick(_, state):
        chosen, available = state
        best = jnp.argmax(jnp.where(available, score, -jnp.inf), axis=-1)[..., None]
        any_left = jnp.any(available, axis=-1, keepdims=True)
        chosen = chosen | ((positions == best) & any_left)
        near = jnp.abs(positions - best) < min_separation
        return chosen, available & ~near

    chosen = jnp.zeros(score.shape, bool)
    chosen, _ = lax.fori_loop(0, num, pick, (chosen, valid))
    return chosen


def select_candidates_quantile(
    token_loss: jax.Array, mask: jax.Array, *, quantile: float = 0.8
) -> jax.Array:
    """All valid positions whose loss is strictly above the row's ``quantile`` of ℓ.

    Args:
      token_loss: ``[batch, seq]``; mask: ``[batch, seq]``; quantile: q in [0, 1]
        (TOPD alternative default 0.8), over the valid positions of each row, linear
        interpolation as in ``numpy.quantile``.

    Returns:
      ``[batch, seq]`` bool; rows whose valid losses are all equal select nothing.
    """
    valid = mask.astype(bool)
    loss = lax.stop_gradient(token_loss.astype(jnp.float32))
    threshold = masked_quantile(loss, valid, quantile, axis=-1)
    return valid & (loss > threshold[..., None])
