"""run_eval with a scripted generator (no model): files written, numbers consistent with the
per-sample lines."""

import json

import pytest

from topd_jax.data.jsonl import MathItem
from topd_jax.data.templates import PromptTemplate
from topd_jax.eval.runner import Generation, run_eval

DATASETS = {
    "toy1": [MathItem("a", "1+1?", "2"), MathItem("b", "2+2?", "4")],
    "toy2": [MathItem("c", "roots of x^2-1?", "1,-1")],
}


def scripted(prompts, j):
    """Round j: right answers on even rounds, wrong on odd; one cut-off sample."""
    out = []
    for p in prompts:
        gold = {"1+1?": "2", "2+2?": "4", "roots of x^2-1?": "\\pm 1"}[
            p.split("Question: ")[1].split("\n")[0]
        ]
        if j == 3 and "2+2" in p:
            out.append(Generation("so \\boxed{", 8, True))
        else:
            ans = gold if j % 2 == 0 else "7"
            out.append(Generation(f"so \\boxed{{{ans}}}", 5 + j, False))
    return out


def test_run_eval_writes_records_and_consistent_summary(tmp_path):
    summary = run_eval(DATASETS, template=PromptTemplate("paper"), generate=scripted,
                       samples=4, out_dir=tmp_path, config={"seed": 59}, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 4
    assert set(lines[0]) == {"dataset", "id", "sample", "completion", "extracted", "correct",
                             "status", "length", "truncated"}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["config"]["seed"] == 59 and summary["config"]["samples"] == 4
    assert summary["config"]["template"]["name"] == "paper"
    t1, t2 = summary["datasets"]["toy1"], summary["datasets"]["toy2"]
    for name, s in summary["datasets"].items():
        recs = [x for x in lines if x["dataset"] == name]
        assert s["pass@1"] == pytest.approx(sum(x["correct"] for x in recs) / len(recs))
        assert s["mean_length"] == pytest.approx(sum(x["length"] for x in recs) / len(recs))
    assert t1["pass@1"] == 0.5 and t2["pass@1"] == 0.5  # "\pm 1" grades against "1,-1"
    assert t1["truncation_rate"] == pytest.approx(1 / 8)
    assert t1["status_counts"] == {"correct": 4, "unterminated": 1, "wrong": 3}
    # maj@4: a has 2 right vs 2 "7" (tie, 0.5); b has 2 right vs 1 "7" + 1 abstain (1.0)
    assert t1["pass@4"] == 1.0 and t1["maj@4"] == 0.75
    assert summary["average"]["pass@1"] == 0.5
    assert summary["timing"]["generated_tokens"] == sum(x["length"] for x in lines)
    table = (tmp_path / "summary.txt").read_text()
    assert table.splitlines()[-1].startswith("avg")


def test_generator_returning_the_wrong_count_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="returned 1 completions for 3 prompts"):
        run_eval(DATASETS, template=PromptTemplate("paper"),
                 generate=lambda p, j: [Generation("", 0, False)], samples=1,
                 out_dir=tmp_path, progress=False)
