"""W2 (bench/WORKLOADS.md): one on-policy distillation iteration, topd_jax vs TRL, and TOPD/OPD.

    python bench/bench_opd_step.py                 # ours (OPD, TOPD at K=50) then TRL, one run
    python bench/bench_opd_step.py --no-trl        # ours only
    python bench/bench_opd_step.py --no-ours       # TRL only (raw per-step times printed)
    python bench/bench_opd_step.py --reps 5        # more timed repetitions
    python bench/bench_opd_step.py --no-trl --set topd.reuse_student_suffix=true   # a TOPD option

Protocol: student (42.0M) and teacher (96.7M) random Qwen3 models built by transformers after
torch.manual_seed(0) / (1), saved to a temp dir and loaded by both sides; 8 prompts of exactly
37 tokens (the first 37 tokens of problems from ../shared/data, real Qwen tokenizer); 1
completion per prompt, exactly 128 new tokens (no eos stop), temperature 1.0; full-vocabulary
reverse KL on the completion tokens; AdamW lr 1e-5; one optimizer step per iteration. One
untimed warm-up iteration (JAX: compile included, reported separately), then --reps timed
iterations in the same process; median / min / max. torch.set_num_threads(2).

TRL side: ``trl.DistillationTrainer`` (fully on-policy, beta=1.0 = reverse KL, transformers
generate), run in a separate venv this script creates (``--trl-venv``, default
/tmp/topd_trl_venv) with ``pip install trl torch==2.13.0`` from the local package indexes.
If that install fails, the TRL column says so and ours is reported alone.

TOPD/OPD: the same iteration with ``algorithm=topd`` at the paper's K=50 (C=3 candidates,
OT detector, guidance on) over the same rollouts length; ratio of median step times.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=768)
TEACHER = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=1536)
COMMON = dict(vocab_size=151936, head_dim=64, tie_word_embeddings=True, rope_theta=1e6,
              max_position_embeddings=4096, rms_norm_eps=1e-6)
PROMPTS, PROMPT_LEN, NEW_TOKENS, LR = 8, 37, 128, 1e-5


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ---------------------------------------------------------------- shared inputs (main venv)
def prepare(work: Path) -> None:
    """Models, tokenizer and prompts under ``work`` (reused when already there)."""
    if (work / "prompts.json").is_file():
        return
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from topd_jax.data.jsonl import read_math_jsonl
    from topd_jax.data.tokenizer import build_qwen_tokenizer

    for name, sizes, seed in (("student", STUDENT, 0), ("teacher", TEACHER, 1)):
        torch.manual_seed(seed)
        Qwen3ForCausalLM(Qwen3Config(**COMMON, **sizes)).save_pretrained(work / name)
    tok_dir = work / "tokenizer"
    tok = build_qwen_tokenizer(tok_dir)
    texts, ids = [], []
    for f in sorted((ROOT.parent / "shared" / "data").glob("*.jsonl")):
        for rec in read_math_jsonl(f):
            head = tok.decode(tok(rec.problem)["input_ids"][:PROMPT_LEN])
            row = tok(head)["input_ids"]
            if len(row) == PROMPT_LEN:  # keep prompts whose text round-trips to 37 tokens
                texts.append(head), ids.append(row)
            if len(texts) == PROMPTS:
                break
        if len(texts) == PROMPTS:
            break
    if len(texts) < PROMPTS:
        raise RuntimeError(f"found only {len(texts)} prompts of {PROMPT_LEN} tokens in ../shared/data")
    (work / "prompts.json").write_text(json.dumps({"texts": texts, "ids": ids,
                                                   "tokenizer": str(tok_dir)}))


# ---------------------------------------------------------------- ours
def run_ours(work: Path, reps: int, algorithm: str, extra: list[str]) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from topd_jax.algorithms import Frozen, LossSpec, make_loss_fn, prepare_batch
    from topd_jax.algorithms.objective import add_normalizers
    from topd_jax.checkpoints import load_pretrained
    from topd_jax.sharding import MeshConfig, make_mesh
    from topd_jax.config.loader import load_config
    from topd_jax.train.optim import lr_schedule, make_optimizer
    from topd_jax.train.state import create_train_state
    from topd_jax.train.step import TrainStep

    prompts = json.loads((work / "prompts.json").read_text())
    cfg = load_config(None, [
        f"algorithm={algorithm}", f"student.path={work / 'student'}", f"teacher.path={work / 'teacher'}",
        "data.source=synthetic", "data.template=plain", f"data.prompts_per_step={PROMPTS}",
        f"data.max_prompt_len={PROMPT_LEN}", "rollout.n=1", "rollout.temperature=1.0",
        f"rollout.max_new_tokens={NEW_TOKENS}", f"optim.lr={LR}", "optim.min_lr=0",
        "optim.warmup_fraction=0", "optim.b2=0.999", "optim.clip_norm=null", f"steps={reps + 1}",
        "topd.window=50", "topd.num_candidates=3", "topd.min_separation=8", *extra])
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    student, teacher = load_pretrained(work / "student"), load_pretrained(work / "teacher")
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optim, cfg.steps)
        graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0)
        seq_len = PROMPT_LEN + NEW_TOKENS
        spec = LossSpec.from_config(cfg, seq_len)
        # as train.loop builds it: TOPD's single term needs the global counts (add_normalizers)
        step_fn = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(cfg.optim, cfg.steps), shardings,
                            mesh, normalize=functools.partial(add_normalizers, spec))
        # eos_ids=(): no stop token, so every rollout has exactly NEW_TOKENS tokens
        frozen = Frozen(teacher, teacher.lm_head_weight(), (), 151643)
        batch_prompts = {"prompt_ids": np.asarray(prompts["ids"], np.int32),
                         "prompt_mask": np.ones((PROMPTS, PROMPT_LEN), bool)}
        times, phases = [], []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            model = nnx.merge(graphdef, state.params)
            batch, _, gen = prepare_batch(cfg, model, batch_prompts, jax.random.key(i), frozen, timings)
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            state, out = step_fn(state, batch, frozen.teacher_head)
            jax.block_until_ready((state, out))
            times.append(time.perf_counter() - t0)
            # sampling = rollouts + detector continuations; scoring = teacher forwards, ℓ_t, OT
            phases.append({"sampling": timings.get("sampling", 0.0), "scoring": timings.get("scoring", 0.0),
                           "prepare_other": t1 - t0 - timings.get("sampling", 0.0) - timings.get("scoring", 0.0),
                           "update": times[-1] - (t1 - t0)})
            assert int(np.asarray(gen.lengths).min()) == NEW_TOKENS
    first, timed = times[0], times[1:]
    med = statistics.median(timed)
    return {"side": f"topd_jax {algorithm}", "step_s": stats(timed), "seq_per_s": PROMPTS / med,
            "generation_s": statistics.median(p["sampling"] for p in phases[1:]), "first_step_s": first,
            "compile_s": first - med, "raw_step_s": times,
            "phases_s": {k: statistics.median(p[k] for p in phases[1:]) for k in phases[0]}}


# ---------------------------------------------------------------- TRL (its own venv)
TRL_WORKER = r'''
import json, statistics, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DistillationConfig, DistillationTrainer
work, reps = Path(sys.argv[1]), int(sys.argv[2])
p = json.loads((work / "prompts.json").read_text())
tok = AutoTokenizer.from_pretrained(p["tokenizer"], padding_side="left")
tok.pad_token = tok.pad_token or "<|endoftext|>"
student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
args = DistillationConfig(
    output_dir=str(work / "trl_out"), per_device_train_batch_size=len(p["texts"]),
    gradient_accumulation_steps=1, learning_rate=%(lr)r, lr_scheduler_type="constant",
    warmup_steps=0, max_steps=reps + 1, beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
    max_completion_length=%(new)d, generation_kwargs={"min_new_tokens": %(new)d},
    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
    max_grad_norm=1e9, shuffle_dataset=False, dataloader_num_workers=0, seed=0)
ds = Dataset.from_dict({"prompt": p["texts"] * (reps + 1)})
trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                              processing_class=tok)
gen_t = []
orig = trainer._generate
def timed_generate(*a, **k):
    t0 = time.perf_counter(); out = orig(*a, **k); gen_t.append(time.perf_counter() - t0); return out
trainer._generate = timed_generate
step_t, t0 = [], [0.0]
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): t0[0] = time.perf_counter()
    def on_step_end(self, *a, **k): step_t.append(time.perf_counter() - t0[0])
trainer.add_callback(Timer())
trainer.train()
print("RESULT " + json.dumps({"step_t": step_t, "gen_t": gen_t}))
'''


def setup_trl_venv(venv: Path) -> str | None:
    """Create the TRL venv if needed; None when ready, else why not."""
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import trl, torch"], capture_output=True).returncode == 0:
        return None
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "trl", "-d", "/tmp/trl_probe"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"trl is not on the local package indexes: {probe.stderr.strip()[-300:]}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch pinned to the local CPU wheel: a bare `torch` would pull a multi-GB CUDA build
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "trl", "torch==2.13.0", "transformers==5.24.0"],
                          capture_output=True, text=True)
    if inst.returncode:
        return f"pip install trl failed: {inst.stderr.strip()[-500:]}"
    return None


def run_trl(work: Path, reps: int, venv: Path) -> dict:
    why = setup_trl_venv(venv)
    if why is not None:
        return {"side": "TRL DistillationTrainer", "error": why}
    code = TRL_WORKER % {"lr": LR, "new": NEW_TOKENS}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code, str(work), str(reps)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"side": "TRL DistillationTrainer", "error": proc.stderr.strip()[-1500:]}
    r = json.loads(lines[-1][7:])
    timed, gen = r["step_t"][1:], r["gen_t"][1:]
    med = statistics.median(timed)
    return {"side": "TRL DistillationTrainer", "step_s": stats(timed), "seq_per_s": PROMPTS / med,
            "generation_s": statistics.median(gen) if gen else None, "first_step_s": r["step_t"][0],
            "raw_step_s": r["step_t"], "raw_generation_s": r["gen_t"],
            "trl_version": subprocess.run([str(venv / "bin" / "python"), "-c", "import trl;print(trl.__version__)"],
                                          capture_output=True, text=True).stdout.strip()}


def main() -> None:
    global NEW_TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                    help="completion length (W2: 128; longer rollouts approach the paper's regime, "
                         "where K = 50 is a small share of the rollout)")
    ap.add_argument("--work", default="/tmp/topd_w2")
    ap.add_argument("--trl-venv", default="/tmp/topd_trl_venv")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-topd", action="store_true")
    ap.add_argument("--no-opd", action="store_true", help="our TOPD side only (e.g. a second TOPD setting)")
    ap.add_argument("--no-ours", action="store_true", help="TRL side only")
    ap.add_argument("--worker", choices=["opd", "topd"], help=argparse.SUPPRESS)
    ap.add_argument("--common", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both OPD and TOPD, e.g. --common loss.vocab_chunk=128 "
                         "(needed from ~512 new tokens: whole [8, T, 151936] logits exhaust 24 GiB)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for our TOPD run, e.g. --set topd.reuse_student_suffix=true")
    args = ap.parse_args()
    work = Path(args.work)
    sys.path.insert(0, str(ROOT))
    NEW_TOKENS = args.new_tokens
    if args.worker:  # one algorithm per fresh process: no compile cache or memory shared
        print("RESULT " + json.dumps(run_ours(work, args.reps, args.worker, args.set)), flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    results = []
    for algo in ([] if args.no_ours else ([] if args.no_opd else ["opd"]) + ([] if args.no_topd else ["topd"])):
        extra = [f"--set={kv}" for kv in args.common + (args.set if algo == "topd" else [])]
        proc = subprocess.run([sys.executable, __file__, "--worker", algo, "--reps", str(args.reps),
                               "--work", str(work), "--new-tokens", str(NEW_TOKENS), *extra],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else
                       {"side": f"topd_jax {algo}", "error": proc.stderr.strip()[-1500:]})
        print(json.dumps(results[-1]), flush=True)
    if not args.no_trl:
        results.append(run_trl(work, args.reps, Path(args.trl_venv)))
        print(json.dumps(results[-1]), flush=True)
    load = os.getloadavg()
    print(f"\nW2 with {NEW_TOKENS} new tokens, {os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end")
    if args.common:
        print(f"overrides (both): {' '.join(args.common)}")
    if args.set:
        print(f"TOPD overrides: {' '.join(args.set)}")
    print("| side | s/step median (min-max) | seq/s | generation s | first step s |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['side']} | failed: {r['error'][-200:]!r} | | | |")
            continue
        s = r["step_s"]
        print(f"| {r['side']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {r['seq_per_s']:.3f} | "
              f"{r['generation_s']:.2f} | {r['first_step_s']:.1f} |")
    for r in results:
        if "phases_s" in r:
            print(f"{r['side']} phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items()))
    ok = {r["side"]: r for r in results if "error" not in r}
    if "topd_jax opd" in ok and "topd_jax topd" in ok:
        print(f"TOPD/OPD step time at K=50: "
              f"{ok['topd_jax topd']['step_s']['median'] / ok['topd_jax opd']['step_s']['median']:.2f}x")
    if "topd_jax opd" in ok and "TRL DistillationTrainer" in ok:
        print(f"ours/TRL sequences per second: "
              f"{ok['topd_jax opd']['seq_per_s'] / ok['TRL DistillationTrainer']['seq_per_s']:.2f}x")


if __name__ == "__main__":
    main()
