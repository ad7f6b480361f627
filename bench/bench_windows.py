"""near_future_window (O(T) prefix sums) vs naive per-position loops, T = 8192.

Baselines:
  numpy_loop   the definition: for every t, reduce values[t+1 : t+1+K] under the mask
               (a Python loop over t, NumPy inside) -- the "naive per-t loop".
  jax_gather   the strongest naive JAX version: gather the [B, T, K] windows and reduce,
               jitted; O(T·K) work.
Ours: ``near_future_window`` jitted (uniform mean, and discounted γ = 0.95).
Target: ≥ 10× faster than the naive loop at K = 50, and flat in K (50 vs 500).

Usage: python bench/bench_windows.py [--seq 8192] [--batch 2] [--reps 5]
Timing: one untimed warm-up (compile reported separately), then --reps timed runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from _timing import timed as _timed  # bench/_timing.py (run scripts as python bench/X.py)

import numpy as np


def timed(fn, reps):
    """(first call, median, min, max) seconds."""
    first, times = _timed(fn, reps)
    return first, statistics.median(times), min(times), max(times)


def numpy_loop(values, mask, window):
    out = np.zeros_like(values)
    length = values.shape[-1]
    for t in range(length):
        v = values[:, t + 1 : t + 1 + window]
        m = mask[:, t + 1 : t + 1 + window]
        count = m.sum(-1)
        out[:, t] = np.where(count > 0, (v * m).sum(-1) / np.maximum(count, 1), 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from topd_jax.losses import near_future_window

    rng = np.random.default_rng(0)
    values = rng.random((args.batch, args.seq)).astype(np.float32)
    mask = rng.random((args.batch, args.seq)) < 0.9
    jv, jm = jnp.asarray(values), jnp.asarray(mask)

    def gather_window(v, m, window):
        idx = jnp.arange(v.shape[-1])[:, None] + 1 + jnp.arange(window)[None, :]  # [T, K]
        inside = idx < v.shape[-1]
        idx = jnp.minimum(idx, v.shape[-1] - 1)
        mv = jnp.where(m, v, 0.0)[:, idx] * inside
        cnt = (m[:, idx] & inside).sum(-1)
        return jnp.where(cnt > 0, mv.sum(-1) / jnp.maximum(cnt, 1), 0.0)

    print(f"T={args.seq} B={args.batch}; seconds: first call (compile+run), median, min, max over {args.reps}")
    for window in (50, 500):
        ours = jax.jit(lambda v, m, w=window: near_future_window(v, m, w))
        ours_decay = jax.jit(lambda v, m, w=window: near_future_window(v, m, w, decay=0.95))
        gather = jax.jit(lambda v, m, w=window: gather_window(v, m, w))
        rows = {
            "numpy_loop": timed(lambda: numpy_loop(values, mask, window), max(1, args.reps // 2)),
            "jax_gather": timed(lambda: gather(jv, jm).block_until_ready(), args.reps),
            "ours_mean": timed(lambda: ours(jv, jm).block_until_ready(), args.reps),
            "ours_decay": timed(lambda: ours_decay(jv, jm).block_until_ready(), args.reps),
        }
        want = numpy_loop(values, mask, window)
        np.testing.assert_allclose(np.asarray(ours(jv, jm)), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gather(jv, jm)), want, rtol=1e-4, atol=1e-5)
        for name, (first, med, lo, hi) in rows.items():
            print(f"K={window:4d} {name:11s} first {first:8.4f}  median {med:9.5f}  min {lo:9.5f}  max {hi:9.5f}")
        loop, ours_t = rows["numpy_loop"][1], rows["ours_mean"][1]
        print(f"K={window:4d} speed-up vs numpy_loop: {loop / ours_t:,.0f}x; vs jax_gather: "
              f"{rows['jax_gather'][1] / ours_t:,.1f}x")


if __name__ == "__main__":
    main()
