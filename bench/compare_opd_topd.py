"""OPD vs OPD + false-alarm suppression vs TOPD on the embedded demo, several seeds each.

    python bench/compare_opd_topd.py                        # 3 methods x seeds 0,1,2, demo config
    python bench/compare_opd_topd.py --seeds 0 --steps 50   # quick look
    python bench/compare_opd_topd.py steps=150 eval.every=50   # any config override

Every run starts from the same prepared (cached) teacher and student of configs/demo.yaml
(``topd_jax.demos.demo.prepare_demo_models``); only ``algorithm``/suppression and ``seed``
change. The seed drives rollout sampling and prompt order (the models are fixed). Prints a
markdown table: student accuracy before -> after (greedy, held-out), per seed and mean ± sd;
the suppressed share of candidates (= topd.false_alarm_quantile by definition, not a
measurement: see bench/detector_roc.py) and mean local OT over
training (detector runs only); median step time. Results also go to ``<out>/compare.json``.
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

from topd_jax.demos import demo  # noqa: E402
from topd_jax.config.loader import load_config  # noqa: E402
from topd_jax.demos.demo_report import summarize  # noqa: E402
from topd_jax.train.loop import train  # noqa: E402
from topd_jax.train.setup import plan_run  # noqa: E402

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METHODS = {
    "OPD": ["algorithm=opd", "topd.suppression=none"],
    "OPD+suppression": ["algorithm=opd", "topd.suppression=false_alarms"],
    "TOPD": ["algorithm=topd"],
}


def run_one(name: str, seed: int, overrides: list[str], out: Path, student_dir: str,
            teacher_dir: str) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    cfg = load_config(DEMO_YAML, overrides + METHODS[name] + [
        f"seed={seed}", f"output_dir={run_dir}", "checkpoint.resume=false",
        f"checkpoint.every={10**6}", "checkpoint.export_hf=false", "logging.stdout=false",
        "logging.tensorboard=false"])
    t0 = time.perf_counter()
    result = train(cfg, plan=plan_run(cfg, student_dir, teacher_dir))
    wall = time.perf_counter() - t0
    ev = sorted(result.evals.items())
    times = [r["time_step"] for r in result.history if "time_step" in r]
    row = {"method": name, "seed": seed, "before": ev[0][1] if ev else None,
           "after": ev[-1][1] if ev else None, "evals": ev, "wall_s": wall,
           "median_step_s": statistics.median(times) if times else None,
           "false_alarm_fraction": summarize(result.history, "false_alarm_fraction")["mean"],
           "local_ot": summarize(result.history, "local_ot")["mean"],
           "local_ot_first_last": [summarize(result.history, "local_ot")[k] for k in ("first", "last")],
           "token_kl_first_last": [summarize(result.history, "token_kl")[k] for k in ("first", "last")]}
    print(f"[{name} seed {seed}] accuracy {row['before']:.3f} -> {row['after']:.3f}, "
          f"{wall:.0f} s", flush=True)
    return row


def _ms(xs: list[float | None], pct: bool = True) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    scale, unit = (100.0, "") if pct else (1.0, "")
    mean = statistics.mean(xs) * scale
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}{unit}" if pct else f"{mean:.3f} ± {sd:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| method | accuracy before (%) | accuracy after (%) per seed | after mean ± sd (%) | "
             "suppressed share (= q by definition) (%) | mean local OT | median step (s) |",
             "|---|---|---|---|---|---|---|"]
    for name in METHODS:
        rs = [r for r in rows if r["method"] == name]
        if not rs:
            continue
        per_seed = " / ".join(f"{100 * r['after']:.1f}" for r in rs)
        lines.append(
            f"| {name} | {_ms([r['before'] for r in rs])} | {per_seed} | "
            f"{_ms([r['after'] for r in rs])} | {_ms([r['false_alarm_fraction'] for r in rs])} | "
            f"{_ms([r['local_ot'] for r in rs], pct=False)} | "
            f"{statistics.median(r['median_step_s'] for r in rs):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="override steps (default: the demo's)")
    ap.add_argument("--out", default="/tmp/compare_opd_topd")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(DEMO_YAML, overrides)
    student_dir, teacher_dir = demo.prepare_demo_models(base)
    teacher_acc = demo.read_meta(teacher_dir)["greedy_accuracy"]
    rows = []
    for name in args.methods:
        for seed in args.seeds:
            rows.append(run_one(name, seed, overrides, out, student_dir, teacher_dir))
            (out / "compare.json").write_text(json.dumps(rows, indent=2))
    load = os.getloadavg()
    print(f"\nteacher greedy accuracy {100 * teacher_acc:.1f} %; steps {base.steps}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end")
    print(table(rows))


if __name__ == "__main__":
    main()
