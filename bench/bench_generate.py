"""W1 (bench/WORKLOADS.md): greedy generation throughput, topd_jax.rollout vs transformers generate.

    python bench/bench_generate.py                              # student, B=16 and 64, 64 + 256 tokens
    python bench/bench_generate.py --batch 16 --torch-reps 1    # fewer torch repetitions
    python bench/bench_generate.py --preset qwen3-1.7b --batch 64 --new-tokens 1024 --dtype bfloat16 \
        --no-torch --hbm-gbps 3350                              # on one GPU: random weights, bandwidth ratio
    python bench/bench_generate.py --batch 16 --new-tokens 1024 --cache-budget 1024 4096 --no-torch
        # decode cost vs the preallocated cache: the same 1024 tokens in a cache sized for
        # P + budget - 1 slots, each budget side by side in one process (ratio to the first)

--cache-budget works on any checkout that has `Qwen.init_cache(batch, max_len, ...)` (it
patches the class to allocate more slots), so an older commit can be measured by running this
file from a `git worktree` of it.

Protocol: identical weights on both sides (random HF Qwen3 saved and loaded into ours), prompts of
64 random ids in [0, 151643) from torch.Generator().manual_seed(1), exactly --new-tokens new
tokens (no eos), KV cache on. One untimed warm-up per side (JAX: compile included, reported
separately as first call minus the median), then >= 3 timed repetitions in the same process;
median/min/max; JAX results block_until_ready; torch.set_num_threads(2). Metric: new tokens/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

from _timing import timed  # bench/_timing.py (run scripts as python bench/X.py)
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from topd_jax.models import ModelConfig, init_model, load_pretrained  # noqa: E402
from topd_jax.rollout import generate  # noqa: E402

WORKLOAD_MODELS = {"student": ("tiny-student", 0), "teacher": ("tiny-teacher", 1)}  # preset, torch seed


def report(name: str, new_tokens: int, first: float, times: list[float], compile_note: bool) -> float:
    med = statistics.median(times)
    extra = f"  compile ~{first - med:.1f} s (first call {first:.1f} s)" if compile_note else f"  warm-up {first:.1f} s"
    print(f"  {name:30s} {new_tokens / med:8.0f} tok/s  median {med:7.2f} s  min {min(times):7.2f}  "
          f"max {max(times):7.2f}  reps {len(times)}{extra}", flush=True)
    return med


def build_torch_and_ours(cfg: ModelConfig, seed: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                         tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta,
                         max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps)
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d)
    return hf, ours


def prompts(batch: int, length: int, vocab: int) -> np.ndarray:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, min(vocab, 151643), (batch, length), generator=g).numpy().astype(np.int32)


def budget_slots(prompt_len: int, budget: int) -> int:
    """Slots of a cache sized for `budget` new tokens, in whole 256-slot blocks once longer."""
    need = prompt_len + budget - 1
    return need if need <= 256 else -(-need // 256) * 256


def bench_budgets(model, batch: int, args) -> None:
    """The same generation (args.new_tokens greedy tokens) with the cache allocated for each of
    args.cache_budget new tokens: decode cost should follow the filled length, not the budget.
    One warm-up (compile) per budget, then the timed calls interleaved (budget A, B, A, B, ...)
    so that load drift on a shared machine hits every budget alike; wall and process CPU seconds."""
    import time

    from topd_jax.models.qwen import Qwen

    cfg = model.config
    ids = jnp.asarray(prompts(batch, args.prompt_len, cfg.vocab_size))
    mask = jnp.ones(ids.shape, bool)
    original = Qwen.init_cache
    wall, cpu, tokens = {b: [] for b in args.cache_budget}, {b: [] for b in args.cache_budget}, {}
    print(f"B={batch}: {args.new_tokens} new tokens after {args.prompt_len}, cache budgets {args.cache_budget} "
          f"(slots {[budget_slots(args.prompt_len, b) for b in args.cache_budget]}), reps interleaved", flush=True)

    def run(budget):
        slots = budget_slots(args.prompt_len, budget)
        Qwen.init_cache = lambda self, b, max_len, *a, **kw: original(self, b, max(max_len, slots), *a, **kw)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            res = generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=args.new_tokens, temperature=0.0)
            tokens[budget] = np.asarray(jax.block_until_ready(res.tokens))
            return time.perf_counter() - t0, time.process_time() - c0
        finally:
            Qwen.init_cache = original

    for budget in args.cache_budget:
        print(f"  warm-up budget {budget}: {run(budget)[0]:.1f} s (compile included)", flush=True)
    for _ in range(args.reps):
        for budget in args.cache_budget:
            w, c = run(budget)
            wall[budget].append(w)
            cpu[budget].append(c)
    base = args.cache_budget[0]
    for budget in args.cache_budget:
        w, c = statistics.median(wall[budget]), statistics.median(cpu[budget])
        print(f"  budget {budget:5d}: wall median {w:7.2f} s ({batch * args.new_tokens / w:6.0f} tok/s, "
              f"min {min(wall[budget]):.2f} max {max(wall[budget]):.2f}), process CPU median {c:7.2f} s; "
              f"vs budget {base}: wall {w / statistics.median(wall[base]):.2f}x, CPU "
              f"{c / statistics.median(cpu[base]):.2f}x, identical tokens {bool((tokens[budget] == tokens[base]).all())}",
              flush=True)


def bench_batch(model, hf, batch: int, args) -> None:
    cfg = model.config
    ids = prompts(batch, args.prompt_len, cfg.vocab_size)
    mask = np.ones(ids.shape, bool)
    new_tokens = batch * args.new_tokens
    print(f"B={batch}: {batch} x ({args.prompt_len} prompt + {args.new_tokens} new) tokens, greedy", flush=True)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    out = {}

    def run_ours():
        out["ours"] = generate(model, ids_j, mask_j, key=jax.random.key(0), max_new_tokens=args.new_tokens,
                               temperature=0.0)
        jax.block_until_ready(out["ours"].tokens)

    first, times = timed(run_ours, args.reps)
    ours_med = report("topd_jax.rollout.generate", new_tokens, first, times, compile_note=True)
    if args.hbm_gbps:
        bandwidth_bound(cfg, batch, args, ours_med)
    if hf is None:
        return
    import torch

    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.ones(ids.shape, dtype=torch.long)

    def run_torch():
        with torch.no_grad():
            out["torch"] = hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False,
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       eos_token_id=None, pad_token_id=0)

    first_t, times_t = timed(run_torch, args.torch_reps)
    torch_med = report("transformers generate (torch)", new_tokens, first_t, times_t, compile_note=False)
    ref = out["torch"].numpy()[:, args.prompt_len:]
    got = np.asarray(out["ours"].tokens)
    first_diff = [int(np.argmax(r != g)) if (r != g).any() else args.new_tokens for r, g in zip(ref, got)]
    same = sum(d == args.new_tokens for d in first_diff)
    print(f"  speed-up ours/transformers: {torch_med / ours_med:.2f}x   identical rows {same}/{batch}, median first "
          f"differing step {int(np.median(first_diff))} (near-ties of a random model)", flush=True)


def bandwidth_bound(cfg: ModelConfig, batch: int, args, seconds: float) -> None:
    """Ratio of the measured decode time to the HBM-bandwidth floor: every step reads all
    weights once plus the live KV cache (the prefill is ignored, so the ratio is an upper bound)."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weight_bytes = cfg.num_params() * itemsize
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    steps = args.new_tokens
    mean_len = args.prompt_len + steps / 2
    floor = steps * (weight_bytes + batch * mean_len * kv_per_token) / (args.hbm_gbps * 1e9)
    print(f"  bandwidth floor {floor:.2f} s for {steps} steps -> {100 * floor / seconds:.0f} % of the "
          f"{args.hbm_gbps:.0f} GB/s limit", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(WORKLOAD_MODELS), default="student")
    p.add_argument("--preset", default=None, help="random-weight preset instead of a WORKLOADS model (no torch)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch-reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--hbm-gbps", type=float, default=None, help="device memory bandwidth, for the ratio")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="with --preset: override the vocabulary (a small one makes attention dominate a step)")
    p.add_argument("--cache-budget", type=int, nargs="+", default=None,
                   help="instead of the torch comparison: time the generation with the KV cache sized "
                        "for each of these numbers of new tokens (P + budget - 1 slots)")
    args = p.parse_args()

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load avg {os.getloadavg()}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    hf = None
    if args.preset:
        vocab = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
        cfg = ModelConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, **vocab)
        model = init_model(cfg)
    else:
        preset, seed = WORKLOAD_MODELS[args.model]
        hf, model = build_torch_and_ours(ModelConfig.preset(preset), seed)
        cfg = model.config
        if args.no_torch:
            hf = None
        else:
            import torch

            torch.set_num_threads(2)
    print(f"model: {args.preset or args.model} ({cfg.num_params() / 1e6:.1f}M params, vocab {cfg.vocab_size}), "
          f"dtype {cfg.dtype}", flush=True)
    for batch in args.batch:
        if args.cache_budget:
            bench_budgets(model, batch, args)
        else:
            bench_batch(model, hf, batch, args)
    print(f"load avg at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
