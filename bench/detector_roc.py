"""Detector ROC at step 0 (TOPD_REVIEW §4.11): is the false-alarm share measured or defined,
and does any near-future detector separate surface-form mismatches from real forks?

    python bench/detector_roc.py                               # the demo's cached models
    python bench/detector_roc.py --prompts 32 --ks 4,8         # quicker
    python bench/detector_roc.py --student DIR --teacher DIR   # any pair on the synthetic task

No training. The initial student samples ``--rollouts`` solutions for ``--prompts`` held-out
problems; the teacher scores them (ℓ_t, full-vocabulary reverse KL); the candidates are the
top 20 % of ℓ in each rollout (``--candidate-quantile``, every position above it: no cap);
every completion token gets a ground-truth label from ``topd_jax.data.labelled``. Then, for
each detector × K, D_t at every candidate and:

* the AUROC of −D for SURFACE vs FORK ∪ RECOVERY candidates (1 = the detector ranks every
  surface candidate below every fork; 0.5 = no separation), and separately vs FORK and vs
  RECOVERY;
* the quantile rule's false alarms (D ≤ the batch's 0.3-quantile): precision (share of
  them that are SURFACE) and recall (share of SURFACE candidates caught); their share of
  candidates is 0.3 by definition;
* for the OT detectors, the teacher-null rule D(teacher, student) ≤ D(teacher, teacher′):
  its false-alarm share (measured), precision and recall;
* candidates whose window is empty (D undefined: ``kl_window`` at the last token) are
  excluded and counted.

Detectors: ``kl_window`` (mean ℓ over t+1..t+K); ``ot_embedding`` with a fresh student
continuation, the student's table, Sinkhorn ε = 0.05 (TOPD's default) and one change each:
the rollout's own suffix instead of a fresh continuation, the teacher's table, ε = 0.01,
the debiased Sinkhorn divergence, the exact solver; ``margin_w1`` with N = 4 per side.
Continuations are sampled once at the largest K and truncated for the smaller ones. The
scoring is ``topd_jax.eval.detector_roc.detector_roc`` (the demo report calls it too, on the
final student with a small sample); this file picks the models, the sample and the variants.

What it measures on the demo models: the demo task (``topd_jax.data.synthetic``) has one-word
connectives and operand order as its surface forms, and neither model has ever seen a
repair, so RECOVERY positions are only "the token after an unrepaired slip". ``--task
labelled`` uses the labelled task of ``topd_jax.data.labelled`` (multi-token connectives, a
teacher that repairs planted slips) and its models (``demos.labelled_demo``: trained and
cached on first use, their gates in ``demo_meta.json``), or ``--student``/``--teacher``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from topd_jax.config.loader import load_config  # noqa: E402
from topd_jax.data import labelled, synthetic  # noqa: E402
from topd_jax.data.tasks import task_for  # noqa: E402
from topd_jax.demos import demo, labelled_demo  # noqa: E402
from topd_jax.eval.detector_roc import OtVariant, detector_roc  # noqa: E402
from topd_jax.models import load_pretrained  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "topd_jax" / "configs"
TASK_YAML = {"demo": CONFIGS / "demo.yaml", "labelled": CONFIGS / "labelled.yaml"}  # the cached models' own configs
OT_VARIANTS = [
    OtVariant("ot sinkhorn eps=.05 (default)", "student", "sinkhorn", 0.05, "fresh"),
    OtVariant("ot + rollout suffix", "student", "sinkhorn", 0.05, "suffix"),
    OtVariant("ot + teacher table", "teacher", "sinkhorn", 0.05, "fresh"),
    OtVariant("ot eps=.01", "student", "sinkhorn", 0.01, "fresh"),
    OtVariant("ot sinkhorn divergence", "student", "sinkhorn_divergence", 0.05, "fresh"),
    OtVariant("ot exact", "student", "exact", 0.05, "fresh"),
]


def labeller_for(task: str, modulus: int):
    """The ground-truth labeller (``Task.labeller``) of ``task`` (``"demo"``: the synthetic task's
    one-word connectives; ``"labelled"``) at ``modulus``."""
    return dataclasses.replace(task_for("labelled" if task == "labelled" else "synthetic").labeller, modulus=modulus)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--ks", default="4,8,12,20")
    ap.add_argument("--candidate-quantile", type=float, default=0.8)
    ap.add_argument("--false-alarm-quantile", type=float, default=0.3)
    ap.add_argument("--margin-samples", type=int, default=4)
    ap.add_argument("--student"), ap.add_argument("--teacher")
    ap.add_argument("--task", choices=("demo", "labelled"), default="demo",
                    help="demo: one-word connectives (the demo models); labelled: data.labelled.PHRASES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/detector_roc")
    ap.add_argument("overrides", nargs="*", help="config overrides of the task's config (topd_jax/configs/demo.yaml or labelled.yaml)")
    args = ap.parse_args(argv)
    ks = sorted(int(k) for k in args.ks.split(","))
    t_start = time.perf_counter()
    cfg = load_config(TASK_YAML[args.task], args.overrides)
    if args.student and args.teacher:
        student_dir, teacher_dir = args.student, args.teacher
    elif args.task == "labelled":
        student_dir, teacher_dir = labelled_demo.prepare_labelled_models(cfg)
    else:
        student_dir, teacher_dir = demo.prepare_demo_models(cfg)
    student, teacher = load_pretrained(student_dir), load_pretrained(teacher_dir)
    tok = labelled.LabelledTokenizer() if args.task == "labelled" else synthetic.SyntheticTokenizer()
    problems = demo.splits(cfg)[1][:args.prompts]
    ids, pmask = demo.prompt_arrays([p.prompt for p in problems], demo.prompt_len(cfg))
    new_tokens = labelled_demo.completion_len(cfg) if args.task == "labelled" else demo.completion_len(cfg) + 8
    res = detector_roc(student, teacher, ids, pmask, [p.prompt for p in problems],
                       labeller_for(args.task, cfg.data.synthetic.modulus), key=jax.random.key(args.seed),
                       rollouts=args.rollouts, max_new_tokens=new_tokens, ks=ks, ot_variants=OT_VARIANTS,
                       margin_samples=args.margin_samples, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       candidate_quantile=args.candidate_quantile, false_alarm_quantile=args.false_alarm_quantile,
                       num_candidates=cfg.topd.num_candidates, min_separation=cfg.topd.min_separation)
    header, results = res["header"], res["detectors"]
    composition = header["label_share_candidates"]
    R = header["rows"]

    wall = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"header": header, "detectors": results, "wall_s": wall, "student": str(student_dir),
              "teacher": str(teacher_dir), "task": args.task, "args": vars(args)}
    (out / "detector_roc.json").write_text(json.dumps(report, indent=1))

    print(f"# Detector ROC at step 0 ({args.task} task; {R} rollouts, {header['tokens']} tokens, "
          f"{header['candidates']} candidates = top {1 - args.candidate_quantile:.0%} of ℓ per rollout)")
    print(f"student sampled accuracy {header['student_sampled_accuracy']:.1%}; "
          f"candidate labels: " + ", ".join(f"{n} {v:.1%}" for n, v in composition.items() if v > 0))
    tc = header["top_c"]["label_share"]
    print(f"top-{cfg.topd.num_candidates} candidates (min separation {cfg.topd.min_separation}): surface "
          f"{tc['surface']:.1%}, fork {tc['fork']:.1%}, recovery {tc['recovery']:.1%}")
    print(f"TRUE surface share of candidates {composition['surface']:.1%} (the quantile rule's "
          f"'suppressed share' is {args.false_alarm_quantile:.0%} by definition); loss surface share "
          f"{header['loss_surface_share']:.1%}")
    print("mean ℓ by label: " + ", ".join(f"{n} {v:.3f}" for n, v in header["mean_loss_by_label"].items()
                                          if v is not None))
    print()
    print("| detector | AUROC surf vs fork+rec | vs fork | vs rec | q-rule FA prec | q-rule FA recall "
          "| guided fork prec | null FA share | null prec | null recall | null guided fork prec | undefined |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v: "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for name, r in results.items():
        print(f"| {name} | {f(r['auroc_surf_vs_fork_rec'])} | {f(r['auroc_surf_vs_fork'])} | "
              f"{f(r['auroc_surf_vs_rec'])} | {f(r['quantile_precision'])} | {f(r['quantile_recall'])} | "
              f"{f(r['guided_fork_precision'])} | {f(r.get('null_share'))} | {f(r.get('null_precision'))} | "
              f"{f(r.get('null_recall'))} | {f(r.get('null_guided_fork_precision'))} | {r['undefined']} |")
    print(f"\nwall {wall:.0f} s; JSON (with ROC points): {out / 'detector_roc.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
