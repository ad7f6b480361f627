"""W4: full-vocabulary reverse KL, forward + backward -- chunked vs unchunked.

Every configuration runs in a fresh Python process so its peak RSS (``ru_maxrss`` of
that process, the same number GNU ``time -v`` reports) is its own. Modes:

  logits     W4 as specified: f32 logits [B, T, V] of both models are the inputs;
             loss = token-mean reverse KL; gradient w.r.t. the student logits.
  unchunked  hidden [B, T, 256] @ lm_head [256, V] for both models, then
             ``token_divergence``; gradient w.r.t. student hidden and LM head.
  chunked    the same computation through ``chunked_token_divergence`` (remat per chunk).
  fused      the same loss through ``chunked_opd_loss`` (gradient accumulated during
             the forward sweep; no recomputation).

Usage (one at a time; the naive modes need ≈ 17-19 GiB at T = 2048):
  python bench/bench_chunked_kl.py --seq 2048 --modes unchunked chunked
  python bench/bench_chunked_kl.py --worker chunked --seq 2048 --chunk-size 256
Timing: one untimed warm-up (compile reported separately), then --reps timed runs;
median/min/max in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH, HIDDEN, VOCAB = 2, 256, 151936


def worker(mode: str, seq: int, chunk_size: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from topd_jax.losses import chunked_opd_loss, chunked_token_divergence, opd_loss, token_divergence

    keys = jax.random.split(jax.random.key(0), 4)
    mask = jnp.ones((BATCH, seq), bool).at[:, : seq // 8].set(False)  # a prompt prefix

    def mean_loss(per_token):
        total, count = opd_loss(per_token, mask)
        return total / count

    if mode == "logits":
        args = (
            jax.random.normal(keys[0], (BATCH, seq, VOCAB), jnp.float32),
            jax.random.normal(keys[1], (BATCH, seq, VOCAB), jnp.float32),
        )
        loss = lambda s, t: mean_loss(token_divergence(s, t, mask))
        step = jax.jit(jax.value_and_grad(loss))
    else:
        scale = HIDDEN**-0.5
        args = (
            jax.random.normal(keys[0], (BATCH, seq, HIDDEN), jnp.float32),
            jax.random.normal(keys[1], (HIDDEN, VOCAB), jnp.float32) * scale,
            jax.random.normal(keys[2], (BATCH, seq, HIDDEN), jnp.float32),
            jax.random.normal(keys[3], (HIDDEN, VOCAB), jnp.float32) * scale,
        )
        if mode == "unchunked":
            loss = lambda hs, ws, ht, wt: mean_loss(token_divergence(hs @ ws, ht @ wt, mask))
        elif mode == "chunked":
            loss = lambda hs, ws, ht, wt: mean_loss(
                chunked_token_divergence(hs, ws, ht, wt, mask, chunk_size=chunk_size)
            )
        elif mode == "fused":
            def loss(hs, ws, ht, wt):
                total, count = chunked_opd_loss(hs, ws, ht, wt, mask, chunk_size=chunk_size)
                return total / count
        else:
            raise ValueError(f"unknown mode {mode!r}")
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready(args)

    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    value = jax.block_until_ready(compiled(*args))[0]
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "seq": seq,
        "chunk_size": chunk_size if mode in ("chunked", "fused") else None,
        "loss": float(value),
        "compile_s": round(compile_s, 2),
        "warmup_s": round(warmup_s, 2),
        "median_s": round(statistics.median(times), 2),
        "min_s": round(min(times), 2),
        "max_s": round(max(times), 2),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["logits", "unchunked", "chunked", "fused"])
    parser.add_argument("--modes", nargs="+", default=["fused", "chunked", "unchunked", "logits"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq, args.chunk_size, args.reps)), flush=True)
        return
    for mode in args.modes:  # strictly one process at a time
        cmd = [sys.executable, __file__, "--worker", mode, "--seq", str(args.seq),
               "--chunk-size", str(args.chunk_size), "--reps", str(args.reps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"mode": mode, "seq": args.seq, "error": out.stderr.strip()[-500:]}), flush=True)
        else:
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
