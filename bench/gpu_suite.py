"""GPU suite: decode throughput against its HBM roofline, and a TOPD step's tokens/s and MFU.

    bash bench/gpu_suite.sh                       # one H100/H200: Qwen3-1.7B student, Qwen3-8B teacher
    python bench/gpu_suite.py --gpu h100          # the same, H100 defaults (bandwidth, peak FLOP/s)
    python bench/gpu_suite.py --tiny              # tiny random models on CPU (about a minute): checks the script

Models: random weights (``init_model``) of the presets qwen3-1.7b (student) and qwen3-8b
(teacher) in bfloat16 compute (student master weights float32, as the paper's configs), on one
device. Timing (bench/_timing.py): one untimed call (compile included, reported), then --reps
timed calls; median, min, max.

1. Decode: ``rollout.generate`` of the student, --decode-batch rows, a random prompt of
   --decode-prompt tokens, exactly --decode-new tokens (no stop token). tokens/s = rows x new
   tokens / seconds. Roofline: each decode step reads the weights (compute dtype) and the KV
   cache; at HBM bandwidth B the step takes at least bytes / B, so tokens/s <= rows / that.
   Two figures: the filled KV (prompt + tokens so far: what a ragged kernel reads) and the whole
   preallocated cache (P + N - 1 slots per row: what dense attention over the cache reads).
2. TOPD step: the trainer's own machinery (``load_config``, ``prepare_batch``, ``build_objective``,
   ``TrainStep``), algorithm=topd with the paper's K=50, C=3, OT detector and guidance, at rows
   of --step-lengths tokens (prompt --step-prompt, the rest sampled; no stop token), --step-rows
   rows (the paper: 1 prompt x n = 4). tokens/s = rows x length / step seconds. MFU = model
   FLOPs / (seconds x peak FLOP/s), FLOPs as ``forward_flops`` / ``train_flops`` count them
   (2 per active parameter per token, plus causal attention; x3 for forward + backward): the
   update's over the update's time, and the teacher's scoring forward + the update over the
   step time minus sampling (decode is bandwidth-bound; part 1 has its figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import timed  # noqa: E402

# Vendor figures (SXM parts, dense bf16 tensor cores, HBM): H100 3.35 TB/s, H200 4.8 TB/s; both 989 TFLOP/s.
GPUS = {"h100": {"bandwidth_tbs": 3.35, "peak_tflops": 989.0}, "h200": {"bandwidth_tbs": 4.8, "peak_tflops": 989.0}}
TINY_ARCH = {"vocab_size": 512, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "max_position_embeddings": 4096}
TINY_SIZES = {"student": {"hidden_size": 64, "intermediate_size": 128},
              "teacher": {"hidden_size": 96, "intermediate_size": 192}}


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def model_overrides(role: str, preset: str, tiny: bool) -> list[str]:
    """Run-config overrides of one model: a preset, or (tiny) explicit small architecture fields."""
    # tiny (CPU): float32 compute, as CPU runs it natively; the GPU suite computes in bf16
    dtype = "float32" if tiny else "bfloat16"
    common = [f"{role}.dtype={dtype}", f"{role}.param_dtype={'float32' if role == 'student' else dtype}"]
    if tiny:
        return common + [f"{role}.{k}={v}" for k, v in {**TINY_ARCH, **TINY_SIZES[role]}.items()]
    return common + [f"{role}.preset={preset}", f"{role}.remat=full" if role == "student" else f"{role}.remat=none"]


# ---------------------------------------------------------------- FLOPs and bytes
def forward_flops(config, rows: int, length: int) -> float:
    """Matmul FLOPs of one teacher-forced forward over ``rows`` rows of ``length`` tokens:
    2 per active parameter per token (the tied LM head once, as num_active_params counts it)
    + causal attention 2 x 2 x heads x head_dim x length / 2 per token and layer (QK^T, PV)."""
    tokens = rows * length
    attn = 2 * config.num_layers * config.num_heads * config.head_dim * length * tokens
    return 2.0 * config.num_active_params() * tokens + attn


def train_flops(config, rows: int, length: int) -> float:
    """Forward + backward (x3); remat's recomputation is not counted (the MFU convention)."""
    return 3.0 * forward_flops(config, rows, length)


def weight_bytes(config) -> int:
    """The weights in the compute dtype (what a decode step reads; dense models: every parameter)."""
    return config.num_params() * config.compute_dtype.dtype.itemsize


def decode_step_bytes(config, rows: int, filled: int) -> int:
    """Bytes one decode step reads: the weights and k, v of ``filled`` slots per row."""
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * config.compute_dtype.dtype.itemsize
    return weight_bytes(config) + rows * filled * kv


def decode_roofline(config, rows: int, prompt: int, new: int, bandwidth: float) -> dict[str, float]:
    """tokens/s bounds at ``bandwidth`` (bytes/s): mean over the steps of the filled KV, and the
    whole preallocated cache (P + N - 1 slots) every step."""
    filled_s = sum(decode_step_bytes(config, rows, prompt + i) for i in range(new)) / bandwidth
    full_s = new * decode_step_bytes(config, rows, prompt + new - 1) / bandwidth
    return {"filled_kv_tok_s": rows * new / filled_s, "full_cache_tok_s": rows * new / full_s,
            "weights_gb": weight_bytes(config) / 1e9,
            "kv_gb_full_cache": (decode_step_bytes(config, rows, prompt + new - 1) - weight_bytes(config)) / 1e9}


# ---------------------------------------------------------------- the run config
def run_config(args, length: int, algorithm: str = "topd"):
    from topd_jax.config.loader import load_config
    new = length - args.step_prompt
    if new < 1:
        raise SystemExit(f"--step-lengths {length} must exceed --step-prompt {args.step_prompt}")
    return load_config(None, [
        f"algorithm={algorithm}", "data.source=synthetic", "data.template=plain", "data.prompts_per_step=1",
        f"rollout.n={args.step_rows}", f"data.max_prompt_len={args.step_prompt}", f"rollout.max_new_tokens={new}",
        "rollout.temperature=1.0", "optim.lr=2e-6", "optim.warmup_fraction=0", f"steps={args.reps + 1}",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "loss.vocab_chunk=512",
        f"topd.window={args.window}", "topd.num_candidates=3", "topd.min_separation=8",
        *model_overrides("student", args.student, args.tiny), *model_overrides("teacher", args.teacher, args.tiny),
        *args.set])


# ---------------------------------------------------------------- 1. decode
def bench_decode(args, bandwidth: float) -> dict:
    import jax
    import numpy as np

    from topd_jax.models import init_model
    from topd_jax.rollout import generate
    from topd_jax.train.setup import model_plan

    cfg = run_config(args, args.step_prompt + 1)
    student = model_plan(cfg.student, "student", None, cfg.seed).config
    model = init_model(student.replace(param_dtype=student.dtype), seed=0)  # decode reads compute-dtype weights
    rng = np.random.default_rng(1)
    ids = rng.integers(0, student.vocab_size, (args.decode_batch, args.decode_prompt), dtype=np.int32)
    mask = np.ones_like(ids, bool)
    run = lambda: jax.block_until_ready(generate(model, ids, mask, key=jax.random.key(0),
                                                  max_new_tokens=args.decode_new, eos_ids=()).tokens)
    first, times = timed(run, args.reps)
    med = statistics.median(times)
    tok_s = args.decode_batch * args.decode_new / med
    roof = decode_roofline(student, args.decode_batch, args.decode_prompt, args.decode_new, bandwidth)
    return {"part": "decode", "rows": args.decode_batch, "prompt": args.decode_prompt, "new": args.decode_new,
            "seconds": stats(times), "first_call_s": first, "tokens_per_s": tok_s, **roof,
            "fraction_of_filled_kv_roofline": tok_s / roof["filled_kv_tok_s"]}


# ---------------------------------------------------------------- 2. TOPD step
def bench_step(args, length: int, peak: float) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from topd_jax.algorithms import Frozen, build_objective, prepare_batch
    from topd_jax.models import init_model
    from topd_jax.sharding import MeshConfig, make_mesh
    from topd_jax.train.loop import rollout_len
    from topd_jax.train.optim import lr_schedule, make_optimizer
    from topd_jax.train.setup import model_plan
    from topd_jax.train.state import create_train_state
    from topd_jax.train.step import TrainStep

    cfg = run_config(args, length)
    s_cfg = model_plan(cfg.student, "student", None, cfg.seed).config
    t_cfg = model_plan(cfg.teacher, "teacher", None, cfg.seed + 1).config
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rows, seq_len = args.step_rows, rollout_len(cfg)
    student, teacher = init_model(s_cfg, seed=0, mesh=mesh), init_model(t_cfg, seed=1, mesh=mesh)  # outside set_mesh
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optim, cfg.steps)
        graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0, copy=False)
        del student
        loss_fn, normalize = build_objective(cfg, graphdef, seq_len)
        step_fn = TrainStep(loss_fn, tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh,
                            micro_batches=cfg.optim.micro_batches, normalize=normalize)
        frozen = Frozen(teacher, teacher.lm_head_weight(), (), 0)  # no stop token: full-length rollouts
        ids = np.random.default_rng(2).integers(0, s_cfg.vocab_size, (1, args.step_prompt), dtype=np.int32)
        prompts = {"prompt_ids": ids, "prompt_mask": np.ones_like(ids, bool)}
        steps, phases = [], []
        for i in range(args.reps + 1):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            model = nnx.merge(graphdef, state.params)
            batch, _, _ = prepare_batch(cfg, model, prompts, jax.random.key(i), frozen, timings)
            jax.block_until_ready(batch)
            del model
            t1 = time.perf_counter()
            state, out = step_fn(state, batch, frozen.teacher_head)
            jax.block_until_ready((state, out))
            t2 = time.perf_counter()
            steps.append(t2 - t0)
            phases.append({"sampling": timings.get("sampling", 0.0), "scoring": timings.get("scoring", 0.0),
                           "prepare": t1 - t0, "update": t2 - t1})
    timed_steps, timed_phases = steps[1:], phases[1:]
    phase = {k: statistics.median(p[k] for p in timed_phases) for k in timed_phases[0]}
    step_s = statistics.median(timed_steps)
    update_flops = train_flops(s_cfg, rows, seq_len)
    scored_flops = forward_flops(t_cfg, rows, seq_len) + update_flops
    return {"part": "topd_step", "length": seq_len, "rows": rows, "tokens": rows * seq_len,
            "step_s": stats(timed_steps), "first_step_s": steps[0], "phases_s": phase,
            "tokens_per_s": rows * seq_len / step_s,
            "update_tflops": update_flops / 1e12, "mfu_update": update_flops / phase["update"] / peak,
            "mfu_step_without_sampling": scored_flops / max(step_s - phase["sampling"], 1e-9) / peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="h200", help="bandwidth / peak defaults")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="HBM bandwidth, TB/s (default: --gpu's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, TFLOP/s (default: --gpu's)")
    p.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                   help="tiny random float32 models and lengths: checks the script on CPU "
                        "(compile-bound, about a minute)")
    p.add_argument("--student", default="qwen3-1.7b")
    p.add_argument("--teacher", default="qwen3-8b")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-prompt", type=int, default=1024)
    p.add_argument("--decode-new", type=int, default=1024)
    p.add_argument("--step-lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--step-prompt", type=int, default=512)
    p.add_argument("--step-rows", type=int, default=4, help="rollouts per step (1 prompt x n)")
    p.add_argument("--window", type=int, default=50, help="TOPD K")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip", choices=["decode", "step"], nargs="*", default=[])
    p.add_argument("--set", nargs="*", default=[], help="extra run-config overrides (key=value)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.decode_batch, args.decode_prompt, args.decode_new = 4, 16, 8
        args.step_lengths, args.step_prompt, args.step_rows = [48], 16, 4
        args.window, args.reps = 4, 1
    import jax
    bandwidth = (args.bandwidth_tbs or GPUS[args.gpu]["bandwidth_tbs"]) * 1e12
    peak = (args.peak_tflops or GPUS[args.gpu]["peak_tflops"]) * 1e12
    print(f"# gpu_suite: backend {jax.default_backend()}, devices {jax.devices()[0].device_kind!r}, "
          f"bandwidth {bandwidth / 1e12:g} TB/s, peak {peak / 1e12:g} TFLOP/s"
          f"{' (nominal: not this machine)' if jax.default_backend() == 'cpu' else ''}", flush=True)
    results = []
    if "decode" not in args.skip:
        r = bench_decode(args, bandwidth)
        results.append(r)
        print(f"decode: {r['rows']} rows, prompt {r['prompt']}, {r['new']} new tokens: "
              f"{r['tokens_per_s']:,.0f} tok/s (median {r['seconds']['median']:.3f} s, first call "
              f"{r['first_call_s']:.1f} s); HBM roofline {r['filled_kv_tok_s']:,.0f} tok/s over the filled KV, "
              f"{r['full_cache_tok_s']:,.0f} tok/s over the whole cache (weights {r['weights_gb']:.2f} GB, "
              f"full cache {r['kv_gb_full_cache']:.2f} GB); {r['fraction_of_filled_kv_roofline']:.0%} of the "
              f"filled-KV roofline", flush=True)
    if "step" not in args.skip:
        for length in args.step_lengths:
            r = bench_step(args, length, peak)
            results.append(r)
            ph = r["phases_s"]
            print(f"topd step at {r['length']} tokens x {r['rows']} rows: {r['tokens_per_s']:,.0f} tok/s "
                  f"(median {r['step_s']['median']:.2f} s; sampling {ph['sampling']:.2f}, scoring "
                  f"{ph['scoring']:.2f}, update {ph['update']:.2f}; first step {r['first_step_s']:.1f} s); "
                  f"MFU update {r['mfu_update']:.1%}, step without sampling {r['mfu_step_without_sampling']:.1%}",
                  flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
