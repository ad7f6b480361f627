"""Near-future windows: for every position t, reduce the valid positions t+1 … t+K.

All windows of a row are computed at once in O(T) work, whatever K is:
  * plain sums are differences of one prefix sum;
  * discounted sums use the reverse discounted prefix sum G_t = x_t + γ·G_{t+1}
    (one reverse scan), and window(t) = G_{t+1} − γ^K·G_{t+K+1}.
    G is bounded by max|x| / (1 − γ), so nothing blows up -- unlike the textbook
    ``cumsum(γ^-t x)`` formulation, whose γ^-t overflows float32 after a few
    thousand positions at γ = 0.95.
The window is over *positions*: invalid (masked) positions inside t+1 … t+K are
skipped, not replaced by later ones, and the decay exponent is the position offset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

WINDOW_REDUCTIONS = ("sum", "mean")


def _check_window(window: int, decay) -> None:
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be a positive Python int, got {window!r}")
    if isinstance(decay, (int, float)) and not (0.0 < decay <= 1.0):
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")


def _shift_left(x: jax.Array, shift: int) -> jax.Array:
    """``out[..., t] = x[..., t + shift]`` and the last element repeated past the end.

    ``x`` is ``[..., T + 1]`` (a prefix array whose last entry covers the whole row), the
    result is ``[..., T]``.
    """
    length = x.shape[-1] - 1
    edge = jnp.repeat(x[..., -1:], shift, axis=-1)
    return jnp.concatenate([x, edge], axis=-1)[..., shift : shift + length]


def _window_sum_plain(x: jax.Array, window: int) -> jax.Array:
    """Σ_{j=t+1}^{min(t+K, T-1)} x_j for all t; ``[..., T] -> [..., T]``."""
    zeros = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
    prefix = jnp.concatenate([zeros, jnp.cumsum(x, axis=-1)], axis=-1)  # prefix[k] = Σ_{j<k}
    return _shift_left(prefix, window + 1) - _shift_left(prefix, 1)


def _reverse_discounted_cumsum(x: jax.Array, decay) -> jax.Array:
    """G_t = Σ_{j≥t} decay^{j−t} x_j along the last axis, ``[..., T] -> [..., T]``.

    A sequential reverse ``lax.scan`` (G_t = x_t + γ·G_{t+1}): O(T) work, compiles in
    ≈ 0.2 s. ``lax.associative_scan`` gives the same numbers with log-depth, but took
    1.7 s to compile at T = 8192 on CPU and was 4× slower to run there.
    """

    def step(g_next, x_t):
        g_t = x_t + decay * g_next
        return g_t, g_t

    carry = jnp.zeros(x.shape[:-1], x.dtype)
    _, g = lax.scan(step, carry, jnp.moveaxis(x, -1, 0), reverse=True)
    return jnp.moveaxis(g, 0, -1)


def _window_sum_discounted(x: jax.Array, window: int, decay) -> jax.Array:
    """Σ_{i=0}^{K−1} decay^i x_{t+1+i} (positions past the end count as 0)."""
    g = _reverse_discounted_cumsum(x, decay)
    zeros = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
    g = jnp.concatenate([g, zeros], axis=-1)  # G_T = 0: [..., T + 1]
    decay_k = jnp.asarray(decay, x.dtype) ** window
    return _shift_left(g, 1) - decay_k * _shift_left(g, window + 1)


def _window_sum(x: jax.Array, window: int, decay) -> jax.Array:
    if decay is None:
        return _window_sum_plain(x, window)
    return _window_sum_discounted(x, window, decay)


def near_future_count(mask: jax.Array, window: int) -> jax.Array:
    """Number of valid positions in t+1 … t+window; ``[..., T] -> [..., T]`` int32."""
    _check_window(window, None)
    return _window_sum_plain(mask.astype(jnp.int32), window)


def near_future_window(
    values: jax.Array,
    mask: jax.Array,
    window: int,
    *,
    reduce: str = "mean",
    decay: float | None = None,
) -> jax.Array:
    """Reduce ``values`` over the valid positions t+1 … t+window of the same row.

    Args:
      values: ``[batch, seq]`` (any leading shape; the window runs along the last axis),
        e.g. the per-token loss ℓ. Values at masked positions are never read.
      mask: same shape as ``values``; 0 for padding/prompt positions.
      window: K, a positive Python int. Cost does not depend on it.
      reduce: ``"sum"`` or ``"mean"``.
      decay: ``None`` (uniform) or γ in (0, 1]: the i-th future position (t+1+i) is
        weighted γ^i. With ``"mean"`` the result is the weighted mean
        Σ γ^i m v / Σ γ^i m.

    Returns:
      ``[batch, seq]`` float32. Where no valid position lies in t+1 … t+window (the end
      of a row, or an all-masked row) both ``"sum"`` and ``"mean"`` return 0; use
      ``near_future_count`` to tell those entries apart.
    """
    if reduce not in WINDOW_REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not one of {WINDOW_REDUCTIONS}")
    _check_window(window, decay)
    if values.shape != mask.shape:
        raise ValueError(f"values {values.shape} and mask {mask.shape} differ")
    valid = mask.astype(bool)
    x = jnp.where(valid, values.astype(jnp.float32), 0.0)
    total = _window_sum(x, window, decay)
    if reduce == "sum":
        return total
    weight = _window_sum(valid.astype(jnp.float32), window, decay)
    # A discounted count can be slightly off zero by round-off; the exact integer count
    # decides emptiness, and the weight is only used where it is >= decay^(K-1) > 0.
    nonempty = near_future_count(valid, window) > 0
    return jnp.where(nonempty, total / jnp.where(nonempty, weight, 1.0), 0.0)
