"""``\\boxed{...}`` extraction: pure string scanning, linear in the text length.

Rules (documented in README, "Grading and evaluation"):
- a box is ``\\boxed{`` or ``\\fbox{`` (whitespace allowed before the brace), closed by the
  matching brace; escaped braces ``\\{`` / ``\\}`` do not count toward nesting, and a
  backslash pair ``\\\\`` is one escape (so ``\\\\{`` opens a group);
- only top-level boxes count: ``\\boxed{\\boxed{5}}`` is one box with content ``\\boxed{5}``;
- the answer is the LAST top-level box. If it never closes (the output was cut off inside
  the box), there is no answer: an earlier box is a draft the model moved past, so grading it
  would reward an answer the model did not give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class BoxScan:
    """All top-level boxes of a text.

    ``boxes``: contents of the closed top-level boxes, in order.
    ``unterminated``: True when the last box opened never closes (it is not in ``boxes``).
    """

    boxes: tuple[str, ...]
    unterminated: bool


def _match_close(text: str, start: int) -> int:
    """Index of the brace closing the group whose content starts at ``start``, or -1."""
    depth = 1
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escape pair: \{ \} \\ or a command's first letter
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def scan_boxes(text: str) -> BoxScan:
    """Find every top-level box in ``text`` (one left-to-right pass)."""
    boxes: list[str] = []
    pos = 0
    while True:
        m = _BOX_OPEN.search(text, pos)
        if m is None:
            return BoxScan(tuple(boxes), unterminated=False)
        close = _match_close(text, m.end())
        if close < 0:
            return BoxScan(tuple(boxes), unterminated=True)
        boxes.append(text[m.end() : close])
        pos = close + 1


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{}`` in ``text``, stripped; None if there is
    none, or if the last one is unterminated."""
    scan = scan_boxes(text)
    if scan.unterminated or not scan.boxes:
        return None
    return scan.boxes[-1].strip()
