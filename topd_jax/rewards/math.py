"""Math answer grading with ``math-verify``: the public grading API.

    grade(completion, gold) -> bool                 # the reward: last \\boxed{} vs gold
    grade_detailed(completion, gold) -> Verdict     # + extracted answer and status
    extract_boxed(text) -> str | None               # last top-level \\boxed{} content
    pass_at_k(n, c, k) -> float                     # unbiased pass@k
    maj_at_k(answers, correct, k) -> float          # expected majority-vote accuracy

How an item is graded (``grade_detailed``):
1. the answer is the content of the last top-level ``\\boxed{}`` (``boxed.py``); no box or an
   unterminated last box -> wrong, status ``no_box`` / ``unterminated``;
2. gold and answer are each wrapped in ``$...$`` and parsed by ``math_verify.parse`` (a bare
   gold string parses to nothing, so wrapping is required), then compared by
   ``math_verify.verify(gold, answer)``;
3. multi-answer golds: a gold such as ``"2, 3"`` parses to the set {2, 3} and needs both
   values, in any order, in one box; if the model boxed the values separately
   (``\\boxed{2}`` and ``\\boxed{3}``), the last m boxes, m = the gold's set size, are joined
   and tried too. A gold given as a list of strings means "all of these values" and is
   joined the same way;
4. the whole item (parses and comparisons) runs under ONE wall-clock budget ``timeout_s``,
   enforced by a SIGALRM interval timer on the main thread; on timeout the item is wrong with
   status ``timeout``. Signals only exist on the main thread: off it, items run without a
   time limit (math-verify's own signal timeouts are always disabled here because they
   raise in threads). Any exception inside math-verify/sympy -> wrong, status ``error``;
   ``grade`` never raises for any completion string.
"""

from __future__ import annotations

import functools
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from math_verify import parse, verify

from topd_jax.rewards.boxed import extract_boxed, scan_boxes
from topd_jax.rewards.estimators import maj_at_k_from_clusters, mean_and_stderr, pass_at_k

__all__ = [
    "Verdict",
    "GradingTimeout",
    "grade",
    "grade_detailed",
    "extract_boxed",
    "answers_equivalent",
    "cluster_answers",
    "maj_at_k",
    "pass_at_k",
    "mean_and_stderr",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 5.0
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])")  # \pm or \mp, not \pmod / \pmb
# Statuses of a Verdict: why it is right or wrong.
STATUSES = ("correct", "wrong", "no_box", "unterminated", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    """The result of grading one completion.

    correct: the reward. extracted: the graded box content (None without a box).
    status: one of ``STATUSES``.
    """

    correct: bool
    extracted: str | None
    status: str


class GradingTimeout(BaseException):
    """Raised by the grading timer. A BaseException so that math-verify's and sympy's
    ``except Exception`` handlers do not swallow it and carry on past the budget."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``GradingTimeout`` in this block after ``seconds`` of wall time.

    Works on the main thread only (SIGALRM); elsewhere, or with ``seconds=None``, it does
    nothing. A timer already armed by the caller (e.g. a test timeout) is restored on exit
    with its remaining time, and fires at most ``seconds`` late.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    if seconds <= 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {seconds}")

    def _on_alarm(signum, frame):
        raise GradingTimeout(f"grading exceeded {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


def _parse_latex(text: str) -> list:
    # parsing_timeout=None: math-verify's own timeout uses SIGALRM too and would clobber ours
    # (and raises off the main thread); time_limit() bounds the whole item instead.
    return parse("$" + text + "$", parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """Parsed gold, memoised: every sample of a problem is graded against the same gold.
    A tuple so that the cached value cannot be mutated by a caller."""
    return tuple(_parse_latex(gold))


def _verify(gold_parsed: Sequence, answer_parsed: list) -> bool:
    # allow_set_relation_comp: "-2 \\le x \\le 7" equals the interval [-2, 7] (endpoints are
    # still checked); math-verify's default only allows it when the answer is the set.
    return bool(
        verify(
            list(gold_parsed), answer_parsed, timeout_seconds=None, allow_set_relation_comp=True
        )
    )


def _gold_set_size(gold_parsed: Sequence) -> int:
    """How many values a multi-answer gold holds (1 for a single value)."""
    import sympy  # math-verify already imported it

    for g in gold_parsed:
        if isinstance(g, sympy.FiniteSet):
            return len(g)
    return 1


def _gold_text(gold: str | Sequence[str]) -> str:
    if isinstance(gold, str):
        return gold
    values = list(gold)
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"gold must be a string or a non-empty list of strings, got {gold!r}")
    return ", ".join(values)


def _multi_answer_candidates(boxes: tuple[str, ...], m: int) -> list[str]:
    """Other readings of the answer when the gold holds m > 1 values: the last m boxes
    joined (values boxed one by one), and a single ``\\pm`` / ``\\mp`` expanded into its
    two values (math-verify reads ``1 \\pm \\sqrt{2}`` but not ``\\frac{1 \\pm \\sqrt{2}}{2}``)."""
    out = []
    if m <= len(boxes):
        out.append(", ".join(b.strip() for b in boxes[-m:]))
    last = boxes[-1].strip()
    signs = _PLUS_MINUS.findall(last)
    if m == 2 and len(signs) == 1:
        out.append(f"{_PLUS_MINUS.sub('+', last)}, {_PLUS_MINUS.sub('-', last)}")
    return out


def _grade_boxes(boxes: tuple[str, ...], gold: str) -> tuple[bool, str]:
    """Grade the last box, then (multi-answer gold) the other readings of the boxes."""
    gold_parsed = _parse_gold(gold)
    last = boxes[-1].strip()
    if _verify(gold_parsed, _parse_latex(last)):
        return True, last
    m = _gold_set_size(gold_parsed)
    if m > 1:
        for candidate in _multi_answer_candidates(boxes, m):
            if _verify(gold_parsed, _parse_latex(candidate)):
                return True, candidate
    return False, last


def grade_detailed(
    completion: str, gold: str | Sequence[str], *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> Verdict:
    """Grade one completion against a gold answer (LaTeX, as in the data files' ``answer``).

    ``gold`` may also be a list of strings: all values are required (see module docstring).
    Never raises for any ``completion`` string; a malformed ``gold`` type raises TypeError.
    """
    gold_text = _gold_text(gold)
    scan = scan_boxes(completion)
    if scan.unterminated:
        return Verdict(False, None, "unterminated")
    if not scan.boxes:
        return Verdict(False, None, "no_box")
    extracted = scan.boxes[-1].strip()
    try:
        with time_limit(timeout_s):
            ok, extracted = _grade_boxes(scan.boxes, gold_text)
    except GradingTimeout:
        return Verdict(False, extracted, "timeout")
    except Exception:  # sympy can fail in many ways; a grader must not crash a run
        return Verdict(False, extracted, "error")
    return Verdict(ok, extracted, "correct" if ok else "wrong")


def grade(
    completion: str, gold: str | Sequence[str], *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> bool:
    """True iff the last ``\\boxed{}`` of ``completion`` is mathematically equal to ``gold``."""
    return grade_detailed(completion, gold, timeout_s=timeout_s).correct


def answers_equivalent(
    a: str, b: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> bool:
    """Whether two extracted answers are equal (math-verify, both directions, one budget).
    Identical strings are equal without parsing. A timeout or error counts as not equal."""
    if a.strip() == b.strip():
        return True
    try:
        with time_limit(timeout_s):
            pa, pb = _parse_latex(a), _parse_latex(b)
            return _verify(pa, pb) or _verify(pb, pa)
    except GradingTimeout:
        return False
    except Exception:
        return False


def cluster_answers(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> tuple[int, list[int], int]:
    """Group one problem's samples by final answer, for majority voting.

    Returns ``(n_correct, wrong_cluster_sizes, n_abstain)``. Correct samples form one
    cluster: each equals the gold, hence they equal each other (math-verify is not always
    transitive, so its pairwise verdicts are not used for them). Wrong answers are grouped
    greedily by ``answers_equivalent`` with each cluster's first member; samples without an
    answer (None) abstain.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    n_correct = sum(bool(c) for c in correct)
    n_abstain = 0
    reps: list[str] = []
    sizes: list[int] = []
    for ans, ok in zip(answers, correct):
        if ok:
            continue
        if ans is None:
            n_abstain += 1
            continue
        for j, rep in enumerate(reps):
            if answers_equivalent(rep, ans, timeout_s=timeout_s):
                sizes[j] += 1
                break
        else:
            reps.append(ans)
            sizes.append(1)
    return n_correct, sizes, n_abstain


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> float:
    """Expected majority-vote (maj@k) accuracy of k of these n samples of one problem.

    ``answers[i]``: sample i's extracted answer (None = no answer); ``correct[i]``: its
    verdict. Exact expectation over the C(n, k) draws, ties split evenly
    (``estimators.maj_at_k_from_clusters``); for k = n this is plain majority voting.
    """
    n_correct, sizes, n_abstain = cluster_answers(answers, correct, timeout_s=timeout_s)
    return maj_at_k_from_clusters(n_correct, sizes, n_abstain, k)
