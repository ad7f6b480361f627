"""A fair comparison of OPD and TOPD (issue 13 §4, TOPD_REVIEW §4.6-4.7), several seeds per arm.

    python bench/compare_opd_topd.py                           # 6 arms x seeds 0,1,2, labelled task
    python bench/compare_opd_topd.py --arms opd topd --seeds 0 --steps 20   # quick look
    python bench/compare_opd_topd.py --task synthetic          # the plain demo task
    python bench/compare_opd_topd.py topd.window=8             # any config override

Arms (``--arms``; every arm shares the teacher, the student, the seed's prompt order and its
step-0 rollouts):

==============  ========================================================  ===================
key             overrides                                                 name in the tables
==============  ========================================================  ===================
opd             ``algorithm=opd``                                         OPD
opd_sup         ``algorithm=opd topd.suppression=false_alarms``           OPD+suppress-low
opd_high        ``algorithm=opd topd.suppression=high_divergence``        OPD+suppress-high
topd            ``algorithm=topd``                                        TOPD
topd_k1         ``algorithm=topd topd.guidance_window=1``                 TOPD-K1
topd_oracle     ``algorithm=topd topd.detector=oracle``                   TOPD-oracle
opd_wall        OPD for as many steps as fit in TOPD's step time          OPD @ TOPD wall
==============  ========================================================  ===================

``opd_wall`` (needs ``opd`` and ``topd``, run after them per seed): OPD with
``steps = round(steps x median TOPD step time / median OPD step time)`` of the same seed, its
own cosine schedule over those steps (what a user with TOPD's steady-state time budget would
run). Step time is the trainer's ``time_step`` (sampling + scoring + detector + update, without
the label metrics or evaluation); the median leaves out the first step's compilation, which
the "train wall" column (the whole ``train`` call) includes. Both arms are measured in the same
process minutes apart, so a steady machine load hits them alike (a changing one does not: the
load average is printed).

Task: ``--task labelled`` (default; ``topd_jax/configs/labelled.yaml``, the gated models of
``demos.labelled_demo``, which the bench refuses when they fail the recipe's gates unless
``--allow-ungated``) or ``--task synthetic`` (``configs/demo.yaml``, no gates).

Evaluation (by the bench, on the final student of every run and once on the initial student,
which is the same for every seed): ``--eval-prompts`` held-out problems (default 512, disjoint
from training: ``synthetic.make_splits``), **pass@1 at T = 0.6 with ``--eval-samples`` (4)
samples per prompt** (primary) and greedy accuracy, per prompt; one fixed evaluation key
(``--eval-seed``) for every arm and seed, so arms see the same sampling noise. From the
labeller of the sampled completions: slip rate (completions with a wrong value) and the share
of those that still end correct (repaired).

Statistics: per arm, per-seed values and mean ± sd; Δ against OPD: the mean over seeds of the
per-prompt accuracy differences, with a 95 % bootstrap CI over (seed × prompt) resamples
(``topd_jax.eval.compare.paired_bootstrap_ci``, 2000 resamples, NumPy seed 0), then the
per-seed Δ in parentheses. A difference counts only if the CI excludes 0: ``*`` when it does
and every seed agrees in sign, ``(*)`` when it does but the seeds disagree (the CI resamples
prompts, not training runs, so it is blind to seed-to-seed training variance; read ``(*)`` as
not resolved). Training logs the two loss terms'
gradient norms (``logging.grad_norms_by_term=true``; their extra backward passes are part of
``time_step`` for every arm alike) and the per-step label metrics (``train.labels``), reported
as means over training. A hash of each run's step-0 rollouts (prompt and completion ids) is
printed per seed: equal hashes across arms verify the paired random numbers.

Output: markdown tables on stdout and ``<out>/compare.json`` (every run's per-prompt results,
history, config and the machine), rewritten after every run.

Budget (2-core CPU, shared): the defaults -- 200 steps x 8 prompts x 4 rollouts (the settings of
topd_jax/configs/labelled.yaml), 512 eval prompts x 4 samples + greedy -- were chosen from a
single-run measurement (step time OPD 0.065 s, OPD + detector 0.09 s, TOPD 0.14 s, TOPD-oracle
0.2 s; first-step compilation 10-30 s per process, later arms reuse most of it; an evaluation
1-2 s, 17 s with its first compilation). Measured: the whole default comparison (6 arms + OPD @
TOPD wall x 3 seeds) took 12.2 min with the models cached, CPU-2 shared with other agents
(load average 2-5); BUILD_NOTES has its table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from topd_jax.config.loader import load_config, to_dict  # noqa: E402
from topd_jax.data.tasks import run_task  # noqa: E402
from topd_jax.eval.compare import comparison_table, label_table, paired_deltas  # noqa: E402
from topd_jax.eval.generation import generate_in_batches  # noqa: E402
from topd_jax.sharding.hosts import fetch  # noqa: E402
from topd_jax.train import loop  # noqa: E402
from topd_jax.train.setup import load_model, plan_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_YAML = {"labelled": ROOT / "topd_jax" / "configs" / "labelled.yaml", "synthetic": ROOT / "configs" / "demo.yaml"}
if not TASK_YAML["labelled"].is_file() and (ROOT / "configs" / "labelled.yaml").is_file():
    TASK_YAML["labelled"] = ROOT / "configs" / "labelled.yaml"
# Until topd_jax/configs/labelled.yaml exists: the demo config on the labelled task (review §4.6 sizes).
LABELLED_FALLBACK = ["data.source=labelled", "rollout.max_new_tokens=40", "eval.max_new_tokens=40",
                     "topd.window=12", "topd.num_candidates=3", "topd.min_separation=3"]
ARMS = {
    "opd": ("OPD", ["algorithm=opd", "topd.suppression=none"]),
    "opd_sup": ("OPD+suppress-low", ["algorithm=opd", "topd.suppression=false_alarms"]),
    "opd_high": ("OPD+suppress-high", ["algorithm=opd", "topd.suppression=high_divergence"]),
    "topd": ("TOPD", ["algorithm=topd"]),
    "topd_k1": ("TOPD-K1", ["algorithm=topd", "topd.guidance_window=1"]),
    "topd_oracle": ("TOPD-oracle", ["algorithm=topd", "topd.detector=oracle"]),
    "opd_wall": ("OPD @ TOPD wall", ["algorithm=opd", "topd.suppression=none"]),
}
BASELINE = "OPD"
RUN_FIXED = ["checkpoint.resume=false", f"checkpoint.every={10**6}", "checkpoint.keep=1", "checkpoint.async_save=false",
             "checkpoint.export_hf=false", "logging.stdout=false", "logging.tensorboard=false",
             "logging.progress_bar=false", "logging.grad_norms_by_term=true", "logging.label_metrics=true",
             "eval.at_start=false", "eval.at_end=false", "eval.every=0"]


# ---------------------------------------------------------------- models
def _checkpoint_vocab(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def prepare_models(task: str, base_cfg) -> tuple[str, str]:
    """``(student_dir, teacher_dir)`` of the task, trained and cached if missing."""
    if task == "labelled":
        from topd_jax.demos.labelled_demo import prepare_labelled_models
        return prepare_labelled_models(base_cfg, progress=False, log=print)
    from topd_jax.demos.demo import prepare_demo_models
    return prepare_demo_models(base_cfg, progress=False, log=print)


def gate_report(task: str, base_cfg, student_dir: str, teacher_dir: str) -> dict:
    """``{"passed": bool | None, "failed": [...], "gates": {...}}``: the labelled recipe's gates
    (``demos.labelled_demo.check_gates``, thresholds ``cfg.labelled``) of the two models;
    ``passed`` None: the task has none."""
    if task != "labelled":
        return {"passed": None, "failed": [], "gates": "the plain synthetic task has no recipe gates"}
    from topd_jax.demos.demo import read_meta
    from topd_jax.demos.labelled_demo import check_gates
    t_meta, s_meta = read_meta(teacher_dir), read_meta(student_dir)
    failed = check_gates(base_cfg, t_meta, s_meta)
    return {"passed": not failed, "failed": failed,
            "gates": {"teacher": (t_meta or {}).get("gates"), "student": (s_meta or {}).get("gates")}}


# ---------------------------------------------------------------- runs
class FirstRollouts:
    """Wraps ``train.loop.prepare_batch``: a hash of the first step's rollout rows (prompt and
    completion ids), to verify that arms with one seed draw the same step-0 rollouts."""

    def __init__(self, fn):
        self.fn, self.digest = fn, None

    def __call__(self, cfg, model, prompts, key, frozen, timings):
        out = self.fn(cfg, model, prompts, key, frozen, timings)
        if self.digest is None:
            ids = np.asarray(fetch(out[2].sequences))
            self.digest = hashlib.sha256(ids.tobytes() + str(ids.shape).encode()).hexdigest()[:12]
        return out


def _history_mean(history: list[dict], key: str) -> float | None:
    v = [r[key] for r in history if key in r and math.isfinite(r[key])]
    return float(np.mean(v)) if v else None


def _first_last(history: list[dict], key: str, share: float = 0.1) -> list[float | None]:
    """Means of ``key`` over the first and the last ``share`` of the steps (at least one each)."""
    k = max(1, round(share * len(history)))
    return [_history_mean(history[:k], key), _history_mean(history[-k:], key)]


def run_arm(arm: str, seed: int, *, task_yaml, task_overrides: list[str], user_overrides: list[str], steps: int,
            out: Path, dirs: tuple[str, str], vocab: dict[str, int]) -> tuple[dict, object, object]:
    """Train one arm for one seed. Returns ``(row, final student, plan)``."""
    name, arm_overrides = ARMS[arm]
    run_dir = out / f"{arm}-seed{seed}"
    cfg = load_config(task_yaml, task_overrides + [f"{r}.vocab_size={v}" for r, v in vocab.items()] + user_overrides
                      + arm_overrides + RUN_FIXED + [f"seed={seed}", f"steps={steps}", f"output_dir={run_dir}"])
    plan = plan_run(cfg, *dirs)
    spy = FirstRollouts(loop.prepare_batch)
    t0 = time.perf_counter()
    with mock.patch.object(loop, "prepare_batch", spy):
        result = loop.train(cfg, plan=plan)
    wall = time.perf_counter() - t0
    if result.preempted:  # SIGTERM: the trainer saved and returned; stop the comparison too
        sys.exit(f"preempted during {name} seed {seed}; the finished runs are in {out / 'compare.json'}")
    h = result.history
    step_times = [r["time_step"] for r in h]
    row = {"arm": name, "key": arm, "seed": seed, "steps": len(h), "train_s": wall,
           "step_s": statistics.median(step_times), "step_total_s": float(np.sum(step_times)),
           "steady_s": len(h) * statistics.median(step_times),  # steps x median step: no compilation
           "label_metrics_s": float(sum(r.get("time_label_metrics", 0.0) for r in h)),
           "rollouts0": spy.digest,
           "guided_per_rollout": _history_mean(h, "guided_points_per_rollout"),
           "grad_norm_opd": _history_mean(h, "grad_norm_opd"), "grad_norm_traj": _history_mean(h, "grad_norm_traj"),
           "grad_norm": _history_mean(h, "grad_norm"),
           "labels": {k: _history_mean(h, k) for k in sorted({k for r in h for k in r if k.startswith("label_")})},
           "labels_first_last": {k: _first_last(h, k) for k in ("label_true_surface_share", "label_auroc")},
           "config": to_dict(cfg),
           "history": [{k: (v if math.isfinite(v) else None) for k, v in r.items()} for r in h]}
    return row, result.model, plan


# ---------------------------------------------------------------- evaluation
def evaluate(model, plan, examples, *, key, temperature: float, samples: int, batch_size: int) -> dict:
    """Per-prompt results of ``samples`` completions per held-out prompt: ``acc [P]`` (share
    correct), and from the task's labeller ``slipped``, ``slipped_correct`` (counts over all
    completions)."""
    cfg, text = plan.cfg, plan.text
    labeller = run_task(cfg).labeller
    n_prompts = len(examples)
    correct = np.zeros((n_prompts, samples), bool)
    slipped = slipped_correct = 0
    with jax.set_mesh(plan.mesh):
        for batch in generate_in_batches(model, [ex.ids for ex in examples], batch_size=batch_size,
                                         key_for=lambda start, index: jax.random.fold_in(key, start),
                                         max_new_tokens=cfg.eval.max_new_tokens, eos_ids=text.eos_ids,
                                         pad_id=text.pad_id, temperature=temperature, num_samples=samples,
                                         length=cfg.data.max_prompt_len):
            rows = [batch.index[r // samples] for r in range(len(batch.tokens))]
            ok = [bool(text.verify(text.decode(tok[:n].tolist()), examples[p].answer))
                  for p, tok, n in zip(rows, batch.tokens, batch.lengths)]
            for r, (p, right) in enumerate(zip(rows, ok)):
                correct[p, r % samples] = right
            if labeller is not None:
                cmask = np.arange(batch.tokens.shape[1])[None, :] < np.asarray(batch.lengths)[:, None]
                lab = labeller([examples[p].problem for p in rows], np.asarray(batch.tokens), cmask)
                slip = lab["slipped"].any(axis=1)
                slipped += int(slip.sum())
                slipped_correct += int((slip & np.asarray(ok)).sum())
    return {"acc": correct.mean(axis=1).tolist(), "slipped": slipped, "slipped_correct": slipped_correct,
            "completions": int(correct.size)}


def evaluate_both(model, plan, examples, args) -> dict:
    key = jax.random.key(args.eval_seed)
    t0 = time.perf_counter()
    sampled = evaluate(model, plan, examples, key=key, temperature=args.eval_temperature, samples=args.eval_samples,
                       batch_size=args.eval_batch)
    greedy = evaluate(model, plan, examples, key=key, temperature=0.0, samples=1, batch_size=args.eval_batch)
    return {"pass1": sampled["acc"], "greedy": greedy["acc"], "eval_s": time.perf_counter() - t0,
            "slip_rate": sampled["slipped"] / sampled["completions"],
            "slip_repaired": sampled["slipped_correct"] / sampled["slipped"] if sampled["slipped"] else None}


# ---------------------------------------------------------------- report
def machine() -> dict:
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "devices": str(jax.devices()),
            "loadavg": list(os.getloadavg()), "utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def extra_table(runs: list[dict], arms: list[str]) -> str:
    """Slips in the sampled evaluation, timing, and the step-0 rollout hashes per arm."""
    lines = ["| arm | slip rate (%) | slipped but correct (%) | true surface share, first → last 10 % of steps (%) | "
             "AUROC, first → last 10 % | steps x median step (s) | label-metric time (s) | "
             "step-0 rollout hash per seed |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        rep = [r["slip_repaired"] for r in rs if r["slip_repaired"] is not None]
        fl = {}
        for k, scale, fmt in (("label_true_surface_share", 100, ".1f"), ("label_auroc", 1, ".3f")):
            ends = [[r["labels_first_last"][k][i] for r in rs if r["labels_first_last"][k][i] is not None]
                    for i in (0, 1)]
            fl[k] = (f"{scale * np.mean(ends[0]):{fmt}} → {scale * np.mean(ends[1]):{fmt}}"
                     if ends[0] and ends[1] else "n/a")
        cells = [f"{100 * np.mean([r['slip_rate'] for r in rs]):.1f}", f"{100 * np.mean(rep):.1f}" if rep else "n/a",
                 fl["label_true_surface_share"], fl["label_auroc"],
                 f"{np.mean([r['steady_s'] for r in rs]):.0f}", f"{np.mean([r['label_metrics_s'] for r in rs]):.0f}",
                 " ".join(f"s{r['seed']}:{r['rollouts0']}" for r in rs)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(runs: list[dict], before: dict | None, meta: dict) -> str:
    names = [ARMS[a][0] for a in ARMS if any(r["key"] == a for r in runs)]
    parts = [comparison_table(runs, baseline=BASELINE, arms=names, before=before), "",
             "Label metrics (means over training steps, then over seeds; % except AUROC):", "",
             label_table(runs, arms=names), "", extra_table(runs, names)]
    digests = {}
    for r in runs:
        if r["key"] != "opd_wall":
            digests.setdefault(r["seed"], set()).add(r["rollouts0"])
    paired = all(len(v) == 1 for v in digests.values())
    parts += ["", f"paired step-0 rollouts across arms: {'yes' if paired else 'NO'} "
              f"({', '.join(f'seed {s}: {len(v)} distinct' for s, v in sorted(digests.items()))})"]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["labelled", "synthetic"], default="labelled")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-prompts", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--eval-temperature", type=float, default=0.6)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=128, help="prompts per generation batch (fixed: same noise)")
    ap.add_argument("--allow-ungated", action="store_true", help="run on models that fail the recipe's gates")
    ap.add_argument("--out", default="/tmp/compare_opd_topd")
    ap.add_argument("--from-json", default=None, help="print the tables of an existing compare.json, run nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(report(saved["runs"], saved["before"], saved["meta"]))
        return
    if "opd_wall" in args.arms and not {"opd", "topd"} <= set(args.arms):
        ap.error("--arms opd_wall needs the opd and topd arms (it runs for TOPD's step time at OPD's step cost)")
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task_yaml = TASK_YAML[args.task]
    task_overrides = []
    if args.task == "labelled" and not task_yaml.is_file():
        print(f"{task_yaml} not found: the demo config with {' '.join(LABELLED_FALLBACK)}", flush=True)
        task_yaml, task_overrides = TASK_YAML["synthetic"], list(LABELLED_FALLBACK)
    base = load_config(task_yaml, task_overrides + list(args.overrides))
    dirs = prepare_models(args.task, base)
    gates = gate_report(args.task, base, *dirs)
    failed = "; ".join(f"{f['gate']}={f['value']} (target {f['target']})" for f in gates["failed"])
    verdict = {None: "no gates", True: "all gates pass", False: f"gates FAIL: {failed}"}[gates["passed"]]
    print(f"models: student {dirs[0]}, teacher {dirs[1]}; {verdict}", flush=True)
    if gates["passed"] is False and not args.allow_ungated:
        sys.exit(f"refusing to compare on models that fail the labelled recipe's gates ({failed}); retrain "
                 f"them (demos.labelled_demo) or pass --allow-ungated")
    # The prepared checkpoints' vocabulary (the labelled models pad to 144 ids) for the run specs.
    vocab = {"student": _checkpoint_vocab(dirs[0]), "teacher": _checkpoint_vocab(dirs[1])}
    common = dict(task_yaml=task_yaml, task_overrides=task_overrides, user_overrides=list(args.overrides),
                  out=out, dirs=dirs, vocab=vocab)
    meta = {"command": " ".join([sys.executable, *sys.argv]), "args": vars(args), "models": dirs, "gates": gates,
            "machine_start": machine()}
    runs: list[dict] = []
    before = None
    eval_examples = None

    def save() -> None:
        (out / "compare.json").write_text(json.dumps({"meta": meta, "before": before, "runs": runs}, indent=1))

    for seed in args.seeds:
        for arm in [a for a in ARMS if a in args.arms]:
            steps = args.steps
            if arm == "opd_wall":
                mine = {r["key"]: r for r in runs if r["seed"] == seed}
                steps = max(1, round(args.steps * mine["topd"]["step_s"] / mine["opd"]["step_s"]))
            row, model, plan = run_arm(arm, seed, steps=steps, **common)
            if eval_examples is None:  # held-out problems of the eval split, --eval-prompts of them
                eval_cfg = load_config(task_yaml, task_overrides + list(args.overrides) + [
                    f"data.synthetic.num_eval={args.eval_prompts}", *(f"{r}.vocab_size={v}" for r, v in vocab.items())])
                eval_examples = plan_run(eval_cfg, *dirs).eval_examples[: args.eval_prompts]
                initial = load_model(plan.student, plan.mesh)
                before = evaluate_both(initial, plan, eval_examples, args)
                print(f"initial student: pass@1 {100 * np.mean(before['pass1']):.1f} %, greedy "
                      f"{100 * np.mean(before['greedy']):.1f} % on {len(eval_examples)} held-out problems "
                      f"({before['eval_s']:.0f} s)", flush=True)
            row.update(evaluate_both(model, plan, eval_examples, args))
            del model
            runs.append(row)
            save()
            print(f"[{row['arm']} seed {seed}] {row['steps']} steps, pass@1 {100 * np.mean(row['pass1']):.1f} %, "
                  f"greedy {100 * np.mean(row['greedy']):.1f} %, train {row['train_s']:.0f} s "
                  f"(step {row['step_s']:.3f} s), eval {row['eval_s']:.0f} s, rollouts0 {row['rollouts0']}, "
                  f"elapsed {time.perf_counter() - t_start:.0f} s", flush=True)
    meta["machine_end"] = machine()
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["deltas"] = {r: {m: paired_deltas(runs, r, BASELINE, m) for m in ("pass1", "greedy")}
                      for r in dict.fromkeys(x["arm"] for x in runs) if r != BASELINE}
    save()
    m0, m1 = meta["machine_start"], meta["machine_end"]
    print(f"\n{args.task} task, {args.steps} steps, seeds {args.seeds}, eval {len(eval_examples)} prompts x "
          f"{args.eval_samples} samples at T={args.eval_temperature} + greedy; {m0['processor']}, {m0['cpus']} CPUs, "
          f"load average {m0['loadavg'][0]:.1f} at the start, {m1['loadavg'][0]:.1f}/{m1['loadavg'][1]:.1f}/"
          f"{m1['loadavg'][2]:.1f} at the end; total {meta['elapsed_s'] / 60:.1f} min; models: {verdict}"
          f"{' (--allow-ungated)' if gates['passed'] is False else ''}\n")
    print(report(runs, before, meta))


if __name__ == "__main__":
    main()
