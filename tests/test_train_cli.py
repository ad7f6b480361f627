"""``python -m topd_jax.train`` on bad input: clear errors (exit 2) and nothing written."""

import json

import numpy as np

import pytest

from tests._train_tiny import TINY
from topd_jax.train.__main__ import main

WORDS = "a b c d 1 2 3 + = ? what is".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level HF tokenizer with Qwen's stop tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", "<|im_end|>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(d))
    return d


def _run(capsys, tmp_path, *overrides):
    out = tmp_path / "out"
    rc = main(TINY + [f"output_dir={out}", *overrides])
    err = capsys.readouterr().err
    return rc, err, out


def test_unknown_key_names_the_key_and_the_nearest_valid_one(capsys, tmp_path):
    rc, err, out = _run(capsys, tmp_path, "optim.lrr=1e-3")
    assert rc == 2 and "optim.lrr" in err and "did you mean 'optim.lr'" in err
    assert not out.exists()


def test_missing_model_path_is_named_and_nothing_is_written(capsys, tmp_path):
    missing = tmp_path / "no_such_model"
    rc, err, out = _run(capsys, tmp_path, "student.vocab_size=none", "student.hidden_size=none",
                        "student.num_layers=none", f"student.path={missing}")
    assert rc == 2 and "student.path" in err and str(missing) in err
    assert not out.exists()


def test_teacher_student_vocab_mismatch_is_a_clear_error(capsys, tmp_path):
    rc, err, out = _run(capsys, tmp_path, "teacher.vocab_size=4096")
    assert rc == 2 and "vocabulary mismatch" in err and "4096" in err and "128" in err
    assert not out.exists()


@pytest.mark.parametrize("content, expect", [
    ("", "holds no items"),
    ('{"id": "1", "problem": "1 + 2", "answer": "3"}\n{"id": "2", "problem": oops}\n', ":2: not valid JSON"),
    ('{"id": "1", "problem": "1 + 2"}\n', ":1:"),
])
def test_empty_or_malformed_prompt_file_names_file_and_line(capsys, tmp_path, tokenizer_dir, content, expect):
    data = tmp_path / "prompts.jsonl"
    data.write_text(content)
    rc, err, out = _run(capsys, tmp_path, "data.source=files", f"data.train_files=[{data}]",
                        f"data.tokenizer={tokenizer_dir}")
    assert rc == 2 and str(data) in err and expect in err, err
    assert not out.exists()


def test_valid_prompt_file_passes_validation(tmp_path, tokenizer_dir):
    from tests._train_tiny import tiny_config
    from topd_jax.train.setup import plan_run
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"what is {i} + 1 ?", "answer": str(i + 1)})
                            + "\n" for i in range(1, 4)))
    cfg = tiny_config(tmp_path / "out", "data.source=files", f"data.train_files=[{data}]",
                      f"data.tokenizer={tokenizer_dir}")
    plan = plan_run(cfg)
    assert len(plan.train_examples) == 3 and plan.text.eos_ids and not (tmp_path / "out").exists()


def test_help_lists_options_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m topd_jax.train" in text and "topd.detector" in text


def test_prompt_files_run_end_to_end_with_chunked_scoring_and_math_grading(tmp_path, tokenizer_dir):
    """The real-model path on tiny pieces: JSONL prompts, an HF tokenizer, eval graded by
    math-verify, the chunked (hidden states + LM head) divergence."""
    from tests._train_tiny import tiny_config
    from topd_jax.train.loop import train
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"what is {i} + 1 ?", "answer": str(i + 1)})
                            + "\n" for i in range(1, 4)))
    cfg = tiny_config(tmp_path / "out", "data.source=files", f"data.train_files=[{data}]",
                      f"data.eval_files=[{data}]", f"data.tokenizer={tokenizer_dir}", "loss.vocab_chunk=4",
                      "eval.at_end=true", "checkpoint.export_hf=true", steps=2)
    result = train(cfg)
    assert np.isfinite(result.history[-1]["loss"]) and result.evals[2] == 0.0  # random model: nothing boxed
    assert (result.hf_dir / "tokenizer.json").is_file()


def test_wandb_on_without_the_package_is_refused_before_anything_runs(capsys, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    rc, err, out = _run(capsys, tmp_path, "logging.wandb=true")
    assert rc == 2 and "logging.wandb=true needs the wandb package" in err and err.count("\n") == 1
    assert not out.exists()
