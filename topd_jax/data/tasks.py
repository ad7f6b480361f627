"""The task a run trains and evaluates on: one object with its verifier and markers.

    task = task_for(cfg.data.source)        # "files" -> MATH, "synthetic" -> SYNTHETIC
    task.grade(completion, answer)          # the verifier: bool
    task.reflection_markers                 # regexes that count as reflection (rewards.reflection)
    task.embedded                           # prompts and tokenizer built in, not read from files
    task.synthesis_prompt(problem, wrong, right)   # TAPO's construction request for this task

``MATH``: prompts from JSONL/parquet files (``data.prompts``), a Hugging Face tokenizer,
graded by ``rewards.math.grade`` (the last ``\\boxed{}`` equals the gold answer, math-verify).
``SYNTHETIC``: the embedded demo task (``data.synthetic``), graded by ``synthetic.check`` (the
last ``answer N``), whose only reflection word is ``wait``.

Code that behaves differently per task asks the task, never ``data.source`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from topd_jax.data import synthetic
from topd_jax.data.templates import math_synthesis_prompt
from topd_jax.rewards.reflection import MATH_MARKERS, SYNTHETIC_MARKERS


@dataclass(frozen=True)
class Task:
    """name: ``"math"`` or ``"synthetic"``. grade: ``(completion text, gold answer) -> bool``.
    reflection_markers: regexes for ``rewards.reflection.reflection_stats``. embedded: True
    when the prompts, tokenizer and demo models come with the library (the synthetic task).
    synthesis_prompt: ``(problem, wrong text, right text) -> prompt`` asking the policy for a
    TAPO construction in this task's words."""

    name: str
    grade: Callable[[str, Any], bool]
    reflection_markers: tuple[str, ...]
    embedded: bool
    synthesis_prompt: Callable[[str, str, str], str]


def _grade_math(completion: str, answer: Any) -> bool:
    from topd_jax.rewards.math import grade  # math-verify: imported only by math runs

    return grade(completion, answer)


MATH = Task("math", _grade_math, MATH_MARKERS, embedded=False, synthesis_prompt=math_synthesis_prompt)
SYNTHETIC = Task("synthetic", synthetic.check, SYNTHETIC_MARKERS, embedded=True,
                 synthesis_prompt=synthetic.synthetic_synthesis_prompt)
_BY_SOURCE = {"files": MATH, "synthetic": SYNTHETIC}


def task_for(source: str) -> Task:
    """The task of ``data.source`` (``"files"`` or ``"synthetic"``)."""
    try:
        return _BY_SOURCE[source]
    except KeyError:
        raise ValueError(f"data.source must be one of {sorted(_BY_SOURCE)}, got {source!r}") from None
