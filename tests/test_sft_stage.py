"""``algorithm=sft``: supervised training on the files' responses (TAPO's cold-start stage)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from topd_jax.data.tokenizer import build_qwen_tokenizer
from topd_jax.config.loader import load_config
from topd_jax.train.loop import train
from topd_jax.train.setup import RunSetupError, plan_run


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_qwen_tokenizer().save_pretrained(out)
    return out


def _data(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, tokenizer_dir, data, *extra):
    student = ["student.vocab_size=151936", "student.hidden_size=16", "student.num_layers=1",
               "student.num_heads=2", "student.num_kv_heads=1", "student.head_dim=8",
               "student.intermediate_size=32", "student.max_position_embeddings=256"]
    return load_config(None, student + [
        "algorithm=sft", f"data.train_files=[{data}]", f"data.tokenizer={tokenizer_dir}", "data.template=plain",
        "data.prompts_per_step=2", "data.max_prompt_len=16", "data.shuffle=false", "rollout.max_new_tokens=12",
        "steps=6", "optim.lr=3e-2", "optim.warmup_fraction=0", "optim.min_lr=3e-2", f"output_dir={tmp_path}/run",
        "logging.progress_bar=false", "logging.stdout=false", "logging.tensorboard=false",
        "eval.at_start=false", "eval.at_end=false", "checkpoint.export_hf=false", *extra])


def test_sft_lowers_the_cross_entropy_of_the_responses(tmp_path, tokenizer_dir):
    data = _data(tmp_path / "sft.jsonl", [
        {"id": "a", "problem": "What is 2 + 2?", "answer": "4", "response": "\\boxed{4}"},
        {"id": "b", "problem": "What is 3 + 3?", "answer": "6",
         "response": "A very long response that will not fit in twelve tokens at all, so it is cut."}])
    cfg = _cfg(tmp_path, tokenizer_dir, data)
    result = train(cfg)
    ce = [r["ce"] for r in result.history]
    assert all(np.isfinite(ce)) and (np.diff(ce) < 0).all() and ce[-1] < ce[0] - 1.0
    assert result.history[0]["truncated_responses"] == 0.5  # the second response is cut
    assert "token_kl" not in result.history[0]  # no teacher anywhere


def test_sft_file_without_a_response_names_the_file_and_id(tmp_path, tokenizer_dir):
    data = _data(tmp_path / "bad.jsonl", [
        {"id": "a", "problem": "p", "answer": "1", "response": "r"},
        {"id": "b", "problem": "q", "answer": "2"}])
    with pytest.raises(RunSetupError, match=r"bad.jsonl id b: field 'response'"):
        plan_run(_cfg(tmp_path, tokenizer_dir, data))
    with pytest.raises(RunSetupError, match=r"field 'target'"):
        plan_run(_cfg(tmp_path, tokenizer_dir, data, "data.response_field=target"))
