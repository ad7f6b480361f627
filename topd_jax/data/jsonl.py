"""Reading math problem files: JSONL, one ``{"id", "problem", "answer", ...}`` object a line.

``read_math_jsonl(path)`` is the one reader (the eval command and the training prompt
pipeline both use it); every error names the file and the 1-based line. ``answer`` is a
string, or a list of strings for a multi-value answer (all values required, see
``topd_jax.rewards.math``); integer ids/answers are accepted and turned into strings. Blank
lines are skipped; other fields are kept in ``MathItem.extra``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("id", "problem", "answer")


@dataclass(frozen=True)
class MathItem:
    """One problem. ``answer``: a LaTeX string or a tuple of them (multi-value answer)."""

    id: str
    problem: str
    answer: str | tuple[str, ...]
    extra: Mapping = field(default_factory=dict, compare=False)


def _field_str(value, name: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(
            f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.80}"
        )
    s = str(value)
    if not s.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return s


def parse_math_record(record, where: str) -> MathItem:
    """Validate one decoded JSON object; ``where`` (``"file:line"``) prefixes errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; has {sorted(record)}")
    answer = record["answer"]
    if isinstance(answer, list):
        if not answer:
            raise ValueError(f"{where}: field 'answer' is an empty list")
        answer = tuple(_field_str(a, "answer", where) for a in answer)
    else:
        answer = _field_str(answer, "answer", where)
    extra = {k: v for k, v in record.items() if k not in REQUIRED_FIELDS}
    return MathItem(
        id=_field_str(record["id"], "id", where),
        problem=_field_str(record["problem"], "problem", where),
        answer=answer,
        extra=extra,
    )


def read_math_jsonl(path: str | os.PathLike) -> list[MathItem]:
    """All items of one JSONL file, in file order.

    Raises FileNotFoundError (no such file), ValueError naming ``file:line`` for a malformed
    line, a missing/empty/mistyped field or a repeated id, and ValueError for a file with no
    items.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"math data file {str(p)!r} does not exist or is not a file")
    items: list[MathItem] = []
    first_line: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            item = parse_math_record(record, where)
            if item.id in first_line:
                raise ValueError(f"{where}: id {item.id!r} repeats line {first_line[item.id]}")
            first_line[item.id] = lineno
            items.append(item)
    if not items:
        raise ValueError(f"math data file {str(p)!r} holds no items")
    return items


def resolve_data_files(spec: str) -> list[Path]:
    """``"a.jsonl,dir/,b.jsonl"`` -> the files: each entry a file, or a directory whose
    ``*.jsonl`` files are taken in name order. Errors name the entry that matched nothing."""
    files: list[Path] = []
    for entry in (s.strip() for s in spec.split(",")):
        if not entry:
            continue
        p = Path(entry)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"data directory {entry!r} holds no *.jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {entry!r} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no data files in {spec!r}")
    return files
