"""``python -m topd_jax.train``: bad input is one ``error:`` line with exit 2 and nothing
written; a training failure exits 1; --help lists every flag and config option; log lines go
through tqdm.write."""

import json

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
    import logging
    package = logging.getLogger("topd_jax")
    before = (list(package.handlers), package.level, package.propagate)
    rc, err, out = _run(capsys, tmp_path, "optim.lrr=1e-3")
    assert rc == 2 and "optim.lrr" in err and "did you mean 'optim.lr'" in err
    assert not out.exists()
    # The command set up logging and undid it: later tests (caplog) see the logger as it was.
    assert (list(package.handlers), package.level, package.propagate) == before


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


def test_help_lists_every_flag_and_config_option_and_exits_zero(capsys):
    from topd_jax.config.loader import leaf_keys
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m topd_jax.train")
    for flag in ("--config", "--plan", "--plan-devices", "--device-memory-gib", "--plan-backend",
                 "--no-compile", "--log-level"):
        assert flag in text, flag
    missing = [k for k in leaf_keys() if f"  {k}: " not in text]
    assert not missing, missing


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--plan-devices", "8"], "--plan-devices: only valid with --plan"),
    (["--plan", "--device-memory-gib", "lots"], "argument --device-memory-gib: needs a number, got 'lots'"),
    (["--plan", "--plan-devices", "0"], "argument --plan-devices: must be > 0, got '0'"),
    (["steps"], "config key 'steps': overrides look like key.sub=value"),
])
def test_bad_flags_are_usage_errors_with_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_is_one_line_with_exit_2(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {tmp_path / 'nope.yaml'}\n"


def test_missing_data_file_is_one_line_not_a_traceback(capsys, tmp_path, tokenizer_dir):
    missing = tmp_path / "no_such.jsonl"
    rc, err, out = _run(capsys, tmp_path, "data.source=files", f"data.train_files=[{missing}]",
                        f"data.tokenizer={tokenizer_dir}")
    assert rc == 2 and err.startswith("error: data.train_files") and str(missing) in err
    assert err.count("\n") == 1 and not out.exists()


def test_a_training_failure_exits_1_with_one_line(capsys, tmp_path, monkeypatch, tokenizer_dir):
    from topd_jax.train import loop

    def fail(cfg, plan):
        raise loop.NonFiniteLossError("halting at step 3: 5 steps in a row had a non-finite loss")
    monkeypatch.setattr(loop, "train", fail)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"what is {i} + 1 ?", "answer": str(i + 1)})
                            + "\n" for i in range(1, 4)))
    rc, err, _ = _run(capsys, tmp_path, "data.source=files", f"data.train_files=[{data}]",
                      f"data.tokenizer={tokenizer_dir}")
    assert rc == 1 and err == "error: halting at step 3: 5 steps in a row had a non-finite loss\n"


def test_log_lines_go_through_tqdm_write_to_stderr(monkeypatch):
    import io
    import logging

    from topd_jax import cli_common
    calls, stream = [], io.StringIO()
    monkeypatch.setattr(cli_common.tqdm, "write", lambda s, file=None: calls.append((s, file)))
    logger = cli_common.setup_logging("info", stream=stream)
    try:
        logging.getLogger("topd_jax.train.loop").info("resumed from %s at step %d", "ck", 4)
        logging.getLogger("topd_jax.train.loop").debug("hidden at info")
        cli_common.setup_logging("warning", stream=stream)  # idempotent: one handler
        assert sum(isinstance(h, cli_common.TqdmHandler) for h in logger.handlers) == 1
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
    assert calls == [("resumed from ck at step 4", stream)]


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
    last = result.history[-1]  # plain OPD: the loss is the mean per-token KL
    assert last["loss"] == pytest.approx(last["token_kl"], rel=1e-5) and last["loss"] > 0
    assert result.evals[2] == 0.0  # random model: nothing boxed
    assert (result.hf_dir / "tokenizer.json").is_file()


def test_wandb_on_without_the_package_is_refused_before_anything_runs(capsys, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    rc, err, out = _run(capsys, tmp_path, "logging.wandb=true")
    assert rc == 2 and "logging.wandb=true needs the wandb package" in err and err.count("\n") == 1
    assert not out.exists()
