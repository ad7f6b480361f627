"""The task object: data.source -> one task with its verifier and reflection markers."""

import pytest

from topd_jax.data.tasks import MATH, SYNTHETIC, task_for
from topd_jax.rewards.reflection import reflection_stats


def test_each_data_source_has_its_task():
    assert task_for("files") is MATH and task_for("synthetic") is SYNTHETIC
    assert SYNTHETIC.embedded and not MATH.embedded


def test_unknown_source_is_refused_naming_it():
    with pytest.raises(ValueError, match="data.source.*'labeled'"):
        task_for("labeled")


def test_synthetic_grade_reads_the_last_answer():
    assert SYNTHETIC.grade("b = 3 + 2 = 5 ; answer 4 wait answer 5", "5")
    assert not SYNTHETIC.grade("b = 3 + 2 = 5 ; answer 5 wait answer 4", "5")
    assert not SYNTHETIC.grade("b = 3 + 2 = 5", "5")


def test_math_grade_reads_the_last_box_with_math_verify():
    assert MATH.grade(r"so \boxed{3} no, \boxed{\frac{1}{2}}", "0.5")
    assert not MATH.grade(r"\boxed{\frac{1}{2}} no, \boxed{3}", "0.5")


def test_markers_are_the_tasks_reflection_words():
    # "hold on" counts on math only; "wait" on both.
    texts = ["x wait y", "x hold on y"]
    assert reflection_stats(texts, [True, True], SYNTHETIC.reflection_markers).reflective == 1
    assert reflection_stats(texts, [True, True], MATH.reflection_markers).reflective == 2


def test_synthesis_prompt_is_the_tasks_own_wording():
    """TAPO asks the task for its construction request: LaTeX-boxed math wording for files,
    the synthetic task's own vocabulary (every word known to its tokenizer) otherwise."""
    from topd_jax.data import synthetic

    math = MATH.synthesis_prompt("What is $1+1$?", "1+1=3, so \\boxed{3}", "1+1=2, so \\boxed{2}")
    assert "What is $1+1$?" in math and "\\boxed{3}" in math and "<reconstruction>" in math
    import numpy as np

    problem = synthetic.generate_problems(1, seed=0)[0]
    rng = np.random.default_rng(0)
    wrong, right = synthetic.reference_solution(problem, rng), synthetic.reference_solution(problem, rng)
    text = SYNTHETIC.synthesis_prompt(problem, wrong, right)
    assert text == synthetic.synthetic_synthesis_prompt(problem, wrong, right) and "\\boxed" not in text
