"""Every gold answer of the five evaluation sets grades correct when a model writes it in a
box, and wrong when perturbed. Reads ../shared/data/*.jsonl by path (never copied).

Answers that cannot be graded are listed in KNOWN_UNGRADABLE with the reason; the test
fails if that list is stale in either direction, so a grader change that fixes or breaks an
item shows up. (With math-verify 0.9 and the rules in topd_jax.rewards.math, all 630 items
grade and the list is empty.)
"""

import os
import re
from pathlib import Path

import pytest

from topd_jax.data.jsonl import read_math_jsonl
from topd_jax.rewards.math import grade_detailed

DATA_DIR = Path(
    os.environ.get("TOPD_JAX_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)
EVAL_SETS = ("aime24", "aime25", "hmmt25", "amc23", "math500")
# id -> why it cannot be graded (empty: every item grades).
KNOWN_UNGRADABLE: dict[str, str] = {}


def _items(name):
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"evaluation data not found at {path} (set TOPD_JAX_DATA_DIR)")
    return read_math_jsonl(path)


def perturb(gold: str) -> str:
    """A close wrong answer: the first digit d becomes (d+1) mod 10 (changes one value of a
    multi-value answer); an answer without digits gets a factor 2 in front."""
    m = re.search(r"\d", gold)
    if m is None:
        return "2" + gold
    return gold[: m.start()] + str((int(m.group()) + 1) % 10) + gold[m.end() :]


@pytest.mark.parametrize("name", EVAL_SETS)
def test_every_gold_answer_in_a_box_grades_correct(name):
    failures = {}
    for item in _items(name):
        for completion in (
            f"Reasoning... so the answer is \\boxed{{{item.answer}}}.",
            f"Reasoning... so the answer is $\\boxed{{{item.answer}}}$.",
        ):
            v = grade_detailed(completion, item.answer)
            if not v.correct:
                failures[item.id] = f"{item.answer!r} -> {v.status}"
    known = {k for k in KNOWN_UNGRADABLE if k.startswith(name)}
    assert set(failures) == known, failures


@pytest.mark.parametrize("name", EVAL_SETS)
def test_every_perturbed_gold_answer_grades_wrong(name):
    false_positives = {}
    for item in _items(name):
        wrong = perturb(item.answer)
        assert wrong != item.answer
        v = grade_detailed(f"So the answer is \\boxed{{{wrong}}}.", item.answer)
        if v.correct or v.status != "wrong":
            false_positives[item.id] = f"{item.answer!r} vs {wrong!r} -> {v.status}"
    assert not false_positives, false_positives


def test_multi_value_gold_of_hmmt25_needs_both_values():
    item = {i.id: i for i in _items("hmmt25")}["hmmt25-feb-10"]
    first, second = (s.strip() for s in item.answer.split(", "))
    assert grade_detailed(f"\\boxed{{{second}, {first}}}", item.answer).correct
    assert grade_detailed(f"\\boxed{{{first}}} and \\boxed{{{second}}}", item.answer).correct
    assert not grade_detailed(f"\\boxed{{{first}}}", item.answer).correct
