"""TAPO construction pieces (TAPO.md steps 3-4), plain Python/NumPy, no JAX:

    sel    = select_pairs(correct [P, G], rng)            # DCS gate + m_max -> Selection
    prompt = task.synthesis_prompt(problem, wrong, right)  # what the policy is asked (data.tasks)
    parsed = parse_construction(generated_text)           # Parsed | Failure(reason)
    sp     = splice(wrong_ids, recon_ids, min_prefix=k)   # Spliced | Failure(reason)

Failures are values, never exceptions: each carries a short ``reason`` code (one of
``FAILURE_REASONS``) so the trainer can drop and count them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

ANALYSIS_OPEN, ANALYSIS_CLOSE = "<analysis>", "</analysis>"
RECON_OPEN, RECON_CLOSE = "<reconstruction>", "</reconstruction>"
TAGS = (ANALYSIS_OPEN, ANALYSIS_CLOSE, RECON_OPEN, RECON_CLOSE)
SPLICE_MODES = ("splice", "text")
_MAX_BACKOFF = 16  # splice_text: how many shorter prefixes to try before k = 0

FAILURE_REASONS = (
    "not_text",              # the input is not a str
    "missing_analysis",      # an <analysis> or </analysis> tag is absent
    "missing_reconstruction",  # <reconstruction> is absent
    "unterminated",          # <reconstruction> opened, never closed (typically truncation)
    "duplicate_tag",         # a tag occurs more than once
    "nested_tags",           # one block's tag inside the other block
    "wrong_order",           # reconstruction before analysis, or a close before its open
    "text_between_blocks",   # non-whitespace between </analysis> and <reconstruction>
    "trailing_text",         # non-whitespace after </reconstruction>
    "empty_analysis",
    "empty_reconstruction",
    "prefix_mismatch",       # splice: shared prefix shorter than min_prefix
    "no_new_tokens",         # splice: the reconstruction only repeats the wrong rollout
    "retokenize_mismatch",   # splice_text: no spliced ids decode back to the text
)


@dataclass(frozen=True)
class Failure:
    """A dropped construction; ``reason`` is one of ``FAILURE_REASONS``."""
    reason: str


# ---------------------------------------------------------------------------
# Difficulty-aware candidate selection (DCS)
# ---------------------------------------------------------------------------


class Pair(NamedTuple):
    """One construction job: indices within prompt ``prompt``'s group of G rollouts (the
    rollout row in a ``[P * G]`` batch laid out prompt-major is ``prompt * G + wrong``)."""
    prompt: int
    wrong: int
    right: int


@dataclass(frozen=True)
class Selection:
    """``pairs`` (prompt-major order) and ``gate_passed [P] bool`` (the DCS gate per
    prompt). Iterating over it or ``len`` of it reads ``pairs``, so it can be used where a
    ``list[Pair]`` is expected."""
    pairs: tuple[Pair, ...]
    gate_passed: np.ndarray

    @property
    def gate_fraction(self) -> float:
        """Fraction of prompts passing the DCS gate (0 for an empty batch)."""
        return float(np.mean(self.gate_passed)) if self.gate_passed.size else 0.0

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def select_pairs(
    correct: np.ndarray,
    rng: np.random.Generator,
    *,
    n_pos: int = 2,
    n_neg: int = 4,
    m_max: int = 4,
) -> Selection:
    """Difficulty-aware candidate selection (TAPO step 3).

    A prompt passes the gate iff it has at least ``n_pos`` right and ``n_neg`` wrong
    rollouts (the "zone of proximal development": hard enough to fail often, easy enough
    to have right references). For each passing prompt, min(m_max, |N|) wrong rollouts are
    drawn without replacement, each paired with a right rollout drawn uniformly (with
    replacement across the pairs of a prompt).

    Args:
      correct: ``[P, G]`` bool rewards (True = right).
      rng: NumPy generator; the only source of randomness.
      n_pos, n_neg: gate thresholds, both >= 1. m_max: >= 0 pairs per prompt at most.

    Returns:
      ``Selection`` with ``pairs`` (wrong indices ascending within a prompt) and
      ``gate_passed [P]``.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.dtype != bool:
        raise ValueError(f"correct must be a [prompts, group] bool array, got {correct.dtype} "
                         f"{correct.shape}")
    if n_pos < 1 or n_neg < 1 or m_max < 0:
        raise ValueError(f"need n_pos >= 1, n_neg >= 1, m_max >= 0; got n_pos={n_pos}, "
                         f"n_neg={n_neg}, m_max={m_max}")
    gate = (correct.sum(1) >= n_pos) & ((~correct).sum(1) >= n_neg)
    pairs = []
    for p in np.flatnonzero(gate):
        right, wrong = np.flatnonzero(correct[p]), np.flatnonzero(~correct[p])
        chosen = np.sort(rng.choice(wrong, size=min(m_max, len(wrong)), replace=False))
        partners = rng.choice(right, size=len(chosen), replace=True)
        pairs.extend(Pair(int(p), int(w), int(r)) for w, r in zip(chosen, partners))
    return Selection(tuple(pairs), gate)


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A well-formed construction: both blocks' contents, stripped of surrounding
    whitespace, and ``reconstruction_span = (start, end)`` char offsets of the stripped
    reconstruction in the parsed text."""
    analysis: str
    reconstruction: str
    reconstruction_span: tuple[int, int]


def _content(text: str, start: int, end: int) -> tuple[str, int, int]:
    """``text[start:end]`` stripped, with its offsets in ``text``."""
    body = text[start:end]
    lead = len(body) - len(body.lstrip())
    stripped = body.strip()
    return stripped, start + lead, start + lead + len(stripped)


def parse_construction(text: str) -> Parsed | Failure:
    """Parse ``<analysis>…</analysis><reconstruction>…</reconstruction>``; never raises.

    Rules: each of the four tags exactly once (case-sensitive), in that order; the blocks
    do not nest; only whitespace between the blocks and after ``</reconstruction>``; both
    contents non-empty after stripping whitespace. Any text *before* ``<analysis>`` is
    ignored (a preamble or a think block is harmless, while trailing text usually means
    the model kept going). A tag name inside a block (e.g. quoting ``<analysis>``) counts
    as a duplicate. Linear in ``len(text)``.
    """
    if not isinstance(text, str):
        return Failure("not_text")
    counts = {tag: text.count(tag) for tag in TAGS}
    if any(c > 1 for c in counts.values()):
        return Failure("duplicate_tag")
    if not (counts[ANALYSIS_OPEN] and counts[ANALYSIS_CLOSE]):
        return Failure("missing_analysis")
    if not counts[RECON_OPEN]:
        return Failure("missing_reconstruction")
    if not counts[RECON_CLOSE]:
        return Failure("unterminated")
    a0, a1 = text.find(ANALYSIS_OPEN), text.find(ANALYSIS_CLOSE)
    r0, r1 = text.find(RECON_OPEN), text.find(RECON_CLOSE)
    if a0 < r0 < a1 or r0 < a0 < r1 or a0 < r1 < a1 or r0 < a1 < r1:
        return Failure("nested_tags")
    if not (a0 < a1 < r0 < r1):
        return Failure("wrong_order")
    if text[a1 + len(ANALYSIS_CLOSE):r0].strip():
        return Failure("text_between_blocks")
    if text[r1 + len(RECON_CLOSE):].strip():
        return Failure("trailing_text")
    analysis, _, _ = _content(text, a0 + len(ANALYSIS_OPEN), a1)
    if not analysis:
        return Failure("empty_analysis")
    recon, start, end = _content(text, r0 + len(RECON_OPEN), r1)
    if not recon:
        return Failure("empty_reconstruction")
    return Parsed(analysis, recon, (start, end))


# ---------------------------------------------------------------------------
# Splicing the reconstruction onto the wrong rollout's own tokens
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spliced:
    """The constructed trajectory's completion ids; ``ids[:prefix_len]`` are the wrong
    rollout's own tokens (in ``"text"`` mode: the length of the shared prefix, logged)."""
    ids: tuple[int, ...]
    prefix_len: int

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prefix_len


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def splice(
    wrong_ids: Sequence[int],
    recon_ids: Sequence[int],
    *,
    mode: str = "splice",
    min_prefix: int = 0,
) -> Spliced | Failure:
    """The constructed trajectory from token ids (TAPO step 4).

    ``"splice"`` (default): n = the longest common prefix of ``wrong_ids`` and
    ``recon_ids``; the result is ``wrong_ids[:n] + recon_ids[n:]`` with ``prefix_len = n``,
    and n < ``min_prefix`` is ``Failure("prefix_mismatch")`` (the reconstruction did not
    reproduce the wrong reasoning). The id sequence equals ``recon_ids`` by construction;
    what the mode adds is the verification. When the reconstruction is only known as
    *text* (re-tokenising may split the shared prefix differently from the policy's
    sample), use ``splice_text``, which keeps the policy's own tokens.
    ``"text"``: trust the re-typed reconstruction: ids = ``recon_ids``, ``prefix_len`` = n
    for logging only, ``min_prefix`` not enforced.

    Both modes: empty ``recon_ids`` -> ``"empty_reconstruction"``; a reconstruction that
    is a prefix of the wrong rollout (nothing new to learn) -> ``"no_new_tokens"``.
    Never raises for sequences of ints.
    """
    if mode not in SPLICE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {SPLICE_MODES}")
    wrong, recon = [int(i) for i in wrong_ids], [int(i) for i in recon_ids]
    if not recon:
        return Failure("empty_reconstruction")
    n = common_prefix_len(wrong, recon)
    if n == len(recon):
        return Failure("no_new_tokens")
    if mode == "text":
        return Spliced(tuple(recon), n)
    if n < min_prefix:
        return Failure("prefix_mismatch")
    return Spliced(tuple(wrong[:n] + recon[n:]), n)


def splice_text(
    wrong_ids: Sequence[int],
    recon_text: str,
    *,
    decode: Callable[[Sequence[int]], str],
    encode: Callable[[str], Sequence[int]],
    min_prefix: int = 0,
) -> Spliced | Failure:
    """Splice when the reconstruction is text: keep the wrong rollout's own tokens.

    k = the largest token count such that ``decode(wrong_ids[:k])`` is a prefix of
    ``recon_text`` (binary search, O(log len) decodes), then the result
    ``wrong_ids[:k] + encode(recon_text[len(decode(wrong_ids[:k])):])`` must decode back
    to ``recon_text``; if it does not (a token cut mid-word: "1" against "10" with a
    word-level tokenizer, an eos that ``decode`` skips, half a UTF-8 character), k is
    lowered, at most ``_MAX_BACKOFF`` times, then k = 0 is tried. ``prefix_len = k``.
    ``encode`` must not add special tokens; ``decode`` and ``recon_text`` must agree on
    whitespace (strip both the same way). Failures as in ``splice``, plus
    ``"retokenize_mismatch"`` when no candidate decodes back to the text. Never raises
    for a str and int ids (unless ``encode``/``decode`` do).
    """
    wrong = [int(i) for i in wrong_ids]
    if not isinstance(recon_text, str):
        return Failure("not_text")
    if not recon_text.strip():
        return Failure("empty_reconstruction")

    def fits(k: int) -> bool:
        return recon_text.startswith(decode(wrong[:k]))

    lo, hi = 0, len(wrong)  # invariant: fits(lo) (decode of nothing is "")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    candidates = list(range(lo, max(lo - _MAX_BACKOFF, 0) - 1, -1)) + ([0] if lo > _MAX_BACKOFF else [])
    for k in candidates:
        head = decode(wrong[:k])
        if not recon_text.startswith(head):
            continue
        rest = recon_text[len(head):]
        if not rest.strip():
            return Failure("no_new_tokens")
        ids = tuple(wrong[:k]) + tuple(int(i) for i in encode(rest))
        if decode(ids) != recon_text:
            continue
        if k < min_prefix:
            return Failure("prefix_mismatch")
        return Spliced(ids, k)
    return Failure("retokenize_mismatch")
