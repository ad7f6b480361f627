"""A labelled synthetic task: every completion token gets a ground-truth label.

TOPD's claims are about *which* high-loss tokens are surface-form mismatches (harmless) and
which are real forks (TOPD_REVIEW §4). This module makes them measurable on the modular
arithmetic chains of ``topd_jax.data.synthetic``:

* **Grammar.** ``[CONN] var = X op Y = V`` per step (CONN from step 2 on), then
  ``; answer V``. CONN is one of ``PHRASES``: ``so`` | ``thus`` | ``then we get`` |
  ``hence we get`` -- connectives of different lengths, so a surface mismatch can span
  several tokens. For ``+`` and ``*`` the operand order is free.
* **Recovery.** After a wrong value the chain can repair itself:
  ``b = 3 + 2 = 6 wait fix b = 3 + 2 = 5 so c = ...``. The teacher's data plants slips and
  repairs them (the slipped value is not a training target: the teacher learns to repair,
  not to slip); the student's data slips and never repairs.
* **Styles.** ``TEACHER_STYLE`` and ``STUDENT_STYLE`` (TOPD_REVIEW §4.2) differ sharply in
  connective and operand order.

``label_words`` / ``label_rollouts`` parse a completion with a small automaton and return,
per token, the *position type*, which depends only on the prefix (as the full-vocabulary
loss ℓ_t does), and per-token events:

==========  ===============================================================================
label       positions
==========  ===============================================================================
SURFACE     the first token of a connective; the first operand of ``+``/``*``: several
            tokens are admissible and every admissible choice keeps the answer
FORK        a value (operand copy, result, final answer) on a correct prefix: one token is
            right, the others derail the answer
RECOVERY    the token right after an unrepaired wrong value: ``wait`` repairs, anything
            else derails
DERAILED    every later position after an unrepaired wrong value
FORCED      exactly one grammatical token (``=``, variable names, operators, ``;``,
            ``answer``, ``fix``, the tail words of a multi-token connective, eos)
BAD         positions after an ungrammatical token
NONE        not a completion token (prompt, padding, after eos)
==========  ===============================================================================

Events: ``slipped[t]`` (the sampled token at a value position was wrong), ``repair[t]``
(``wait``, ``fix`` and the restated line after a wrong value), ``spurious[t]`` (a ``wait``
after a correct value), ``ungrammatical[t]``.

The plain demo task is the special case ``phrases=PLAIN_PHRASES`` (one-word connectives,
``CONNECTIVES``); its rollouts label the same way (they never contain ``wait``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from topd_jax.data.synthetic import (CONNECTIVES, OPS, VARS, Problem, Step, SyntheticTokenizer,
                                     apply_op, supervised_arrays)

# ---------------------------------------------------------------- labels
NONE, SURFACE, FORK, RECOVERY, DERAILED, FORCED, BAD = range(7)
LABEL_NAMES = ("none", "surface", "fork", "recovery", "derailed", "forced", "bad")

# Connective phrases (tuples of words); the first words must differ (the first word decides).
PHRASES: tuple[tuple[str, ...], ...] = (("so",), ("thus",), ("then", "we", "get"),
                                        ("hence", "we", "get"))
PLAIN_PHRASES: tuple[tuple[str, ...], ...] = tuple((c,) for c in CONNECTIVES)
EXTRA_WORDS = ("we", "get")
EOS = "<eos>"


@dataclass(frozen=True)
class LabelledStyle:
    """Surface preferences: probabilities of the phrases (aligned with ``phrases``) and
    P(swap the operands of ``+`` and ``*``)."""
    phrase_probs: tuple[float, ...]
    swap_prob: float


TEACHER_STYLE = LabelledStyle(phrase_probs=(0.85, 0.10, 0.025, 0.025), swap_prob=0.1)
STUDENT_STYLE = LabelledStyle(phrase_probs=(0.05, 0.05, 0.45, 0.45), swap_prob=0.7)


@dataclass(frozen=True)
class LabelledTokenizer(SyntheticTokenizer):
    """The synthetic words, ``CONSTRUCTION_WORDS`` (``wait``, ``fix``, ...) and ``we``,
    ``get``: 130 words; ids of the base and construction words are unchanged."""
    construction_words: bool = True

    @property
    def vocab(self) -> tuple[str, ...]:
        if not self.construction_words:
            raise ValueError("LabelledTokenizer needs construction_words=True (wait, fix)")
        return super().vocab + EXTRA_WORDS


def _check_phrases(phrases: Sequence[Sequence[str]]) -> None:
    firsts = [p[0] for p in phrases if len(p)]
    if len(firsts) != len(phrases) or len(set(firsts)) != len(firsts):
        raise ValueError(f"phrases must be non-empty with distinct first words, got {phrases!r}")
    if "wait" in firsts or ";" in firsts:
        raise ValueError(f"'wait' and ';' cannot start a connective phrase: {phrases!r}")


# ---------------------------------------------------------------- problems from prompts
_PROMPT_STEP_RE = re.compile(r"^([a-h]) = (?:([a-h]) ([-+*]) (\d+)|(\d+) ([-+*]) ([a-h]))$")


def parse_problem(prompt: str, modulus: int = 7) -> Problem:
    """The ``Problem`` a prompt text states (``a = 3 ; b = a + 2 ; c = 3 * b ; ? c``).

    Raises ValueError naming the part that does not parse."""
    parts = [p.strip() for p in " ".join(prompt.split()).split(";")]
    if len(parts) < 3 or not parts[-1].startswith("? "):
        raise ValueError(f"prompt {prompt!r} is not 'a = N ; <steps> ; ? var'")
    m = re.fullmatch(r"a = (\d+)", parts[0])
    if m is None:
        raise ValueError(f"prompt {prompt!r}: first part {parts[0]!r} is not 'a = N'")
    steps = []
    for i, part in enumerate(parts[1:-1]):
        m2 = _PROMPT_STEP_RE.fullmatch(part)
        if m2 is None:
            raise ValueError(f"prompt {prompt!r}: step {part!r} does not parse")
        var, prev, op, const, const_first = (
            (m2.group(1), m2.group(2), m2.group(3), int(m2.group(4)), False) if m2.group(2)
            else (m2.group(1), m2.group(7), m2.group(6), int(m2.group(5)), True))
        if var != VARS[i + 1] or prev != VARS[i]:
            raise ValueError(f"prompt {prompt!r}: step {part!r} should define {VARS[i + 1]} "
                             f"from {VARS[i]}")
        steps.append(Step(var, prev, op, const, const_first))
    if parts[-1] != f"? {steps[-1].var}":
        raise ValueError(f"prompt {prompt!r}: asks {parts[-1]!r}, expected '? {steps[-1].var}'")
    return Problem(int(m.group(1)), tuple(steps), modulus)


# ---------------------------------------------------------------- solutions
def _line_words(problem: Problem, step: int, x: int, value: int, rng: np.random.Generator,
                style: LabelledStyle) -> list[str]:
    s = problem.steps[step]
    swap = s.op != "-" and rng.random() < style.swap_prob
    a, b = (s.const, x) if swap else (x, s.const)
    return [s.var, "=", str(a), s.op, str(b), "=", str(value)]


SLIP_KINDS = ("random", "unreduced")


def _raw_op(op: str, x: int, c: int) -> int:
    return x + c if op == "+" else x - c if op == "-" else x * c


def unreduced_slip(op: str, x: int, c: int, modulus: int) -> int:
    """The wrong value of a forgotten ``mod p``: the raw ``x op c`` when it is a number token
    (0..99) other than the right residue, else the right residue + p (always >= p: wrong)."""
    raw, v = _raw_op(op, x, c), apply_op(op, x, c, modulus)
    return raw if raw != v and 0 <= raw < 100 else v + modulus


def render_words(problem: Problem, rng: np.random.Generator, style: LabelledStyle, *,
                 slip_step: int | Sequence[int] | None = None, recover: bool = False,
                 slip_kind: str = "random", confused: Sequence[int] = (),
                 phrases: Sequence[Sequence[str]] = PHRASES) -> tuple[list[str], list[bool]]:
    """One solution as ``(words, trainable)``, both ``[num_words]``.

    ``slip_step``: the step (0-based) whose result is wrong (any nonzero offset), several
    such steps (a sequence), or None.
    ``recover``: every slip is followed by ``wait fix`` + the correct line and the chain
    continues correctly; the wrong values are then not trainable (``trainable[i] = False``).
    Without ``recover`` every later step is computed from the wrong value (derailed).
    ``slip_kind``: ``"random"`` (a uniformly drawn wrong residue) or ``"unreduced"`` (the
    result without the ``mod p``: ``unreduced_slip``).
    ``confused``: steps (not slipped) written without the ``mod p`` reduction (the raw
    ``x op c`` when it is a number token 0..99; a misconception, never repaired, the chain goes
    on from that value; it is right when the raw result is already below p).
    """
    if slip_kind not in SLIP_KINDS:
        raise ValueError(f"slip_kind must be one of {SLIP_KINDS}, got {slip_kind!r}")
    _check_phrases(phrases)
    if len(style.phrase_probs) != len(phrases):
        raise ValueError(f"style has {len(style.phrase_probs)} phrase probabilities for "
                         f"{len(phrases)} phrases")
    slips = set() if slip_step is None else ({int(slip_step)} if np.isscalar(slip_step)
                                             else {int(i) for i in slip_step})
    if bad := [i for i in sorted(slips) if not 0 <= i < len(problem.steps)]:
        raise ValueError(f"slip_step={slip_step} has steps {bad} outside 0..{len(problem.steps) - 1}")
    p = problem.modulus
    words, trainable = [], []
    x = problem.start
    for i, s in enumerate(problem.steps):
        if i:
            phrase = phrases[int(rng.choice(len(phrases), p=style.phrase_probs))]
            words += list(phrase)
            trainable += [True] * len(phrase)
        v = apply_op(s.op, x, s.const, p)
        if i in slips:
            wrong = (unreduced_slip(s.op, x, s.const, p) if slip_kind == "unreduced"
                     else (v + int(rng.integers(1, p))) % p)
            words += _line_words(problem, i, x, wrong, rng, style)
            trainable += [True] * 6 + [not recover]
            if recover:
                words += ["wait", "fix"] + _line_words(problem, i, x, v, rng, style)
                trainable += [True] * 9
            else:
                v = wrong
        else:
            if i in confused:
                v = raw if 0 <= (raw := _raw_op(s.op, x, s.const)) < 100 else v
            words += _line_words(problem, i, x, v, rng, style)
            trainable += [True] * 7
        x = v
    words += [";", "answer", str(x)]
    trainable += [True] * 3
    return words, trainable


def planted_slips(problem: Problem, rng: np.random.Generator, slip_rate: float,
                  max_slips: int = 1) -> list[int]:
    """The steps that slip in one teacher solution: with probability ``slip_rate``, between 1
    and ``min(max_slips, num_steps)`` distinct steps (uniform count, uniform steps); else none."""
    if max_slips < 1:
        raise ValueError(f"max_slips must be >= 1, got {max_slips}")
    if rng.random() >= slip_rate:
        return []
    n = len(problem.steps)
    k = int(rng.integers(1, min(max_slips, n) + 1))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def teacher_solution(problem: Problem, rng: np.random.Generator, *, slip_rate: float = 0.3,
                     max_slips: int = 1, slip_kind: str = "random", recovery: bool = True,
                     style: LabelledStyle = TEACHER_STYLE,
                     phrases: Sequence[Sequence[str]] = PHRASES) -> tuple[str, list[bool]]:
    """Teacher data: planted slips (``planted_slips``: with probability ``slip_rate``, 1 to
    ``max_slips`` steps), each repaired when ``recovery`` (the slipped values masked out of
    training); otherwise correct. Returns ``(text, trainable [num_words])``."""
    slips = planted_slips(problem, rng, slip_rate, max_slips)
    words, trainable = render_words(problem, rng, style, slip_step=slips, slip_kind=slip_kind,
                                    recover=recovery and bool(slips), phrases=phrases)
    return " ".join(words), trainable


def student_solution(problem: Problem, rng: np.random.Generator, *, slip_rate: float = 0.5,
                     confusion: float = 0.0, style: LabelledStyle = STUDENT_STYLE,
                     phrases: Sequence[Sequence[str]] = PHRASES) -> tuple[str, list[bool]]:
    """Student data: a slip (a random wrong residue) with probability ``slip_rate``, never
    repaired (derails); each ``+`` and ``*`` step is written without the ``mod p`` reduction
    with probability ``confusion`` (a misconception: above 0.5 the student's greedy solution is
    wrong wherever the raw result is >= p)."""
    slip = int(rng.integers(len(problem.steps))) if rng.random() < slip_rate else None
    confused = [i for i, st in enumerate(problem.steps) if st.op != "-" and rng.random() < confusion]
    words, trainable = render_words(problem, rng, style, slip_step=slip, confused=confused,
                                    phrases=phrases)
    return " ".join(words), trainable


def supervised_arrays_masked(tok: SyntheticTokenizer, prompts: Sequence[str],
                             solutions: Sequence[str], trainable: Sequence[Sequence[bool]],
                             prompt_len: int = 32, completion_len: int = 64) -> dict[str, np.ndarray]:
    """``synthetic.supervised_arrays`` with per-word training targets: ``loss_mask`` is
    cleared where ``trainable[i][j]`` is False (e.g. a planted slip). Same layout."""
    out = supervised_arrays(tok, prompts, solutions, prompt_len, completion_len)
    for i, (sol, keep) in enumerate(zip(solutions, trainable, strict=True)):
        if len(keep) != len(sol.split()):
            raise ValueError(f"example {i}: trainable has {len(keep)} entries for "
                             f"{len(sol.split())} words")
        cols = prompt_len + np.flatnonzero(~np.asarray(keep, bool))
        out["loss_mask"][i, cols] = False
    return out


# ---------------------------------------------------------------- the labeller
@dataclass(frozen=True)
class TokenLabels:
    """Per-token ground truth of one completion, every array ``[num_tokens]``."""
    labels: np.ndarray          # int8 position types (SURFACE, FORK, ...)
    slipped: np.ndarray         # bool: a wrong value was sampled here
    repair: np.ndarray          # bool: part of a repair after a wrong value (wait fix line)
    spurious: np.ndarray        # bool: a ``wait`` after a correct value
    ungrammatical: np.ndarray   # bool
    correct: bool               # the completion ends in the right answer (and parses)


class _Stop(Exception):
    pass


class _Labeller:
    """Recursive-descent automaton over the words of one completion."""

    def __init__(self, problem: Problem, words: Sequence[str], phrases):
        self.p, self.w, self.n = problem, list(words), len(words)
        self.phrase_of = {ph[0]: tuple(ph) for ph in phrases}
        self.labels = np.full(self.n, NONE, np.int8)
        self.slipped = np.zeros(self.n, bool)
        self.repair = np.zeros(self.n, bool)
        self.spurious = np.zeros(self.n, bool)
        self.bad = np.zeros(self.n, bool)
        self.pos, self.in_repair, self.correct = 0, False, False

    # -- primitives
    def _word(self) -> str:
        if self.pos >= self.n:
            raise _Stop  # truncated completion: nothing left to label
        return self.w[self.pos]

    def _mark(self, label: int) -> str:
        word = self._word()
        self.labels[self.pos] = label
        self.repair[self.pos] = self.in_repair
        return word

    def _fill_rest(self, label: int, start: int) -> None:
        """``label`` from ``start`` up to and including the first eos."""
        for j in range(start, self.n):
            self.labels[j] = label
            if self.w[j] == EOS:
                break

    def _ungrammatical(self) -> None:
        self.bad[self.pos] = True
        if self.w[self.pos] != EOS:  # nothing follows an eos
            self._fill_rest(BAD, self.pos + 1)
        raise _Stop

    def expect(self, word: str, label: int = FORCED) -> None:
        if self._mark(label) != word:
            self._ungrammatical()
        self.pos += 1

    def value(self, label: int, admissible: set[int]) -> int | None:
        """A number token: its value, or None after marking a slip (a wrong number)."""
        word = self._mark(label)
        if not word.isdigit():
            self._ungrammatical()
        self.pos += 1
        if int(word) in admissible:
            return int(word)
        self.slipped[self.pos - 1] = True
        return None

    # -- grammar
    def connective(self) -> None:
        word = self._mark(SURFACE)
        phrase = self.phrase_of.get(word)
        if phrase is None:
            self._ungrammatical()
        self.pos += 1
        for tail in phrase[1:]:
            self.expect(tail)

    def line(self, i: int) -> bool:
        """``var = X op Y = V`` of step i on a correct prefix; False right after a wrong value."""
        s, p = self.p.steps[i], self.p.modulus
        x = self.p.values[i]
        self.expect(s.var)
        self.expect("=")
        commutative = s.op != "-"
        first = self.value(SURFACE if commutative else FORK, {x, s.const} if commutative else {x})
        if first is None:
            return False
        self.expect(s.op)
        second = s.const if (first == x or not commutative) else x
        if self.value(FORK, {second}) is None:
            return False
        self.expect("=")
        return self.value(FORK, {apply_op(s.op, x, s.const, p)}) is not None

    def derail(self) -> None:
        """The current position is RECOVERY; everything after it is DERAILED."""
        self.labels[self.pos] = RECOVERY
        if self.w[self.pos] != EOS:
            self._fill_rest(DERAILED, self.pos + 1)
        raise _Stop

    def run(self) -> None:
        steps = self.p.steps
        i, start = 0, True
        while True:
            if start:
                if i == len(steps):
                    return self.final()
                if i:
                    self.connective()
            ok = self.line(i)
            self.in_repair = False
            word = self._word()
            if not ok:
                if word != "wait":
                    self.derail()
                self.labels[self.pos] = RECOVERY
                self.in_repair = True
                self.repair[self.pos] = True
            elif word == "wait":
                self.labels[self.pos] = SURFACE if i + 1 < len(steps) else FORCED
                self.spurious[self.pos] = True
            else:
                i, start = i + 1, True
                continue
            self.pos += 1
            self.expect("fix")
            start = False  # restate line i

    def final(self) -> None:
        self.expect(";")
        self.expect("answer")
        ok = self.value(FORK, {self.p.values[-1]}) is not None
        if ok:
            self.correct = True  # as ``synthetic.check``: the answer, whatever follows
            self.expect(EOS)
        else:  # a wrong final answer: nothing can repair it in this grammar
            self._fill_rest(DERAILED, self.pos)
        raise _Stop

    def result(self) -> TokenLabels:
        try:
            self.run()
        except _Stop:
            pass
        return TokenLabels(self.labels, self.slipped, self.repair, self.spurious, self.bad,
                           bool(self.correct))


def label_words(problem: Problem, words: Sequence[str], *,
                phrases: Sequence[Sequence[str]] = PHRASES) -> TokenLabels:
    """Ground-truth labels of one completion given as words (``"<eos>"`` for the stop token;
    anything after the first eos is NONE). See the module doc for the label kinds."""
    _check_phrases(phrases)
    return _Labeller(problem, words, phrases).result()


def label_rollouts(problems: Sequence[Problem], ids: np.ndarray, completion_mask: np.ndarray,
                   vocab: Sequence[str], *, eos_id: int = 2,
                   phrases: Sequence[Sequence[str]] = PHRASES) -> dict[str, np.ndarray]:
    """Labels of a batch of rollouts in the trainer's layout.

    Args:
      problems: ``[B]`` the problem of every row.
      ids: ``[B, L]`` int token ids (prompt and completion; ``GenerationResult.sequences``).
      completion_mask: ``[B, L]`` bool completion tokens (the eos included), in order.
      vocab: the tokenizer's words (an id past it is an ungrammatical token).

    Returns:
      ``{"labels": [B, L] int8 (NONE off the completion), "slipped", "repair", "spurious",
      "ungrammatical": [B, L] bool, "correct": [B] bool}``.
    """
    ids, cmask = np.asarray(ids), np.asarray(completion_mask, bool)
    if ids.shape != cmask.shape or ids.ndim != 2 or len(problems) != ids.shape[0]:
        raise ValueError(f"ids {ids.shape}, completion_mask {cmask.shape} and {len(problems)} "
                         f"problems do not describe one [B, L] batch")
    out = {k: np.zeros(ids.shape, bool) for k in ("slipped", "repair", "spurious", "ungrammatical")}
    out["labels"] = np.full(ids.shape, NONE, np.int8)
    out["correct"] = np.zeros(ids.shape[0], bool)
    for b, problem in enumerate(problems):
        cols = np.flatnonzero(cmask[b])
        words = [EOS if t == eos_id else (vocab[t] if 0 <= t < len(vocab) else "<unk>")
                 for t in ids[b, cols].tolist()]
        lab = label_words(problem, words, phrases=phrases)
        out["labels"][b, cols] = lab.labels
        out["slipped"][b, cols], out["repair"][b, cols] = lab.slipped, lab.repair
        out["spurious"][b, cols], out["ungrammatical"][b, cols] = lab.spurious, lab.ungrammatical
        out["correct"][b] = lab.correct
    return out
