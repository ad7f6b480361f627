"""Prompt pipeline: padding layout, length filter, seeded shuffling, exact resume, errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from topd_jax.data.prompts import PromptLoader, collate, load_prompts, read_records
from topd_jax.data.synthetic import SyntheticTokenizer, generate_problems, to_records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class WordTok:
    """Whitespace 'tokenizer': id = 3 + hash of the word mod 1000 (deterministic)."""
    pad_id = 0

    def encode(self, text):
        return [3 + sum(map(ord, w)) % 1000 for w in text.split()]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _data(tmp_path, n=20):
    rows = [{"id": i, "problem": " ".join(["w"] * (1 + i % 7)) + f" q{i}", "answer": str(i)}
            for i in range(n)]
    return _write(tmp_path / "p.jsonl", rows)


def _loader(examples, **kw):
    args = dict(batch_size=4, prompt_len=8, pad_id=0, seed=0)
    return PromptLoader(examples, **(args | kw))


def test_batches_are_left_padded_with_masks_and_answers(tmp_path):
    ex, _ = load_prompts([_data(tmp_path)], lambda p: "Q: " + p, WordTok(), 8)
    b = collate(ex[:3], 8, pad_id=0)
    assert b["prompt_ids"].shape == (3, 8) and b["prompt_ids"].dtype == np.int32
    assert b["prompt_mask"].dtype == bool and b["answers"] == ["0", "1", "2"]
    for i in range(3):
        n = len(ex[i].ids)
        assert list(b["prompt_ids"][i, 8 - n:]) == list(ex[i].ids)
        assert (b["prompt_ids"][i, :8 - n] == 0).all()
        assert not b["prompt_mask"][i, :8 - n].any() and b["prompt_mask"][i, 8 - n:].all()
    assert ex[0].ids == tuple(WordTok().encode("Q: w q0"))  # the template was applied


def test_long_prompts_are_skipped_and_counted(tmp_path):
    ex, stats = load_prompts([_data(tmp_path)], lambda p: p, WordTok(), max_prompt_len=4)
    lengths = [1 + i % 7 + 1 for i in range(20)]
    assert stats.total == 20 and stats.kept == sum(n <= 4 for n in lengths) == len(ex)
    assert stats.skipped_too_long == sum(n > 4 for n in lengths)
    assert all(len(e.ids) <= 4 for e in ex)
    with pytest.raises(ValueError, match="all 20 prompts .* longer than max_prompt_len=1"):
        load_prompts([_data(tmp_path)], lambda p: p, WordTok(), max_prompt_len=1)


def _answers(loader, n):
    return [tuple(next(loader)["answers"]) for _ in range(n)]


def test_shuffling_is_seeded_and_differs_per_epoch(tmp_path):
    ex, _ = load_prompts([_data(tmp_path)], lambda p: p, WordTok(), 8)
    a, b = _answers(_loader(ex, seed=1), 10), _answers(_loader(ex, seed=1), 10)
    assert a == b and a != _answers(_loader(ex, seed=2), 10)
    epoch1, epoch2 = sum(a[:5], ()), sum(a[5:], ())  # 20 examples / batch 4 = 5 batches
    assert sorted(epoch1, key=int) == [str(i) for i in range(20)] == sorted(epoch2, key=int)
    assert epoch1 != epoch2
    plain = sum(_answers(_loader(ex, shuffle=False), 5), ())
    assert plain == tuple(str(i) for i in range(20))


def test_resume_from_saved_state_continues_exactly(tmp_path):
    ex, _ = load_prompts([_data(tmp_path)], lambda p: p, WordTok(), 8)
    straight = _loader(ex, seed=3)
    ref = [next(straight) for _ in range(12)]  # crosses two epoch boundaries
    first = _loader(ex, seed=3)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as stored in a checkpoint
    resumed = _loader(ex, seed=3)
    resumed.set_state(state)
    for want in ref[7:]:
        got = next(resumed)
        assert got["answers"] == want["answers"]
        np.testing.assert_array_equal(got["prompt_ids"], want["prompt_ids"])


def test_finite_epochs_stop_and_shards_partition_the_data(tmp_path):
    ex, _ = load_prompts([_data(tmp_path)], lambda p: p, WordTok(), 8)
    assert len(list(_loader(ex, epochs=2, batch_size=3))) == (2 * 20) // 3
    shards = [sum(_answers(_loader(ex, shard_index=i, shard_count=2, batch_size=5,
                                   shuffle=False), 2), ()) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1], key=int) == [str(i) for i in range(20)]
    with pytest.raises(ValueError, match="10 prompts on this shard < batch_size=11"):
        _loader(ex, shard_count=2, batch_size=11)


@pytest.mark.parametrize("rows, message", [
    (['{"id": 1, "problem": "a", "answer": "1"}', '{"problem": "b", "answer": '],
     r"p.jsonl:2: not valid JSON"),
    ([{"id": 1, "problem": "a", "answer": "1"}, "", {"id": 2, "problem": "b"}],
     r"p.jsonl:3: missing field\(s\) \['answer'\]"),
    ([{"id": 1, "question": "a", "answer": "1"}], r"p.jsonl:1: missing field\(s\) \['problem'\]"),
    (['[1, 2]'], r"p.jsonl:1: expected a JSON object, got list"),
    ([{"id": 1, "problem": [3], "answer": "1"}], r"p.jsonl:1: field 'problem' must be a string"),
    ([], r"p.jsonl' holds no items"),
    (["", "  "], r"p.jsonl' holds no items"),
])
def test_malformed_files_are_errors_naming_file_and_line(tmp_path, rows, message):
    path = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_prompts([path], lambda p: p, WordTok(), 8)


def test_missing_file_and_no_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_records(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="no prompt files"):
        load_prompts([], lambda p: p, WordTok(), 8)


def test_multi_value_answers_come_through_as_tuples(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"id": "x", "problem": "a b", "answer": ["1", "-1"]}])
    ex, _ = load_prompts([path], lambda p: p, WordTok(), 8)
    assert collate(ex, 4, 0)["answers"] == [("1", "-1")]


def test_synthetic_task_round_trips_through_the_pipeline(tmp_path):
    probs = generate_problems(12, 0)
    path = _write(tmp_path / "syn.jsonl", to_records(probs))
    tok = SyntheticTokenizer()
    ex, stats = load_prompts([path], lambda p: p, tok, 32)
    assert stats.skipped_too_long == 0
    batch = next(_loader(ex, prompt_len=32, pad_id=tok.pad_id, shuffle=False))
    assert [tok.decode(r) for r in batch["prompt_ids"]] == [p.prompt for p in probs[:4]]
    assert batch["answers"] == [p.answer for p in probs[:4]]


@pytest.mark.skipif(not (SHARED / "math_train.jsonl").exists(), reason="no shared data")
def test_real_math_train_file_loads():
    ex, stats = load_prompts([SHARED / "math_train.jsonl"], lambda p: p, WordTok(), 64)
    assert stats.total == stats.kept + stats.skipped_too_long and stats.kept > 1000
    assert all(e.answer for e in ex[:100])


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None or
                    not (SHARED / "deepscaler_sub/dsr_sub.parquet").exists(),
                    reason="needs pyarrow and the shared parquet file")
def test_real_parquet_file_loads():
    # verl format (prompt messages + reward_model.ground_truth); this real file has one row
    # with an empty ground truth (SOURCES.md: index 265), which must be named, not trained on.
    with pytest.raises(ValueError, match=r"dsr_sub.parquet:row 265: field 'answer' is empty"):
        read_records(SHARED / "deepscaler_sub/dsr_sub.parquet")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_verl_parquet_rows_map_to_problem_and_answer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "verl.parquet"
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 1+1?"}],
             "reward_model": {"ground_truth": "2", "style": "rule"}}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    (item,) = read_records(path)
    assert (item.id, item.problem, item.answer) == ("verl-0", "What is 1+1?", "2")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_rows_without_problem_or_verl_fields_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["1+1?"], "answer": ["2"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet:row 0: missing field\(s\) \['problem'\]"):
        read_records(path)
