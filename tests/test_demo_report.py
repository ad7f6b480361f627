"""The demo report: JSON, PNG and table agree with the (hand-made) training result."""

import json

import pytest

from topd_jax.demos import demo_report as dr


def hand_made_history():
    # 20 steps; the detector metrics only on even steps (as if logged every 2 steps)
    rows = []
    for s in range(1, 21):
        row = {"step": s, "token_kl": 1.0 / s, "loss": 1.0 / s}
        if s % 2 == 0:
            row.update(false_alarm_fraction=0.3, local_ot=0.5 - 0.01 * s)
        rows.append(row)
    return rows


def hand_made_example():
    # the contract's keys (TrainResult.extras["label_example"]): equal-length lists + correct, problem
    words = ["b", "=", "a", "+", "3", "=", "5", "so", "c", "=", "2", "*", "b", "=", "3", ";",
             "answer", "3", "<eos>"]
    labels = ["forced", "forced", "surface", "forced", "fork", "forced", "fork", "surface", "forced",
              "forced", "surface", "forced", "fork", "forced", "fork", "forced", "forced", "derailed", "forced"]
    n = len(words)
    candidate = [i in (2, 4, 6, 7, 14) for i in range(n)]
    return {"words": words, "labels": labels,
            "token_loss": [0.05 + 0.1 * (i % 5) + (0.8 if candidate[i] else 0.0) for i in range(n)],
            "candidate": candidate, "false_alarm": [i in (2, 7) for i in range(n)],
            "guided": [i == 6 for i in range(n)], "correct": False,
            "problem": "a = 2 ; b = a + 3 ; c = 2 * b ; ? c"}


def label_history():
    # 20 steps of TOPD on a labelled task: the label metrics every step, precision only on even ones
    rows = hand_made_history()
    for row in rows:
        s = row["step"]
        row.update(label_true_surface_share=0.2 + 0.01 * s, label_fork_share=0.5, label_suppressed_share=0.3,
                   label_false_alarm_recall=0.1 * (s % 3), label_auroc=0.55, label_rollout_accuracy=s / 40)
        if s % 2 == 0:
            row["label_false_alarm_precision"] = 1.0 / s
    return rows


def test_label_section_reports_first_last_and_mean_of_the_measured_metrics(tmp_path):
    report = dr.build_report("topd", label_history(), {0: 0.3, 20: 0.5}, teacher_meta=None, student_meta=None,
                             false_alarm_rule="quantile", false_alarm_quantile=0.3, ot_table="teacher",
                             label_example=hand_made_example())
    lab = report["labels"]
    surf = [0.2 + 0.01 * s for s in range(1, 21)]
    assert lab["label_true_surface_share"] == pytest.approx(
        {"mean": sum(surf) / 20, "first": (surf[0] + surf[1]) / 2, "last": (surf[-2] + surf[-1]) / 2,
         "logged_steps": 20})
    prec = lab["label_false_alarm_precision"]  # 10 logged steps: first/last 10 % = one step each
    assert prec["logged_steps"] == 10 and prec["first"] == pytest.approx(0.5)
    assert prec["last"] == pytest.approx(1 / 20)
    assert prec["mean"] == pytest.approx(sum(1 / s for s in range(2, 21, 2)) / 10)
    assert lab["label_false_alarm_recall"]["mean"] == pytest.approx(sum(0.1 * (s % 3) for s in range(1, 21)) / 20)
    assert "label_guided_fork_precision" not in lab  # never logged: left out, not n/a
    paths = dr.write_report(report, label_history(), tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["labels"]["label_true_surface_share"]["mean"] == pytest.approx(sum(surf) / 20)
    assert saved["label_example"] == hand_made_example() and saved["ot_table"] == "teacher"
    table = dr.format_table(report)
    # the measured share beside the quantile rule's defined one, and the frozen OT table named
    assert "true surface share of high-loss candidates (measured)" in table
    assert "21.5% -> 39.5% (mean 30.5%)" in table
    assert "quantile rule: = q = 30.0% by definition" in table and "the teacher's table, frozen" in table
    assert "0.55 -> 0.55 (mean 0.55)" in table  # AUROC, not a percentage
    png = paths["rollout_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rollout_picture_is_written_for_a_hand_made_example(tmp_path):
    png = dr.plot_rollout(hand_made_example(), tmp_path / "r.png", per_line=8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_label_example_with_ragged_lists_is_refused_naming_the_lengths():
    ex = hand_made_example()
    ex["guided"] = ex["guided"][:-1]
    with pytest.raises(ValueError, match="guided"):
        dr.plot_rollout(ex, "unused.png")
    del ex["problem"]
    with pytest.raises(ValueError, match="problem"):
        dr.check_example(ex)


def test_report_of_a_task_without_labels_omits_the_label_section(tmp_path):
    # MATH: no labeller, so no label_* metric, no label example, no detector ROC
    report = dr.build_report("topd", hand_made_history(), {0: 0.3, 20: 0.4}, teacher_meta=None, student_meta=None,
                             false_alarm_rule="quantile", false_alarm_quantile=0.3, ot_table="student")
    assert report["labels"] is None and report["label_example"] is None and report["detector_roc"] is None
    table = dr.format_table(report)
    assert "ground-truth" not in table and "detector ROC" not in table
    row = [line for line in table.splitlines() if line.startswith("suppressed share")][0]
    assert "(quantile rule: = q = 30.0% by definition)" in row and row.endswith("| 30.0%")
    assert "drifts with training" in table
    paths = dr.write_report(report, hand_made_history(), tmp_path)
    assert set(paths) == {"json", "png"}


def test_detector_roc_section_keeps_auroc_and_false_alarm_rates_per_detector_and_k():
    def row(det, k, a, p, r, null=None):
        out = {"detector": det, "K": k, "auroc_surf_vs_fork_rec": a, "quantile_precision": p,
               "quantile_recall": r, "guided_fork_precision": float("nan"), "undefined": 0, "roc": [(0, 0)]}
        return out if null is None else {**out, "null_share": null}
    res = {"header": {"rows": 32, "candidates": 150, "candidate_quantile": 0.8, "false_alarm_quantile": 0.3,
                      "true_surface_share_candidates": 0.25, "student_sampled_accuracy": 0.5},
           "detectors": {"kl_window K=4": row("kl_window", 4, 0.6, 0.3, 0.35),
                         "ot_embedding K=4": row("ot_embedding", 4, 0.7, 0.4, 0.45, null=0.41),
                         "kl_window K=8": row("kl_window", 8, 0.45, 0.2, 0.25)},
           "wall_s": 12.0}
    roc = dr.compact_roc(res, prompts=16, rollouts=2)
    assert roc["ks"] == [4, 8] and roc["detectors"]["ot_embedding"]["4"]["null_share"] == 0.41
    assert roc["detectors"]["kl_window"]["8"]["auroc"] == 0.45
    assert roc["detectors"]["kl_window"]["4"]["guided_fork_precision"] is None  # NaN -> null in JSON
    json.dumps(roc, allow_nan=False)
    table = dr.format_roc(roc)
    assert "0.700 (0.400 / 0.450)" in table and "0.450 (0.200 / 0.250)" in table
    assert "16 prompts x 2 rollouts" in table
    assert "measured surface share 25.0%" in table
    ot = [line for line in table.splitlines() if line.startswith("ot_embedding")][0]
    assert ot.endswith("| n/a")  # no K=8 row for it


def test_report_numbers_follow_the_history_and_evals(tmp_path):
    evals = {0: 0.25, 10: 0.4, 20: 0.55}
    report = dr.build_report("topd", hand_made_history(), evals,
                             teacher_meta={"greedy_accuracy": 0.97, "num_params": 1000},
                             student_meta={"greedy_accuracy": 0.2, "num_params": 100})
    assert report["teacher_accuracy"] == 0.97
    assert report["student_accuracy_before"] == 0.25 and report["student_accuracy_after"] == 0.55
    assert report["student_accuracy_gain"] == pytest.approx(0.30)
    kl = report["metrics"]["token_kl"]
    assert kl["first"] == pytest.approx(0.75) and kl["last"] == pytest.approx((1 / 19 + 1 / 20) / 2)
    ot = report["metrics"]["local_ot"]
    assert ot["logged_steps"] == 10 and ot["first"] == pytest.approx(0.48)
    assert ot["mean"] == pytest.approx(sum(0.5 - 0.01 * s for s in range(2, 21, 2)) / 10)
    assert report["metrics"]["false_alarm_fraction"]["mean"] == pytest.approx(0.3)

    paths = dr.write_report(report, hand_made_history(), tmp_path)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert "rollout_png" not in paths  # no label example
    table = dr.format_table(report)
    for text in ("97.0%", "25.0%", "55.0%", "30.0%", "topd"):
        assert text in table


def test_opd_without_detector_reports_missing_metrics_as_na(tmp_path):
    history = [{"step": s, "token_kl": 0.5} for s in range(1, 5)]
    report = dr.build_report("opd", history, {}, teacher_meta=None,
                             student_meta={"greedy_accuracy": 0.3, "num_params": 10})
    # no eval at all: "before" falls back to the accuracy measured when the student was made
    assert report["student_accuracy_before"] == 0.3 and report["student_accuracy_after"] is None
    assert report["metrics"]["local_ot"]["mean"] is None
    assert "n/a (no OT detector in this run)" in dr.format_table(report)
    assert dr.write_report(report, history, tmp_path)["png"].is_file()


def test_plain_opd_on_a_labelled_task_reports_the_measured_share_and_no_suppression():
    history = [{"step": s, "token_kl": 0.5, "label_true_surface_share": 0.25, "label_fork_share": 0.5}
               for s in range(1, 5)]
    report = dr.build_report("opd", history, {0: 0.3, 4: 0.4}, teacher_meta=None, student_meta=None,
                             false_alarm_rule=None, false_alarm_quantile=0.3, ot_table=None)
    assert set(report["labels"]) == {"label_true_surface_share", "label_fork_share"}
    table = dr.format_table(report)
    assert "25.0% -> 25.0% (mean 25.0%)" in table
    row = [line for line in table.splitlines() if line.startswith("suppressed share")][0]
    assert row.endswith("| none (no detector in this run)")
    assert "precision" not in table and "AUROC" not in table


def test_non_finite_metric_values_are_skipped():
    history = [{"step": 1, "local_ot": float("nan")}, {"step": 2, "local_ot": 0.2}]
    assert dr.series(history, "local_ot") == ([2], [0.2])


def test_curves_are_smoothed_by_a_trailing_mean():
    assert dr.smooth([1.0, 2.0, 3.0, 7.0], 2) == pytest.approx([1.0, 1.5, 2.5, 5.0])
    assert dr.smooth([4.0, 1.0], 1) == [4.0, 1.0]


def test_demo_report_reads_the_train_result_and_the_cached_model_meta(tmp_path, capsys):
    from dataclasses import dataclass, field
    from pathlib import Path

    from topd_jax.demos import demo
    from topd_jax.config.loader import load_config

    @dataclass
    class StandInResult:  # the TrainResult fields demo_report reads
        output_dir: Path
        history: list = field(default_factory=hand_made_history)
        evals: dict = field(default_factory=lambda: {0: 0.2, 20: 0.6})
        final_step: int = 20
        model: object = None
        extras: dict = field(default_factory=lambda: {"label_example": hand_made_example()})

    yaml = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(yaml, [f"demo.cache_dir={tmp_path / 'cache'}", "algorithm=opd",
                             "topd.suppression=false_alarms"])
    for role, acc in (("teacher", 0.9), ("student", 0.15)):
        d = demo.cache_dir_for(cfg, role)
        d.mkdir(parents=True)
        (d / demo.META_FILE).write_text(json.dumps({"greedy_accuracy": acc, "num_params": 5}))
    report = demo.demo_report(cfg, StandInResult(tmp_path / "run"), roc_prompts=0)
    saved = json.loads((tmp_path / "run" / dr.REPORT_JSON).read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["algorithm"] == "opd+false_alarms" and saved["teacher_accuracy"] == 0.9
    assert (saved["student_accuracy_before"], saved["student_accuracy_after"]) == (0.2, 0.6)
    assert saved["steps"] == 20 and (tmp_path / "run" / dr.REPORT_PNG).is_file()
    assert saved["label_example"] == hand_made_example() and (tmp_path / "run" / dr.ROLLOUT_PNG).is_file()
    # the demo measures local OT in a frozen table (issue 13 §3), and says which
    assert saved["false_alarm_rule"] == "quantile" and saved["ot_table"] == "teacher"
    assert "90.0%" in capsys.readouterr().out
