"""Direct-solution and effective-reflection rates (TAPO.md "Numbers"): how often a model is
right without reflecting, and how often its reflections end in a right answer.

The paper reports both rates without a definition we could find, so ours are written here
and used everywhere (eval hook, ``bench/compare_grpo_tapo.py``):

- a completion is **reflective** when it contains a reflection marker (a case-insensitive
  regular expression matched on word boundaries: ``wait`` on the synthetic task, where the
  constructed trajectories' correction word is exactly that; for math text the default
  ``MATH_MARKERS`` also count "hold on", "let me re-check", "I made a mistake", ...);
- **direct_solution_rate** = accuracy among non-reflective completions;
- **effective_reflection_rate** = accuracy among reflective completions;
- **reflection_rate** = the fraction of completions that are reflective.

Each rate comes as a ``(sum, count)`` pair too, so several eval batches or processes combine
exactly; a rate over an empty set is NaN.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

SYNTHETIC_MARKERS = (r"wait",)
MATH_MARKERS = (r"wait", r"hold on", r"let me re-?check", r"let me double-?check", r"i made a mistake",
                r"that'?s (?:not right|wrong|incorrect)", r"actually,? (?:no|that)")


def reflection_pattern(markers: Sequence[str]) -> re.Pattern:
    """One case-insensitive regex matching any marker as whole words."""
    if not markers:
        raise ValueError("reflection markers must not be empty")
    return re.compile(r"\b(?:" + "|".join(f"(?:{m})" for m in markers) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class ReflectionStats:
    """Counts over a set of graded completions (see the module docstring)."""
    total: int
    correct: int
    reflective: int
    reflective_correct: int

    @property
    def direct_solution_rate(self) -> float:
        direct = self.total - self.reflective
        return (self.correct - self.reflective_correct) / direct if direct else math.nan

    @property
    def effective_reflection_rate(self) -> float:
        return self.reflective_correct / self.reflective if self.reflective else math.nan

    @property
    def reflection_rate(self) -> float:
        return self.reflective / self.total if self.total else math.nan

    def __add__(self, other: "ReflectionStats") -> "ReflectionStats":
        return ReflectionStats(self.total + other.total, self.correct + other.correct,
                               self.reflective + other.reflective,
                               self.reflective_correct + other.reflective_correct)

    def as_pairs(self) -> dict[str, tuple[float, float]]:
        """``{name: (sum, count)}`` for metric sinks that reduce pairs."""
        return {"direct_solution_rate": (float(self.correct - self.reflective_correct),
                                         float(self.total - self.reflective)),
                "effective_reflection_rate": (float(self.reflective_correct), float(self.reflective)),
                "reflection_rate": (float(self.reflective), float(self.total))}


def reflection_stats(completions: Sequence[str], correct: Sequence[bool],
                     markers: Sequence[str] = SYNTHETIC_MARKERS) -> ReflectionStats:
    """Count reflective and right completions. ``completions[i]`` was graded ``correct[i]``."""
    if len(completions) != len(correct):
        raise ValueError(f"{len(completions)} completions but {len(correct)} grades")
    pattern = reflection_pattern(markers)
    reflective = [bool(pattern.search(c)) for c in completions]
    return ReflectionStats(total=len(completions), correct=sum(map(bool, correct)),
                           reflective=sum(reflective),
                           reflective_correct=sum(r and bool(c) for r, c in zip(reflective, correct)))
