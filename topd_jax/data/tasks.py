"""The task a run trains and evaluates on: one object with its verifier and markers.

    task = task_for(cfg.data.source)        # "files" -> MATH, "synthetic" -> SYNTHETIC, "labelled" -> LABELLED
    task = run_task(cfg)                     # the same, its labeller at data.synthetic.modulus
    task.grade(completion, answer)          # the verifier: bool
    task.reflection_markers                 # regexes that count as reflection (rewards.reflection)
    task.embedded                           # prompts and tokenizer built in, not read from files
    task.synthesis_prompt(problem, wrong, right)   # TAPO's construction request for this task
    task.labeller(problems, ids, completion_mask)  # ground-truth token labels, or None (MATH)

``MATH``: prompts from JSONL/parquet files (``data.prompts``), a Hugging Face tokenizer,
graded by ``rewards.math.grade`` (the last ``\\boxed{}`` equals the gold answer, math-verify).
``SYNTHETIC``: the embedded demo task (``data.synthetic``), graded by ``synthetic.check`` (the
last ``answer N``), whose only reflection word is ``wait``. ``LABELLED``: the labelled
variant of it (``topd_jax.data.labelled``: multi-token connectives, ``wait fix`` repairs),
graded and marked the same way, tokenized by ``labelled.LabelledTokenizer``.

Labellers (``Task.labeller``; the embedded tasks only): ``labeller(problems [B] str, ids [B, L]
int, completion_mask [B, L] bool)`` parses each problem text (``labelled.parse_problem``) and
returns ``labelled.label_rollouts``' dict (``labels``, ``slipped``, ``repair``, ``spurious``,
``ungrammatical`` ``[B, L]``, ``correct`` ``[B]``). SYNTHETIC's parses with
``labelled.PLAIN_PHRASES`` (one-word connectives), LABELLED's with ``labelled.PHRASES``. The
modulus is not in a prompt's text: ``task_for`` binds the default (7), ``run_task(cfg)`` the
run's ``data.synthetic.modulus``.

Code that behaves differently per task asks the task, never ``data.source`` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from topd_jax.data import labelled, synthetic
from topd_jax.data.templates import math_synthesis_prompt
from topd_jax.rewards.reflection import MATH_MARKERS, SYNTHETIC_MARKERS


@dataclass(frozen=True)
class Task:
    """name: ``"math"`` or ``"synthetic"``. grade: ``(completion text, gold answer) -> bool``.
    reflection_markers: regexes for ``rewards.reflection.reflection_stats``. embedded: True
    when the prompts, tokenizer and demo models come with the library (the synthetic task).
    synthesis_prompt: ``(problem, wrong text, right text) -> prompt`` asking the policy for a
    TAPO construction in this task's words. labeller: ``(problems, ids [B, L], completion_mask
    [B, L]) -> {name: array}`` ground-truth token labels (module doc), or None."""

    name: str
    grade: Callable[[str, Any], bool]
    reflection_markers: tuple[str, ...]
    embedded: bool
    synthesis_prompt: Callable[[str, str, str], str]
    labeller: Callable[[Sequence[str], np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None


@dataclass(frozen=True)
class RolloutLabeller:
    """``labelled.label_rollouts`` for the rollouts of one embedded task: ``phrases`` (its
    connectives), ``vocab`` (its tokenizer's words, id order), ``eos_id``, ``modulus``."""

    phrases: tuple[tuple[str, ...], ...]
    vocab: tuple[str, ...]
    eos_id: int
    modulus: int

    def __call__(self, problems: Sequence[str], ids: np.ndarray, completion_mask: np.ndarray
                 ) -> dict[str, np.ndarray]:
        """problems ``[B]`` untemplated prompt texts; ids, completion_mask ``[B, L]``."""
        parsed = [labelled.parse_problem(p, self.modulus) for p in problems]
        return labelled.label_rollouts(parsed, ids, completion_mask, self.vocab, eos_id=self.eos_id,
                                       phrases=self.phrases)


def _grade_math(completion: str, answer: Any) -> bool:
    from topd_jax.rewards.math import grade  # math-verify: imported only by math runs

    return grade(completion, answer)


_DEFAULT_MODULUS = 7  # SyntheticConfig.modulus's default
# The synthetic vocabulary with the construction words (a superset of the plain one, same ids).
_SYNTHETIC_TOK = synthetic.SyntheticTokenizer(construction_words=True)
_LABELLED_TOK = labelled.LabelledTokenizer()

MATH = Task("math", _grade_math, MATH_MARKERS, embedded=False, synthesis_prompt=math_synthesis_prompt)
SYNTHETIC = Task("synthetic", synthetic.check, SYNTHETIC_MARKERS, embedded=True,
                 synthesis_prompt=synthetic.synthetic_synthesis_prompt,
                 labeller=RolloutLabeller(labelled.PLAIN_PHRASES, _SYNTHETIC_TOK.vocab, _SYNTHETIC_TOK.eos_id,
                                          _DEFAULT_MODULUS))
LABELLED = Task("labelled", synthetic.check, SYNTHETIC_MARKERS, embedded=True,
                synthesis_prompt=synthetic.synthetic_synthesis_prompt,
                labeller=RolloutLabeller(labelled.PHRASES, _LABELLED_TOK.vocab, _LABELLED_TOK.eos_id,
                                         _DEFAULT_MODULUS))
_BY_SOURCE = {"files": MATH, "synthetic": SYNTHETIC, "labelled": LABELLED}


def task_for(source: str) -> Task:
    """The task of ``data.source`` (``"files"``, ``"synthetic"`` or ``"labelled"``); its
    labeller parses problems at the default modulus 7 (``run_task`` binds the run's)."""
    try:
        return _BY_SOURCE[source]
    except KeyError:
        raise ValueError(f"data.source must be one of {sorted(_BY_SOURCE)}, got {source!r}") from None


def run_task(cfg) -> Task:
    """The task of a run config (``topd_jax.config.schema.RunConfig``): ``task_for(cfg.data.source)``
    with its labeller parsing problems at ``cfg.data.synthetic.modulus``."""
    task = task_for(cfg.data.source)
    modulus = cfg.data.synthetic.modulus
    if task.labeller is None or task.labeller.modulus == modulus:
        return task
    return dataclasses.replace(task, labeller=dataclasses.replace(task.labeller, modulus=modulus))
