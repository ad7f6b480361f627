"""The math JSONL reader: real files load; every malformed input is an error naming the file
and line."""

import json
from pathlib import Path

import pytest

from topd_jax.data.jsonl import MathItem, read_math_jsonl, resolve_data_files

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(tmp_path, lines, name="set.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_reads_items_in_order_keeping_extra_fields(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "level": 1}),
            "",
            json.dumps({"id": 7, "problem": "roots?", "answer": ["2", "3"]}),
        ],
    )
    items = read_math_jsonl(p)
    assert items == [MathItem("a", "1+1?", "2"), MathItem("7", "roots?", ("2", "3"))]
    assert items[0].extra == {"level": 1}


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"set.jsonl:2: not valid JSON"),
        ("[1, 2]", r"set.jsonl:2: expected a JSON object"),
        ('{"id": "b", "problem": "p"}', r"set.jsonl:2: missing field\(s\) \['answer'\]"),
        ('{"id": "b", "problem": "", "answer": "1"}', r"set.jsonl:2: field 'problem' is empty"),
        (
            '{"id": "b", "problem": "p", "answer": 1.5}',
            r"set.jsonl:2: field 'answer' must be a string, got float",
        ),
        ('{"id": "b", "problem": "p", "answer": []}', r"set.jsonl:2: field 'answer' is an empty list"),
        ('{"id": "a", "problem": "p", "answer": "1"}', r"set.jsonl:2: id 'a' repeats line 1"),
    ],
)
def test_malformed_line_error_names_file_and_line(tmp_path, line, message):
    p = _write(tmp_path, [json.dumps({"id": "a", "problem": "q", "answer": "0"}), line])
    with pytest.raises(ValueError, match=message):
        read_math_jsonl(p)


def test_empty_and_missing_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no items"):
        read_math_jsonl(_write(tmp_path, ["", "  "]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_math_jsonl(tmp_path / "nope.jsonl")


def test_resolve_data_files_takes_files_and_directories(tmp_path):
    a = _write(tmp_path, ['{"id": "1", "problem": "p", "answer": "1"}'], "b.jsonl")
    b = _write(tmp_path, ['{"id": "1", "problem": "p", "answer": "1"}'], "a.jsonl")
    assert resolve_data_files(f"{tmp_path}") == [b, a]
    assert resolve_data_files(f"{a}, {b}") == [a, b]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        resolve_data_files(f"{a},{tmp_path / 'missing.jsonl'}")
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        resolve_data_files(str(tmp_path / "sub"))


@pytest.mark.parametrize(
    "name,count", [("aime24", 30), ("aime25", 30), ("hmmt25", 30), ("amc23", 40), ("math500", 500)]
)
def test_real_evaluation_sets_load(name, count):
    path = SHARED / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    items = read_math_jsonl(path)
    assert len(items) == count and all(isinstance(i.answer, str) for i in items)
