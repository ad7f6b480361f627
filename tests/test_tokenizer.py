"""The offline tokenizer: a real Qwen2.5/Qwen3 tokenizer built from qwen.tiktoken, checked
against tiktoken itself; loading errors for hub ids and missing directories."""

import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from topd_jax.data.tokenizer import (
    QWEN_ADDED_TOKENS,
    QWEN_PRETOKENIZE_PATTERN,
    build_qwen_tokenizer,
    default_qwen_tokenizer_dir,
    load_tokenizer,
    qwen_tiktoken_file,
)


@pytest.fixture(scope="module")
def tok():
    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_enc():
    import tiktoken  # the [test] extra
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_file()))
    return tiktoken.Encoding(
        "qwen", pat_str=QWEN_PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )


def test_special_token_ids_match_qwen(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert len(tok) == 151643 + len(QWEN_ADDED_TOKENS) == 151669
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_think_tags_survive_skip_special_tokens_but_chat_markers_do_not(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\n4<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\n4"


def test_encode_adds_no_bos_or_eos(tok):
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False) == [14990]


def test_matches_tiktoken_on_real_problems(tok, tiktoken_enc):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "hmmt25.jsonl"
    texts = [json.loads(line)["problem"] for line in data.open()] if data.is_file() else []
    texts += ["  two  spaces\t\ttabs\r\n\r\nCRLF", "1234567 digits split one by one", "你好，世界 🙂"]
    for text in texts:
        assert tok.encode(text) == tiktoken_enc.encode(text), text[:60]


@given(st.text(max_size=60))
@settings(max_examples=150, deadline=None)
def test_matches_tiktoken_and_round_trips_on_random_text(tok, tiktoken_enc, text):
    # added tokens (<|im_end|>, <think>, ...) are matched in text, as in Qwen's own tokenizer
    assume(not any(t in unicodedata.normalize("NFC", text) for t, _ in QWEN_ADDED_TOKENS))
    nfc = unicodedata.normalize("NFC", text)
    ids = tok.encode(text)
    assert ids == tiktoken_enc.encode(nfc)
    assert tok.decode(ids) == nfc


def test_build_is_cached_on_disk(tok):
    stamp = default_qwen_tokenizer_dir() / "topd_build.json"
    before = stamp.stat().st_mtime_ns
    again = build_qwen_tokenizer()
    assert stamp.stat().st_mtime_ns == before
    assert again.encode("x^2") == tok.encode("x^2")


def test_load_tokenizer_reads_a_saved_directory(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path).encode("\\boxed{42}") == tok.encode("\\boxed{42}")


def test_hub_id_is_refused_with_a_download_hint():
    with pytest.raises(FileNotFoundError, match="hub id.*offline"):
        load_tokenizer("Qwen/Qwen3-1.7B")


def test_missing_directory_and_empty_directory_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
