"""The embedded demo task: modular arithmetic chains with verifiable answers.

A problem defines a start value and a chain of steps, each applying one operation with a
constant to the previous variable, all modulo a prime ``p`` (default 7)::

    prompt:    a = 3 ; b = a + 2 ; c = 3 * b ; ? c
    solution:  b = 3 + 2 = 5 so c = 5 * 3 = 1 ; answer 1

Solutions have
- **surface-form freedom** that never changes the answer: the connective between steps
  (``so | thus | hence | then``) and the operand order of ``+`` and ``*``;
- **real forks**: one arithmetic slip derails every later value. Because each step is a
  bijection mod a prime (``+c``, ``-c``, ``*c`` with ``c != 0``), a slip at any step
  *always* changes the final answer.

The teacher's and the student's surface styles differ on purpose (different connective and
ordering preferences): their disagreement there is the "false alarm" TOPD should suppress,
while slips are the divergent states it should guide.

Everything is deterministic from a seed (``numpy.random.default_rng``). Numbers are single
tokens, so a word-level tokenizer has a vocabulary of 122 ids (< 128) for any ``p <= 100``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONNECTIVES = ("so", "thus", "hence", "then")
OPS = ("+", "-", "*")
VARS = tuple("abcdefgh")
_ANSWER_RE = re.compile(r"answer\s+(\d+)")
# TAPO construction format (topd_jax.algorithms.tapo_construct.TAGS) plus the correction
# word and the synthesis-prompt word; 6 words so the extended vocabulary is exactly 128.
CONSTRUCTION_WORDS = ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>",
                      "wait", "fix")


# ---------------------------------------------------------------- problems and solutions
@dataclass(frozen=True)
class Step:
    """``var = prev op const`` (``const op prev`` in the prompt when ``const_first``)."""
    var: str
    prev: str
    op: str
    const: int
    const_first: bool


@dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[Step, ...]
    modulus: int

    @property
    def values(self) -> tuple[int, ...]:
        """Correct value of every variable, start first: ``[len(steps) + 1]``."""
        vals = [self.start]
        for s in self.steps:
            vals.append(apply_op(s.op, vals[-1], s.const, self.modulus))
        return tuple(vals)

    @property
    def answer(self) -> str:
        return str(self.values[-1])

    @property
    def prompt(self) -> str:
        parts = [f"a = {self.start}"]
        for s in self.steps:
            expr = f"{s.const} {s.op} {s.prev}" if s.const_first else f"{s.prev} {s.op} {s.const}"
            parts.append(f"{s.var} = {expr}")
        return " ; ".join(parts) + f" ; ? {self.steps[-1].var}"


@dataclass(frozen=True)
class Style:
    """Surface-form preferences: connective probabilities and P(swap operands of + and *)."""
    connective_probs: tuple[float, ...]
    swap_prob: float


TEACHER_STYLE = Style(connective_probs=(0.55, 0.25, 0.1, 0.1), swap_prob=0.2)
STUDENT_STYLE = Style(connective_probs=(0.1, 0.1, 0.4, 0.4), swap_prob=0.6)


def apply_op(op: str, x: int, c: int, modulus: int) -> int:
    if op == "+":
        return (x + c) % modulus
    if op == "-":
        return (x - c) % modulus
    if op == "*":
        return (x * c) % modulus
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def generate_problems(n: int, seed: int | Sequence[int], *, min_steps: int = 2,
                      max_steps: int = 4, modulus: int = 7) -> list[Problem]:
    """``n`` random problems, deterministic in ``seed``."""
    if not _is_prime(modulus) or modulus > 100:
        raise ValueError(f"modulus must be a prime <= 100 (slips must always derail), "
                         f"got {modulus}")
    if not 1 <= min_steps <= max_steps <= len(VARS) - 1:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= {len(VARS) - 1}, got "
                         f"min_steps={min_steps} max_steps={max_steps}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(min_steps, max_steps + 1))
        steps = []
        for i in range(k):
            op = OPS[int(rng.integers(len(OPS)))]
            lo = 2 if op == "*" else 1  # *1 would be a no-op step
            const = int(rng.integers(lo, modulus))
            const_first = op != "-" and bool(rng.random() < 0.5)
            steps.append(Step(VARS[i + 1], VARS[i], op, const, const_first))
        out.append(Problem(int(rng.integers(modulus)), tuple(steps), modulus))
    return out


def make_splits(num_train: int, num_eval: int, seed: int, *, min_steps: int = 2,
                max_steps: int = 4, modulus: int = 7) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out eval problems from disjoint streams; eval prompts never in train."""
    kw = dict(min_steps=min_steps, max_steps=max_steps, modulus=modulus)
    train = generate_problems(num_train, [seed, 0], **kw)
    seen = {p.prompt for p in train}
    pool = generate_problems(4 * num_eval, [seed, 1], **kw)
    evals = [p for p in pool if p.prompt not in seen][:num_eval]
    if len(evals) < num_eval:
        raise ValueError(f"problem space too small for {num_eval} unseen eval problems; "
                         f"raise max_steps or modulus")
    return train, evals


def render_solution(problem: Problem, values: Sequence[int], rng: np.random.Generator,
                    style: Style = TEACHER_STYLE) -> str:
    """Solution text for the given per-variable values ``[len(steps) + 1]`` (the correct
    ones or a slipped chain), with connectives and operand orders drawn from ``style``."""
    lines = []
    for i, s in enumerate(problem.steps):
        x, c = values[i], s.const
        swap = s.op != "-" and rng.random() < style.swap_prob
        expr = f"{c} {s.op} {x}" if swap else f"{x} {s.op} {c}"
        line = f"{s.var} = {expr} = {values[i + 1]}"
        if i:
            line = f"{CONNECTIVES[rng.choice(len(CONNECTIVES), p=style.connective_probs)]} {line}"
        lines.append(line)
    return " ".join(lines) + f" ; answer {values[-1]}"


def reference_solution(problem: Problem, rng: np.random.Generator,
                       style: Style = TEACHER_STYLE) -> str:
    """A correct solution (teacher quality); surface form drawn from ``style``."""
    return render_solution(problem, problem.values, rng, style)


def slipped_values(problem: Problem, step: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Values with an arithmetic slip at ``step`` (0-based): a wrong result there, and every
    later step computed correctly *from the wrong value* (the slip derails the rest)."""
    p, vals = problem.modulus, list(problem.values[:step + 1])
    for i, s in enumerate(problem.steps[step:], start=step):
        v = apply_op(s.op, vals[i], s.const, p)
        if i == step:
            v = (v + int(rng.integers(1, p))) % p  # any nonzero offset: certainly wrong
        vals.append(v)
    return tuple(vals)


def confused_values(problem: Problem, rng: np.random.Generator, confusion: float) -> tuple[int, ...]:
    """Values of a student with a *systematic* misconception: each ``-`` step is computed as
    ``+`` with probability ``confusion`` (a sign confusion: that value is certainly wrong, since
    ``c != 0`` and p is an odd prime), every later step computed from the value written (two
    confused steps can cancel in the answer: ``x - c1 - c2`` vs ``x + c1 + c2``)."""
    p, vals = problem.modulus, [problem.start]
    for s in problem.steps:
        op = "+" if s.op == "-" and rng.random() < confusion else s.op
        vals.append(apply_op(op, vals[-1], s.const, p))
    return tuple(vals)


def noisy_solution(problem: Problem, rng: np.random.Generator, slip_prob: float,
                   style: Style = STUDENT_STYLE, confusion: float = 0.0) -> tuple[str, bool]:
    """A solution that slips at one random step with probability ``slip_prob`` (a random
    wrong value: the right one stays the most likely token) or, with ``confusion`` > 0 and no
    slip, follows ``confused_values`` (a systematic error: above 0.5 the wrong value is the
    most likely one, so a greedy student levels off at the share of problems without ``-``).

    Returns (text, is_correct). Used to warm the demo student up to mediocre accuracy.
    """
    if rng.random() < slip_prob:
        values = slipped_values(problem, int(rng.integers(len(problem.steps))), rng)
        return render_solution(problem, values, rng, style), False
    if confusion > 0:  # no draw when off: the slip-only recipes keep their random streams
        values = confused_values(problem, rng, confusion)
        return render_solution(problem, values, rng, style), values[-1] == problem.values[-1]
    return render_solution(problem, problem.values, rng, style), True


def check(completion: str, answer: str) -> bool:
    """Verifier: the last ``answer N`` in the completion equals ``answer``."""
    found = _ANSWER_RE.findall(completion)
    return bool(found) and found[-1] == str(answer).strip()


# ---------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class SyntheticTokenizer:
    """Word-level tokenizer: specials, the numbers 0..99, variables, operators, words.

    ``construction_words=True`` appends ``CONSTRUCTION_WORDS`` (TAPO's tags, ``wait``,
    ``fix``) after the 122 base words: existing ids are unchanged and the vocabulary is
    exactly 128, so the demo models (``vocab_size: 128``) can learn the format."""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    construction_words: bool = False

    @property
    def vocab(self) -> tuple[str, ...]:
        words = ("<pad>", "<bos>", "<eos>") + tuple(str(i) for i in range(100))
        words = words + VARS + OPS + ("=", ";", "?", "answer") + CONNECTIVES
        return words + CONSTRUCTION_WORDS if self.construction_words else words

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Whitespace-split words to ids (``[bos] + ids``); unknown word -> ValueError."""
        index, ids = self._index(), [self.bos_id] if add_bos else []
        for w in text.split():
            if w not in index:
                raise ValueError(f"word {w!r} is not in the synthetic vocabulary")
            ids.append(index[w])
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids to text; stops at the first eos when ``skip_special``."""
        vocab, words = self.vocab, []
        for i in map(int, ids):
            if skip_special and i == self.eos_id:
                break
            if skip_special and i in (self.pad_id, self.bos_id):
                continue
            # A model's vocabulary is padded past the tokenizer's (128 > 122): a sampled id
            # beyond it is not a word; it decodes to <unk> (never a verifiable answer).
            words.append(vocab[i] if 0 <= i < len(vocab) else "<unk>")
        return " ".join(words)


def supervised_arrays(tok: SyntheticTokenizer, prompts: Sequence[str],
                      solutions: Sequence[str], prompt_len: int = 32,
                      completion_len: int = 64) -> dict[str, np.ndarray]:
    """Teacher-forcing batch in rollout layout: prompt left-padded to ``prompt_len``, then
    solution + eos right-padded to ``completion_len``.

    Returns ``input_ids [N, P+C] int32``, ``attention_mask [N, P+C] bool``, and
    ``loss_mask [N, P+C] bool``, True at the tokens that are prediction targets (solution
    and eos): the logits at position t - 1 are scored against ``input_ids[:, t]``.
    """
    n, total = len(prompts), prompt_len + completion_len
    ids = np.full((n, total), tok.pad_id, np.int32)
    attn, target = np.zeros((n, total), bool), np.zeros((n, total), bool)
    for i, (p, s) in enumerate(zip(prompts, solutions, strict=True)):
        p_ids, s_ids = tok.encode(p), tok.encode(s, add_bos=False) + [tok.eos_id]
        if len(p_ids) > prompt_len or len(s_ids) > completion_len:
            raise ValueError(f"example {i} too long: prompt {len(p_ids)} > {prompt_len} or "
                             f"solution {len(s_ids)} > {completion_len} tokens")
        ids[i, prompt_len - len(p_ids):prompt_len] = p_ids
        ids[i, prompt_len:prompt_len + len(s_ids)] = s_ids
        attn[i, prompt_len - len(p_ids):prompt_len + len(s_ids)] = True
        target[i, prompt_len:prompt_len + len(s_ids)] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": target}


def to_records(problems: Sequence[Problem], prefix: str = "synthetic") -> list[dict[str, str]]:
    """``{"id", "problem", "answer"}`` records: the prompt-file schema (topd_jax.data.jsonl)."""
    return [{"id": f"{prefix}-{i}", "problem": p.prompt, "answer": p.answer}
            for i, p in enumerate(problems)]



# ---------------------------------------------------------------- TAPO construction examples
# On this task the first error of a wrong rollout is known exactly, so cold-start examples
# of the construction format (TAPO.md, "Cold start") are produced programmatically.
# Words used: ``SyntheticTokenizer(construction_words=True)``.
_STEP_LINE_RE = re.compile(r"(?<!\S)([a-h])\s+=\s+(\d+)\s+([-+*])\s+(\d+)\s+=\s+(\d+)(?!\S)")


def first_error_step(problem: Problem, values: Sequence[int]) -> int | None:
    """Index of the first step whose value differs from the correct one, or None.

    ``values``: ``[len(steps) + 1]`` per-variable values, start first (as given to
    ``render_solution``; e.g. ``slipped_values``).
    """
    if len(values) != len(problem.steps) + 1:
        raise ValueError(f"values has {len(values)} entries, the problem needs "
                         f"{len(problem.steps) + 1} (start + one per step)")
    for i, (v, ok) in enumerate(zip(values[1:], problem.values[1:])):
        if int(v) != ok:
            return i
    return None


def _first_error_line(problem: Problem, text: str) -> tuple[int, int, int] | None:
    """(step, wrong value, end offset of the line in ``text``) of the first line, in text
    order, ``var = x op c = v`` with ``var`` a step variable and ``v`` not its correct
    value; lines for other variables and any other text are ignored."""
    if not isinstance(text, str):
        return None
    for m in _STEP_LINE_RE.finditer(text):
        step = VARS.index(m.group(1)) - 1
        if 0 <= step < len(problem.steps) and int(m.group(5)) != problem.values[step + 1]:
            return step, int(m.group(5)), m.end()
    return None


def first_error(problem: Problem, completion_text: str) -> int | None:
    """The step index of the first wrong ``var = x op c = v`` line of a completion, or None
    (no wrong line: a correct solution, or text with no parsable step). Never raises."""
    found = _first_error_line(problem, completion_text)
    return None if found is None else found[0]


def synthetic_synthesis_prompt(problem: Problem | str, wrong_text: str, right_text: str) -> str:
    """The construction request in the synthetic vocabulary:
    ``fix <problem prompt> ; <wrong solution> ; <right solution>`` (every part ends in a
    recognisable way: the prompt with ``? var``, the solutions with ``answer N``; the 128-id
    budget leaves no room for separate "wrong"/"right" words)."""
    prompt = problem if isinstance(problem, str) else problem.prompt  # the trainer has the text only
    return f"fix {prompt} ; {' '.join(wrong_text.split())} ; {' '.join(right_text.split())}"


def _step_line(problem: Problem, step: int, rng: np.random.Generator, style: Style) -> str:
    """The correct ``var = expr = value`` line of ``step`` (operand order drawn from style)."""
    s, x = problem.steps[step], problem.values[step]
    swap = s.op != "-" and rng.random() < style.swap_prob
    expr = f"{s.const} {s.op} {x}" if swap else f"{x} {s.op} {s.const}"
    return f"{s.var} = {expr} = {problem.values[step + 1]}"


def construction_target(problem: Problem, wrong_text: str, rng: np.random.Generator,
                        style: Style = STUDENT_STYLE) -> str:
    """The ideal construction for a wrong solution, in the tag format::

        <analysis> c = 2 </analysis> <reconstruction> b = 3 + 2 = 5 so c = 5 * 3 = 2
        wait c = 5 * 3 = 1 hence d = 1 + 4 = 5 ; answer 5 </reconstruction>

    The analysis names the first wrong line's claim (``var = wrong value``). The
    reconstruction repeats ``wrong_text`` verbatim (words re-joined by single spaces, so
    the token ids are the same) up to and including that line, then ``wait`` (the
    micro-reflection), the corrected line, the remaining steps computed correctly and
    ``; answer N``. Connectives and operand orders of the new lines are drawn from
    ``style`` (default: the student's, whose rollouts these are).

    Raises ValueError if ``wrong_text`` has no wrong step line (e.g. it is correct).
    """
    found = _first_error_line(problem, wrong_text)
    if found is None:
        raise ValueError(f"no wrong step line in {wrong_text!r} for problem {problem.prompt!r}")
    step, wrong_value, end = found
    lines = [" ".join(wrong_text[:end].split()), "wait", _step_line(problem, step, rng, style)]
    for i in range(step + 1, len(problem.steps)):
        conn = CONNECTIVES[rng.choice(len(CONNECTIVES), p=style.connective_probs)]
        lines += [conn, _step_line(problem, i, rng, style)]
    recon = " ".join(lines) + f" ; answer {problem.answer}"
    var = problem.steps[step].var
    return (f"<analysis> {var} = {wrong_value} </analysis> "
            f"<reconstruction> {recon} </reconstruction>")
