import math

import pytest

from topd_jax.rewards.reflection import MATH_MARKERS, ReflectionStats, reflection_stats


def test_rates_are_accuracy_conditioned_on_reflecting_or_not():
    completions = ["b = 5 ; answer 5", "b = 6 wait b = 5 ; answer 5", "b = 6 wait b = 4 ; answer 4",
                   "b = 4 ; answer 4", "b = 5 ; answer 5"]
    correct = [True, True, False, False, True]
    s = reflection_stats(completions, correct)
    assert (s.total, s.correct, s.reflective, s.reflective_correct) == (5, 3, 2, 1)
    assert s.direct_solution_rate == pytest.approx(2 / 3)
    assert s.effective_reflection_rate == pytest.approx(1 / 2)
    assert s.reflection_rate == pytest.approx(2 / 5)


def test_markers_match_whole_words_only_and_ignore_case():
    s = reflection_stats(["Wait, that is wrong", "awaited result", "WAIT"], [True, True, False])
    assert s.reflective == 2 and s.reflective_correct == 1
    m = reflection_stats(["Let me recheck: 2+2=4", "Hold on.", "We double the value"], [1, 1, 1],
                         markers=MATH_MARKERS)
    assert m.reflective == 2


def test_empty_sets_give_nan_and_batches_add_up_exactly():
    none = reflection_stats(["answer 1"], [True])
    assert math.isnan(none.effective_reflection_rate) and none.direct_solution_rate == 1.0
    a = reflection_stats(["wait x", "y"], [True, False])
    b = reflection_stats(["wait z"], [False])
    both = reflection_stats(["wait x", "y", "wait z"], [True, False, False])
    assert a + b == both
    s, c = both.as_pairs()["effective_reflection_rate"]
    assert s / c == both.effective_reflection_rate


def test_mismatched_lengths_and_empty_markers_are_errors():
    with pytest.raises(ValueError, match="2 completions but 1 grades"):
        reflection_stats(["a", "b"], [True])
    with pytest.raises(ValueError, match="markers"):
        reflection_stats(["a"], [True], markers=())
    assert isinstance(reflection_stats([], []), ReflectionStats)
