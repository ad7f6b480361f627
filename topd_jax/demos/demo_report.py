"""The demo's final report: a table on stdout, a PNG of the training curves and a JSON file.

    report = build_report(cfg, history, evals, teacher_meta=..., student_meta=...)
    write_report(report, history, evals, out_dir)   # demo_report.json + demo_report.png
    print(format_table(report))

``history`` is the trainer's per-step metrics: a list of ``{name: float}`` dicts, each
with ``"step"``; the names read here are ``token_kl`` (mean ℓ, the per-token divergence),
``false_alarm_fraction`` (the share of high-loss candidates at or below the batch's
``topd.false_alarm_quantile`` of D: q by definition, up to ties -- a setting, not a
measurement -- under ``topd.false_alarm_rule=quantile``; measured under ``teacher_null``;
``bench/detector_roc.py`` measures the true surface share against labels) and ``local_ot`` (mean near-future OT distance D_t of the candidates); the last two
exist only when the detector runs (TOPD, or OPD with suppression). ``evals`` maps a step
to the student's accuracy on the held-out problems (step 0: before training).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

REPORT_JSON = "demo_report.json"
REPORT_PNG = "demo_report.png"
CURVES = (("token_kl", "mean per-token loss ℓ"),
          ("false_alarm_fraction", "suppressed share (= q under the quantile rule)"),
          ("local_ot", "mean local OT D_t"))


def series(history: Sequence[Mapping[str, float]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric ``name`` over the steps that logged a finite value."""
    steps, values = [], []
    for row in history:
        v = row.get(name)
        if v is not None and math.isfinite(v):
            steps.append(int(row["step"]))
            values.append(float(v))
    return steps, values


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(history: Sequence[Mapping[str, float]], name: str) -> dict[str, float | None]:
    """Mean of ``name`` over all logged steps, over the first and over the last 10 % of them."""
    _, v = series(history, name)
    tenth = max(1, len(v) // 10)
    return {"mean": _mean(v), "first": _mean(v[:tenth]), "last": _mean(v[-tenth:]),
            "logged_steps": len(v)}


def build_report(algorithm: str, history: Sequence[Mapping[str, float]],
                 evals: Mapping[int, float], *, teacher_meta: Mapping[str, Any] | None,
                 student_meta: Mapping[str, Any] | None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict.

    Student accuracy before/after: the evals at the first and last evaluated step (the
    trainer evaluates at step 0 and at the end); if the trainer made no evaluation, the
    student's accuracy recorded when it was prepared stands in for "before".
    """
    ev = sorted((int(s), float(a)) for s, a in evals.items())
    before = ev[0][1] if ev and ev[0][0] == 0 else (student_meta or {}).get("greedy_accuracy")
    after = ev[-1][1] if ev and ev[-1][0] > 0 else None
    report = {
        "algorithm": algorithm,
        "teacher_accuracy": (teacher_meta or {}).get("greedy_accuracy"),
        "student_accuracy_before": before,
        "student_accuracy_after": after,
        "student_accuracy_gain": None if before is None or after is None else after - before,
        "eval_curve": [[s, a] for s, a in ev],
        "metrics": {name: summarize(history, name) for name, _ in CURVES},
        "teacher_params": (teacher_meta or {}).get("num_params"),
        "student_params": (student_meta or {}).get("num_params"),
    }
    report.update(extra or {})
    return report


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.4g}"


def format_table(report: Mapping[str, Any]) -> str:
    """A fixed-width text table of the report's headline numbers."""
    m = report["metrics"]
    rows = [
        ("algorithm", report["algorithm"]),
        ("teacher accuracy", _fmt(report["teacher_accuracy"], True)),
        ("student accuracy before", _fmt(report["student_accuracy_before"], True)),
        ("student accuracy after", _fmt(report["student_accuracy_after"], True)),
        ("mean ℓ (first 10% -> last 10% of steps)",
         f"{_fmt(m['token_kl']['first'])} -> {_fmt(m['token_kl']['last'])}"),
        ("suppressed share of candidates (= q under the quantile rule)",
         _fmt(m["false_alarm_fraction"]["mean"], True)),
        ("mean local OT (all / first 10% -> last 10%)",
         f"{_fmt(m['local_ot']['mean'])} / {_fmt(m['local_ot']['first'])} -> "
         f"{_fmt(m['local_ot']['last'])}"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)
    return f"{line}\n{body}\n{line}"


def plot_report(report: Mapping[str, Any], history: Sequence[Mapping[str, float]],
                path: str | Path) -> Path:
    """A 2x2 PNG: student accuracy (teacher's as a line) and the three metric curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0][0]
    curve = report["eval_curve"]
    if curve:
        ax.plot([s for s, _ in curve], [a for _, a in curve], "o-", label="student")
    if report["teacher_accuracy"] is not None:
        ax.axhline(report["teacher_accuracy"], color="k", ls="--", label="teacher")
    ax.set(title="held-out accuracy", xlabel="step", ylim=(0, 1))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    for ax, (name, title) in zip([axes[0][1], axes[1][0], axes[1][1]], CURVES):
        steps, values = series(history, name)
        if steps:
            ax.plot(steps, values, lw=1)
        else:
            ax.text(0.5, 0.5, f"not measured\n(algorithm={report['algorithm']}, no detector)",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="step")
    fig.suptitle(f"topd_jax demo: {report['algorithm']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(report: Mapping[str, Any], history: Sequence[Mapping[str, float]],
                 out_dir: str | Path) -> tuple[Path, Path]:
    """``<out_dir>/demo_report.json`` and ``<out_dir>/demo_report.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    return out / REPORT_JSON, plot_report(report, history, out / REPORT_PNG)
