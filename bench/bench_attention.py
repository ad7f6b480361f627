"""Training-shaped attention cost: forward + backward of the WORKLOADS.md student (W1's model,
tiny-student: hidden 256, 4 layers, 4 heads, 2 kv heads, head_dim 64) at long rows, with
model.attention = chunked (online softmax, models/attention.py) vs xla (the einsum with
[B, N, T, T] float32 scores), side by side in one run.

    python bench/bench_attention.py                            # T = 2048, 4096, 8192, batch 1
    python bench/bench_attention.py --lengths 4096 --reps 5

The loss is sum(hidden_states^2) over the model's final hidden states (the LM head is left
out: at T = 8192 its [T, 151936] float32 logits would dwarf what is measured here; the
chunked LM-head losses are benchmarked in bench_chunked_kl.py). Gradients w.r.t. all params.

Per (impl, T), in a fresh child process: XLA's compiled temp bytes (memory_analysis of the
jitted value-and-grad), compile time, then one untimed warm-up and --reps timed calls
(median/min/max), and the child's peak RSS. A configuration whose compiled temp bytes exceed
--max-run-gib is compiled (memory analysis) but not run.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(impl: str, t: int, reps: int, max_run_gib: float, block: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from topd_jax.models import ModelConfig, init_model

    cfg = ModelConfig.preset("tiny-student", max_position_embeddings=max(t, 4096), attention=impl,
                             attention_block_q=block, attention_block_kv=block)
    model = init_model(cfg, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(1), (1, t), 0, 151643, jnp.int32)
    mask = jnp.ones((1, t), bool)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        hidden, _ = m.hidden_states(ids, positions=jnp.arange(t)[None], attention_mask=mask)
        return jnp.sum(jnp.square(hidden.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    compiled = step.lower(params).compile()
    out = {"impl": impl, "T": t, "compile_s": time.perf_counter() - t0,
           "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "times": None}
    if out["temp_bytes"] <= max_run_gib * 2**30:
        run = lambda: jax.block_until_ready(compiled(params))
        t0 = time.perf_counter()
        run()
        out["warmup_s"] = time.perf_counter() - t0
        out["times"] = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            out["times"].append(time.perf_counter() - t0)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def fmt_gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--impls", nargs="+", default=["chunked", "xla"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block", type=int, default=512, help="attention_block_q = attention_block_kv")
    p.add_argument("--max-run-gib", type=float, default=10.0,
                   help="compile but do not run a configuration whose XLA temp bytes exceed this")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], int(a.child[1]), a.reps, a.max_run_gib, a.block)))
        return
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    rows = []
    for t in a.lengths:
        for impl in a.impls:
            cmd = [sys.executable, __file__, "--child", impl, str(t), "--reps", str(a.reps),
                   "--max-run-gib", str(a.max_run_gib), "--block", str(a.block)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{impl} T={t}: child failed (rc {proc.returncode}): {proc.stderr[-800:]}", flush=True)
                continue
            r = json.loads(line[0][7:])
            rows.append(r)
            times = r["times"]
            med = f"{statistics.median(times):8.2f}" if times else "  not run"
            spread = f"[{min(times):.2f}, {max(times):.2f}]" if times else "(temp > --max-run-gib)"
            print(f"T={t:6d} {impl:8s} temp {fmt_gib(r['temp_bytes']):>7s} GiB  peak RSS "
                  f"{fmt_gib(r['peak_rss_bytes'] if times else None):>6s} GiB  fwd+bwd median {med} s "
                  f"{spread}  compile {r['compile_s']:.1f} s", flush=True)
    print("\n| T | impl | XLA temp (GiB) | peak RSS (GiB) | fwd+bwd median (s) [min, max] | temp ratio xla/chunked "
          "| time ratio chunked/xla |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["impl"], r["T"]): r for r in rows}
    for r in rows:
        other = by.get(("xla", r["T"])) if r["impl"] == "chunked" else None
        ratio_mem = f"{other['temp_bytes'] / r['temp_bytes']:.1f}x" if other else ""
        ratio_time = (f"{statistics.median(r['times']) / statistics.median(other['times']):.2f}"
                      if other and r["times"] and other["times"] else "")
        times = r["times"]
        cell = f"{statistics.median(times):.2f} [{min(times):.2f}, {max(times):.2f}]" if times else "not run"
        print(f"| {r['T']} | {r['impl']} | {fmt_gib(r['temp_bytes'])} | "
              f"{fmt_gib(r['peak_rss_bytes'] if times else None)} | {cell} | {ratio_mem} | {ratio_time} |")


if __name__ == "__main__":
    main()
