"""Forward throughput (tokens/s): topd_jax Qwen vs transformers' PyTorch model, same weights.

    python bench/bench_model_forward.py                       # WORKLOADS.md student, B=8, T=256, CPU
    python bench/bench_model_forward.py --model teacher --batch 4
    python bench/bench_model_forward.py --preset qwen3-1.7b --backward --no-torch --dtype bfloat16 \
        --peak-tflops 989      # on one GPU: random weights, forward+backward, model-FLOPs utilisation

Protocol (bench/WORKLOADS.md): one untimed warm-up (JAX compile, reported separately), then
--reps timed repetitions in the same process; median/min/max; JAX results block_until_ready;
torch.set_num_threads(2). Both sides compute full-vocabulary float32 logits [B, T, V].
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
from flax import nnx  # noqa: E402

from topd_jax.models import ModelConfig, init_model, load_pretrained  # noqa: E402

WORKLOAD_MODELS = {  # bench/WORKLOADS.md: (preset, torch seed)
    "student": ("tiny-student", 0),
    "teacher": ("tiny-teacher", 1),
}


def report(name: str, tokens: int, warm: float, times: list[float]) -> None:
    med = statistics.median(times)
    print(f"{name:28s} {tokens / med:10.0f} tok/s   median {med:.3f} s  min {min(times):.3f}  "
          f"max {max(times):.3f}  (warm-up incl. compile {warm:.2f} s)")


def build_torch_and_ours(cfg: ModelConfig, seed: int, dtype: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         intermediate_size=cfg.intermediate_size, tie_word_embeddings=cfg.tie_word_embeddings,
                         rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.rms_norm_eps)
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, dtype=dtype)
    return hf, ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(WORKLOAD_MODELS), default="student")
    p.add_argument("--preset", default=None, help="random-weight preset instead of a WORKLOADS model (no torch)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--backward", action="store_true", help="also time forward+backward (ours)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for model-FLOPs utilisation")
    args = p.parse_args()

    tokens = args.batch * args.seq
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load avg {os.getloadavg()}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    hf = None
    if args.preset:
        cfg = ModelConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, remat=args.remat)
        model = init_model(cfg)
    else:
        preset, seed = WORKLOAD_MODELS[args.model]
        cfg = ModelConfig.preset(preset)
        hf, model = build_torch_and_ours(cfg, seed, args.dtype)
        cfg = model.config
    print(f"model: {args.preset or args.model} ({cfg.num_params() / 1e6:.1f}M params), batch {args.batch} x "
          f"seq {args.seq}, dtype {args.dtype}, logits [B, T, {cfg.vocab_size}] float32")

    rng = np.random.default_rng(1)
    ids_np = rng.integers(0, min(cfg.vocab_size, 151643), (args.batch, args.seq))
    ids = jnp.asarray(ids_np, jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, ids, mask):
        return nnx.merge(graphdef, params, rest)(ids, attention_mask=mask)

    warm, times = timed(lambda: forward(params, ids, mask).block_until_ready(), args.reps)
    report("topd_jax forward (jit)", tokens, warm, times)
    fwd_time = statistics.median(times)

    if args.backward:
        @jax.jit
        def train_step(params, ids, mask):
            def loss(params):
                logits = nnx.merge(graphdef, params, rest)(ids, attention_mask=mask)
                return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

            return jax.value_and_grad(loss)(params)

        warm_b, times_b = timed(lambda: jax.block_until_ready(train_step(params, ids, mask)), args.reps)
        report("topd_jax forward+backward", tokens, warm_b, times_b)
        if args.peak_tflops:
            # 6 N per token for the weight matmuls (fwd 2N + bwd 4N; an untied embedding table is a
            # lookup, not a matmul) + causal attention 6 L T n_heads head_dim per token (fwd+bwd)
            n = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
            flops = tokens * (6 * n + 6 * cfg.num_layers * args.seq * cfg.num_heads * cfg.head_dim)
            mfu = flops / statistics.median(times_b) / (args.peak_tflops * 1e12)
            print(f"model-FLOPs utilisation (fwd+bwd): {100 * mfu:.1f} % of {args.peak_tflops} TFLOP/s")

    if hf is not None and not args.no_torch:
        import torch

        torch.set_num_threads(2)
        ids_t = torch.tensor(ids_np)
        mask_t = torch.ones_like(ids_t)
        out = {}

        def run_torch():
            with torch.no_grad():
                out["logits"] = hf(input_ids=ids_t, attention_mask=mask_t).logits

        warm_t, times_t = timed(run_torch, args.reps)
        report("transformers (torch, 2 thr)", tokens, warm_t, times_t)
        diff = np.abs(np.asarray(forward(params, ids, mask)) - out["logits"].float().numpy()).max()
        print(f"speed ratio ours/torch: {statistics.median(times_t) / fwd_time:.2f}x   max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    main()
