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

    json_path, png_path = dr.write_report(report, hand_made_history(), tmp_path)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000
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
    assert "n/a" in dr.format_table(report)
    _, png = dr.write_report(report, history, tmp_path)
    assert png.is_file()


def test_non_finite_metric_values_are_skipped():
    history = [{"step": 1, "local_ot": float("nan")}, {"step": 2, "local_ot": 0.2}]
    assert dr.series(history, "local_ot") == ([2], [0.2])


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

    yaml = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(yaml, [f"demo.cache_dir={tmp_path / 'cache'}", "algorithm=opd",
                             "topd.suppression=false_alarms"])
    for role, acc in (("teacher", 0.9), ("student", 0.15)):
        d = demo.cache_dir_for(cfg, role)
        d.mkdir(parents=True)
        (d / demo.META_FILE).write_text(json.dumps({"greedy_accuracy": acc, "num_params": 5}))
    report = demo.demo_report(cfg, StandInResult(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / dr.REPORT_JSON).read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["algorithm"] == "opd+false_alarms" and saved["teacher_accuracy"] == 0.9
    assert (saved["student_accuracy_before"], saved["student_accuracy_after"]) == (0.2, 0.6)
    assert saved["steps"] == 20 and (tmp_path / "run" / dr.REPORT_PNG).is_file()
    assert "90.0%" in capsys.readouterr().out
