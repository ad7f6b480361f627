"""The demo's final report: a table on stdout, PNGs and a JSON file.

    report = build_report(algorithm, history, evals, teacher_meta=..., student_meta=...,
                          false_alarm_rule=..., false_alarm_quantile=..., ot_table=...,
                          detector_roc=compact_roc(...), label_example=result.extras.get("label_example"))
    paths = write_report(report, history, out_dir)   # demo_report.json, demo_report.png, demo_rollout.png
    print(format_table(report))

``history`` is the trainer's per-step metrics: a list of ``{name: float}`` dicts, each with
``"step"``. Read here:

* ``token_kl`` (mean ℓ, the per-token divergence);
* ``false_alarm_fraction``: the share of high-loss candidates the run suppresses. Under
  ``topd.false_alarm_rule=quantile`` it is the batch quantile ``topd.false_alarm_quantile``
  (q by definition, up to ties: a setting, not a measurement); under ``teacher_null`` it is
  measured;
* ``local_ot`` (mean near-future OT distance D_t of the candidates, in the embedding table
  ``topd.ot_embedding``: comparable across steps only for a frozen table, ``student_initial``
  or ``teacher``);
* the ``label_*`` metrics (``topd_jax.train.labels``; tasks with a labeller only): the
  **measured** surface share of the high-loss candidates (``label_true_surface_share``, from
  the ground-truth labels), the false alarms' precision and recall against the labels, the
  AUROC of the run's detector, the guided points' precision, ...

The detector rows exist only when the detector runs (TOPD, or OPD with suppression); the
label rows only when the task has a labeller (the synthetic and labelled tasks, not MATH):
the report leaves out what is missing. ``evals`` maps a step to the student's accuracy on
the held-out problems (step 0: before training). ``detector_roc`` is ``compact_roc`` of
``topd_jax.eval.detector_roc.detector_roc`` on the final student (every detector × K against
the labels). ``label_example`` (``TrainResult.extras["label_example"]``: one rollout of the last
step, ``words``, ``labels``, ``token_loss``, ``candidate``, ``false_alarm``, ``guided``,
``correct``, ``problem``) is drawn by ``plot_rollout``.

Summaries (``summarize``): the mean over all logged steps, over the first and over the last
10 % of them (at least one step each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

REPORT_JSON = "demo_report.json"
REPORT_PNG = "demo_report.png"
ROLLOUT_PNG = "demo_rollout.png"
# The detector ROC the demo report runs on the final student (kept small: seconds on 2 cores).
ROC_PROMPTS, ROC_ROLLOUTS, ROC_KS = 16, 2, (4, 8)
CURVES = (("token_kl", "mean per-token loss ℓ"),
          ("false_alarm_fraction", "suppressed share of candidates"),
          ("local_ot", "mean local OT D_t"))
# (history key, table row) of the per-step label metrics (topd_jax.train.labels), in table order.
LABEL_METRICS = (
    ("label_true_surface_share", "true surface share of high-loss candidates (measured)"),
    ("label_fork_share", "fork/recovery share of candidates"),
    ("label_suppressed_share", "suppressed share of candidates"),
    ("label_false_alarm_precision", "false alarms that are surface (precision)"),
    ("label_false_alarm_recall", "surface candidates suppressed (recall)"),
    ("label_fork_suppressed", "fork candidates suppressed"),
    ("label_auroc", "AUROC of -D, surface vs fork (the run's detector)"),
    ("label_guided_fork_precision", "guided points on a fork (precision)"),
    ("label_loss_surface_share", "share of the loss on surface tokens"),
    ("label_rollout_accuracy", "sampled rollouts correct"),
)
_PCT_METRICS = {name for name, _ in LABEL_METRICS} - {"label_auroc"}
# Colours of the ground-truth labels (topd_jax.data.labelled.LABEL_NAMES) in the rollout picture.
LABEL_COLOURS = {"surface": "#f4a261", "fork": "#e63946", "recovery": "#2a9d8f", "derailed": "#6d597a",
                 "forced": "#ced4da", "bad": "#343a40", "none": "#ffffff"}
EXAMPLE_KEYS = ("words", "labels", "token_loss", "candidate", "false_alarm", "guided")


def series(history: Sequence[Mapping[str, float]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric ``name`` over the steps that logged a finite value."""
    steps, values = [], []
    for row in history:
        v = row.get(name)
        if v is not None and math.isfinite(v):
            steps.append(int(row["step"]))
            values.append(float(v))
    return steps, values


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing running mean over up to ``window`` values (the first ones over fewer)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(history: Sequence[Mapping[str, float]], name: str) -> dict[str, float | None]:
    """Mean of ``name`` over all logged steps, over the first and over the last 10 % of them."""
    _, v = series(history, name)
    tenth = max(1, len(v) // 10)
    return {"mean": _mean(v), "first": _mean(v[:tenth]), "last": _mean(v[-tenth:]),
            "logged_steps": len(v)}


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def compact_roc(res: Mapping[str, Any], *, prompts: int, rollouts: int) -> dict[str, Any]:
    """The demo report's part of ``eval.detector_roc.detector_roc``'s result: the sample, the
    candidates' measured surface share, and per detector and K the AUROC of −D (surface vs
    fork ∪ recovery), the quantile rule's false-alarm precision/recall, the guided points'
    precision and (OT) the teacher-null rule's measured share (no ROC points)."""
    h = res["header"]
    rows: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in res["detectors"].values():
        rows.setdefault(r["detector"], {})[str(r["K"])] = {
            "auroc": r["auroc_surf_vs_fork_rec"], "fa_precision": r["quantile_precision"],
            "fa_recall": r["quantile_recall"], "guided_fork_precision": r["guided_fork_precision"],
            "null_share": r.get("null_share"), "undefined": r["undefined"]}
    return _finite({
        "prompts": prompts, "rollouts": rollouts, "rows": h["rows"], "candidates": h["candidates"],
        "candidate_quantile": h["candidate_quantile"], "false_alarm_quantile": h["false_alarm_quantile"],
        "ks": sorted({r["K"] for r in res["detectors"].values()}),
        "true_surface_share_candidates": h["true_surface_share_candidates"],
        "student_sampled_accuracy": h["student_sampled_accuracy"],
        "wall_s": res["wall_s"], "detectors": rows})


def build_report(algorithm: str, history: Sequence[Mapping[str, float]],
                 evals: Mapping[int, float], *, teacher_meta: Mapping[str, Any] | None,
                 student_meta: Mapping[str, Any] | None,
                 false_alarm_rule: str | None = None, false_alarm_quantile: float | None = None,
                 ot_table: str | None = None, detector_roc: Mapping[str, Any] | None = None,
                 label_example: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (non-finite numbers become None).

    Student accuracy before/after: the evals at the first and last evaluated step (the
    trainer evaluates at step 0 and at the end); if the trainer made no evaluation, the
    student's accuracy recorded when it was prepared stands in for "before". ``labels`` is
    None when the history has no ``label_*`` metric (a task without a labeller); otherwise
    the summary of each of ``LABEL_METRICS`` that was logged. ``false_alarm_rule`` /
    ``false_alarm_quantile`` / ``ot_table``: the run's ``topd.false_alarm_rule``,
    ``topd.false_alarm_quantile`` and ``topd.ot_embedding`` (how to read the suppressed share
    and the local OT). ``label_example`` must have ``EXAMPLE_KEYS`` as equal-length lists.
    """
    ev = sorted((int(s), float(a)) for s, a in evals.items())
    before = ev[0][1] if ev and ev[0][0] == 0 else (student_meta or {}).get("greedy_accuracy")
    after = ev[-1][1] if ev and ev[-1][0] > 0 else None
    labels = {name: summarize(history, name) for name, _ in LABEL_METRICS}
    labels = {k: v for k, v in labels.items() if v["logged_steps"]} or None
    if label_example is not None:
        check_example(label_example)
    report = {
        "algorithm": algorithm,
        "teacher_accuracy": (teacher_meta or {}).get("greedy_accuracy"),
        "student_accuracy_before": before,
        "student_accuracy_after": after,
        "student_accuracy_gain": None if before is None or after is None else after - before,
        "eval_curve": [[s, a] for s, a in ev],
        "metrics": {name: summarize(history, name) for name, _ in CURVES},
        "labels": labels,
        "false_alarm_rule": false_alarm_rule,
        "false_alarm_quantile": false_alarm_quantile,
        "ot_table": ot_table,
        "detector_roc": None if detector_roc is None else dict(detector_roc),
        "label_example": None if label_example is None else dict(label_example),
        "teacher_params": (teacher_meta or {}).get("num_params"),
        "student_params": (student_meta or {}).get("num_params"),
    }
    report.update(extra or {})
    return _finite(report)


def check_example(ex: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``ex`` has ``EXAMPLE_KEYS`` as lists of one length (+ ``correct``
    and ``problem``), naming the bad key."""
    missing = [k for k in (*EXAMPLE_KEYS, "correct", "problem") if k not in ex]
    if missing:
        raise ValueError(f"label_example lacks {missing}; has {sorted(ex)}")
    lengths = {k: len(ex[k]) for k in EXAMPLE_KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"label_example lists differ in length: {lengths}")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.4g}"


def _fix(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _suppressed_row(report: Mapping[str, Any]) -> str:
    rule, q = report.get("false_alarm_rule"), report.get("false_alarm_quantile")
    if rule == "quantile":
        return f"suppressed share of candidates (quantile rule: = q = {_fmt(q, True)} by definition)"
    if rule == "teacher_null":
        return "suppressed share of candidates (teacher-null rule: measured)"
    return "suppressed share of candidates"


def _ot_where(report: Mapping[str, Any]) -> str:
    """Which embedding table the local OT was measured in (``topd.ot_embedding``)."""
    return {"student": "the current student's table: drifts with training",
            "student_initial": "the initial student's table, frozen",
            "teacher": "the teacher's table, frozen"}.get(report.get("ot_table"), "table n/a")


def _ot_row(report: Mapping[str, Any]) -> str:
    return f"mean local OT D_t ({_ot_where(report)}; all / first -> last)"


def _trend(s: Mapping[str, Any], pct: bool) -> str:
    return f"{_fmt(s['first'], pct)} -> {_fmt(s['last'], pct)} (mean {_fmt(s['mean'], pct)})"


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)
    return f"{line}\n{body}\n{line}"


def format_table(report: Mapping[str, Any]) -> str:
    """Fixed-width text tables of the report: accuracy and loss; (tasks with labels) the label
    metrics, first 10 % -> last 10 % of steps (mean), next to the suppressed share and the
    local OT; (when run) the detector ROC on the final student."""
    m = report["metrics"]
    rows = [
        ("algorithm", report["algorithm"]),
        ("teacher accuracy", _fmt(report["teacher_accuracy"], True)),
        ("student accuracy before", _fmt(report["student_accuracy_before"], True)),
        ("student accuracy after", _fmt(report["student_accuracy_after"], True)),
        ("mean ℓ (first 10% -> last 10% of steps)",
         f"{_fmt(m['token_kl']['first'])} -> {_fmt(m['token_kl']['last'])}"),
    ]
    labels = report.get("labels")
    if labels:
        rows.append(("-- against ground-truth labels, per step", "first 10% -> last 10% of steps (mean)"))
        for name, title in LABEL_METRICS:
            if name == "label_suppressed_share":
                s = labels.get(name) or m["false_alarm_fraction"]
                if s["logged_steps"]:
                    rows.append((_suppressed_row(report), _trend(s, True)))
                elif report.get("false_alarm_rule") is None:
                    rows.append((_suppressed_row(report), "none (no detector in this run)"))
            elif name in labels:
                rows.append((title, _trend(labels[name], name in _PCT_METRICS)))
    else:
        rows.append((_suppressed_row(report), _fmt(m["false_alarm_fraction"]["mean"], True)))
    ot = m["local_ot"]
    rows.append((_ot_row(report), f"{_fmt(ot['mean'])} / {_fmt(ot['first'])} -> {_fmt(ot['last'])}"
                 if ot["logged_steps"] else "n/a (no OT detector in this run)"))
    out = _table(rows)
    roc = report.get("detector_roc")
    if roc:
        out += "\n" + format_roc(roc)
    return out


def format_roc(roc: Mapping[str, Any]) -> str:
    """The detector ROC table: one row per detector, per K the AUROC of −D (surface vs fork ∪
    recovery candidates) and the quantile rule's false-alarm precision / recall."""
    ks = [str(k) for k in roc["ks"]]
    head = (f"detector ROC on the final student ({roc['prompts']} prompts x {roc['rollouts']} rollouts at T=1, "
            f"{roc['candidates']} candidates = ℓ above the rollout's {roc['candidate_quantile']:.0%} quantile, "
            f"measured surface share {_fmt(roc['true_surface_share_candidates'], True)}; FA = the quantile rule "
            f"at q = {roc['false_alarm_quantile']:.0%}; {roc['wall_s']:.0f} s)")
    rows = [("detector", " | ".join(f"K={k}: AUROC (FA prec / recall)" for k in ks))]
    for name, by_k in roc["detectors"].items():
        cells = []
        for k in ks:
            r = by_k.get(k)
            cells.append("n/a" if r is None else
                         f"{_fix(r['auroc'])} ({_fix(r['fa_precision'])} / {_fix(r['fa_recall'])})")
        rows.append((name, " | ".join(cells)))
    return head + "\n" + _table(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def plot_report(report: Mapping[str, Any], history: Sequence[Mapping[str, float]],
                path: str | Path) -> Path:
    """A 2x2 PNG: student accuracy (teacher's as a line), mean ℓ, the candidates' shares (the
    suppressed share; with labels the measured surface share and the false alarms' precision
    and recall) and the mean local OT."""
    plt = _plt()
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
    panels = [(axes[0][1], "mean per-token loss ℓ", [("token_kl", "ℓ")]),
              (axes[1][0], "high-loss candidates",
               [("false_alarm_fraction", "suppressed share"
                 + (" (= q)" if report.get("false_alarm_rule") == "quantile" else "")),
                ("label_true_surface_share", "true surface share (measured)"),
                ("label_false_alarm_precision", "false-alarm precision"),
                ("label_false_alarm_recall", "false-alarm recall")]),
              (axes[1][1], f"mean local OT D_t ({_ot_where(report)})", [("local_ot", "D_t")])]
    for ax, title, names in panels:
        drawn = False
        for name, label in names:
            steps, values = series(history, name)
            if steps:
                line, = ax.plot(steps, values, lw=0.6, alpha=0.3)
                w = max(1, len(values) // 20)
                ax.plot(steps, smooth(values, w), lw=1.5, color=line.get_color(),
                        label=label if w == 1 else f"{label} (mean of {w})")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"not measured\n(algorithm={report['algorithm']}, no detector)",
                    ha="center", va="center", transform=ax.transAxes)
        elif len(names) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(f"topd_jax demo: {report['algorithm']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_rollout(example: Mapping[str, Any], path: str | Path, *, per_line: int = 14,
                 title: str | None = None) -> Path:
    """One rollout as a PNG: its tokens as words along lines of ``per_line``, each a bar of
    height ℓ_t coloured by its ground-truth label (candidates solid with a black edge, other
    tokens faded), the detector's verdict above each candidate: ``x`` false alarm (suppressed),
    ``o`` kept, ``*`` guided. ``example``: ``EXAMPLE_KEYS`` lists + ``correct``, ``problem``."""
    check_example(example)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _plt()
    n = len(example["words"])
    lines = max(1, math.ceil(n / per_line))
    top = max([float(v) for v in example["token_loss"]] + [1e-6]) * 1.35
    fig, axes = plt.subplots(lines, 1, figsize=(0.62 * per_line + 1.5, 1.9 * lines + 1.2), squeeze=False)
    for li in range(lines):
        ax = axes[li][0]
        idx = range(li * per_line, min(n, (li + 1) * per_line))
        for x, i in enumerate(idx):
            cand = bool(example["candidate"][i])
            ax.bar(x, float(example["token_loss"][i]), color=LABEL_COLOURS.get(example["labels"][i], "#999999"),
                   alpha=1.0 if cand else 0.35, edgecolor="black" if cand else "none", linewidth=1.2)
            if cand:
                verdict = ("*", "guided") if example["guided"][i] else \
                          ("x", "false alarm") if example["false_alarm"][i] else ("o", "kept")
                ax.plot(x, float(example["token_loss"][i]) + 0.12 * top, verdict[0], color="black",
                        markersize=8, markerfacecolor="none" if verdict[0] == "o" else "black")
            # every token's label as a strip under the axis line, visible even where ℓ_t ≈ 0
            ax.bar(x, 0.06 * top, bottom=-0.08 * top, color=LABEL_COLOURS.get(example["labels"][i], "#999999"),
                   edgecolor="none")
        ax.set_xticks(range(len(idx)))
        ax.set_xticklabels([str(example["words"][i]) for i in idx], fontsize=9)
        ax.set_xlim(-0.6, per_line - 0.4)
        ax.set_ylim(-0.09 * top, top)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("ℓ_t", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
    present = [lab for lab in LABEL_COLOURS if lab in set(example["labels"])]
    handles = [Patch(color=LABEL_COLOURS[lab], label=lab) for lab in present]
    handles += [Line2D([], [], marker=m, ls="", color="black", markerfacecolor="none" if m == "o" else "black",
                       label=lab) for m, lab in (("x", "false alarm (suppressed)"), ("o", "kept"),
                                                 ("*", "guided"))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    verdict = "correct" if example["correct"] else "wrong"
    fig.suptitle(title or f"one rollout ({verdict}) of: {example['problem']}\n"
                 "bars: ℓ_t; colour (and strip below): ground-truth label; solid: high-loss candidate; "
                 "marker: detector verdict",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(report: Mapping[str, Any], history: Sequence[Mapping[str, float]],
                 out_dir: str | Path) -> dict[str, Path]:
    """``<out_dir>/demo_report.json``, ``demo_report.png`` and, when the report has a label
    example, ``demo_rollout.png``; returns ``{"json", "png"[, "rollout_png"]}`` paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=False))
    paths = {"json": out / REPORT_JSON, "png": plot_report(report, history, out / REPORT_PNG)}
    if report.get("label_example"):
        paths["rollout_png"] = plot_rollout(report["label_example"], out / ROLLOUT_PNG)
    return paths
