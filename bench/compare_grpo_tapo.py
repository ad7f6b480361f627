"""GRPO vs TAPO on the synthetic task from the same cold start, several seeds each.

    python bench/compare_grpo_tapo.py                         # 2 methods x seeds 0,1,2, tapo_demo config
    python bench/compare_grpo_tapo.py --seeds 0 --steps 20    # quick look
    python bench/compare_grpo_tapo.py steps=60 eval.every=20  # any config override

Every run starts from the same cached cold-start student of configs/tapo_demo.yaml
(``topd_jax.demos.rl_demo.prepare_cold_start``); only ``algorithm`` and ``seed`` change (the
seed drives rollout sampling, construction sampling and prompt order). Prints two markdown
tables: greedy accuracy on the held-out problems before -> after (per seed, mean ± sd) with
the final direct-solution / effective-reflection rates (``rl_demo.reflection_stats``; greedy
and sampled at the rollout temperature), and TAPO's construction statistics over training.
Results also go to ``<out>/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topd_jax.demos import rl_demo  # noqa: E402
from topd_jax.config.loader import load_config  # noqa: E402
from topd_jax.train.loop import train  # noqa: E402
from topd_jax.train.setup import plan_run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tapo_demo.yaml"
METHODS = ("grpo", "tapo")


def run_one(method: str, seed: int, overrides: list[str], out: Path, student_dir: str) -> dict:
    run_dir = out / f"{method}-seed{seed}"
    cfg = load_config(CONFIG, overrides + [
        f"algorithm={method}", f"seed={seed}", f"output_dir={run_dir}", "checkpoint.resume=false",
        f"checkpoint.every={10**6}", "checkpoint.export_hf=false", "logging.stdout=false",
        "logging.tensorboard=false"])
    t0 = time.perf_counter()
    result = train(cfg, plan=plan_run(cfg, student_dir))
    wall = time.perf_counter() - t0
    report = rl_demo.build_report(cfg, result, cold_start_meta=rl_demo.demo.read_meta(student_dir),
                                  final=rl_demo.final_stats(cfg, result.model))
    report["wall_s"] = wall
    print(f"[{method} seed {seed}] greedy accuracy {report['accuracy_before']:.3f} -> "
          f"{report['accuracy_after']:.3f}, {wall:.0f} s", flush=True)
    return report


def _ms(xs, pct: bool = True) -> str:
    """mean ± sd over the seeds with a value; "(k/n)" when only k of the n seeds have one."""
    n, xs = len(xs), [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    scale = 100.0 if pct else 1.0
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    out = f"{statistics.fmean(xs) * scale:.1f} ± {sd:.1f}" if pct else f"{statistics.fmean(xs):.2f} ± {sd:.2f}"
    return out if len(xs) == n else f"{out} ({len(xs)}/{n})"


def accuracy_table(rows: list[dict]) -> str:
    lines = ["| method | greedy acc. before (%) | after, per seed (%) | after mean ± sd (%) | "
             "sampled acc. after (%) | reflective, greedy / sampled (%) | direct-solution rate, "
             "greedy / sampled (%) | effective-reflection rate, greedy / sampled (%) | median step (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = [r for r in rows if r["algorithm"] == m]
        if not rs:
            continue
        g = [r["final"]["greedy"] for r in rs]
        s = [r["final"]["sampled"] for r in rs]

        def pair(key):
            return f"{_ms([x[key] for x in g])} / {_ms([x[key] for x in s])}"

        per_seed = " / ".join(f"{100 * r['accuracy_after']:.1f}" for r in rs)
        lines.append(
            f"| {m.upper()} | {_ms([r['accuracy_before'] for r in rs])} | "
            f"{per_seed} | {_ms([r['accuracy_after'] for r in rs])} | "
            f"{_ms([x['accuracy'] for x in s])} | {pair('reflective_fraction')} | {pair('direct_solution_rate')} | "
            f"{pair('effective_reflection_rate')} | "
            f"{statistics.median(r['median_step_seconds'] for r in rs):.2f} |")
    return "\n".join(lines)


def construction_table(rows: list[dict]) -> str:
    keys = [("dcs_pass_fraction", "DCS pass (%)", True), ("constructions_attempted", "attempted (total)", False),
            ("construction_parse_rate", "parsed (%)", True), ("construction_kept_rate", "kept (%)", True),
            ("construction_correct_rate", "kept and right (%)", True),
            ("prefix_match_len", "prefix match (tokens)", False), ("ots_weight", "OTS weight mean", False),
            ("ref_zero_variance_groups", "G_ref zero-variance (%)", True),
            ("reward_first", "reward first 10% (%)", True), ("reward_last", "reward last 10% (%)", True)]
    lines = ["| method | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in METHODS:
        rs = [r["training"] for r in rows if r["algorithm"] == m]
        if rs:
            lines.append(f"| {m.upper()} | " + " | ".join(_ms([r[k] for r in rs], pct) for k, _, pct in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="override steps (default: the config's)")
    ap.add_argument("--out", default="/tmp/compare_grpo_tapo")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    student_dir = rl_demo.prepare_cold_start(base)
    meta = rl_demo.demo.read_meta(student_dir)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            rows.append(run_one(method, seed, overrides, out, student_dir))
            (out / "compare.json").write_text(json.dumps(rows, indent=2))
    load = os.getloadavg()
    c = meta["construction"]["greedy"]
    print(f"\ncold start {student_dir}: greedy accuracy {100 * meta['greedy_accuracy']:.1f} %, sampled "
          f"{100 * meta['solve']['sampled']['accuracy']:.1f} %; constructions (greedy, held-out) parse "
          f"{100 * c['parse_rate']:.1f} %, kept {100 * c['kept_rate']:.1f} %, right {100 * c['correct_rate']:.1f} %, "
          f"faithful {100 * c['faithful_rate']:.1f} %")
    print(f"steps {base.steps}; total {time.perf_counter() - t0:.0f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end")
    print(accuracy_table(rows))
    print()
    print(construction_table(rows))


if __name__ == "__main__":
    main()
