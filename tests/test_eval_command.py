"""End to end: `python -m topd_jax.eval` on a tiny random Qwen3 saved as an HF directory with
the real Qwen tokenizer. The command runs, writes its files, the numbers agree with the
per-sample lines, and a sample does not depend on the batch it was drawn in."""

import json

import pytest
import torch  # the [test] extra; transformers is a dependency
import transformers

from topd_jax.data.tokenizer import build_qwen_tokenizer
from topd_jax.eval.cli import main
from topd_jax.eval.generation import pad_batch

MAX_NEW = 6
pytestmark = pytest.mark.slow  # ≈ 30 s: two sampler compilations


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-qwen3")
    cfg = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(out)
    build_qwen_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "toy.jsonl"
    rows = [{"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}
            for i in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _run(model_dir, data_file, out, batch_size):
    """The command in-process; returns the summary it returned and wrote."""
    assert main([
        "--model", str(model_dir), "--data", str(data_file), "--out", str(out),
        "--samples", "2", "--max-new-tokens", str(MAX_NEW), "--batch-size", str(batch_size),
        "--template", "qwen-chat", "--thinking", "off", "--seed", "59", "--no-progress",
    ]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def run_b2(model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-b2")
    return out, _run(model_dir, data_file, out, batch_size=2)


def test_command_writes_samples_summary_and_table(run_b2, capsys):
    out, summary = run_b2
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 2
    pairs = {(f"t{i}", j) for i in range(3) for j in range(2)}
    assert {(x["id"], x["sample"]) for x in lines} == pairs
    s = summary["datasets"]["toy"]
    assert s["problems"] == 3 and s["samples_per_problem"] == 2
    assert s["pass@1"] == pytest.approx(sum(x["correct"] for x in lines) / 6)
    assert s["mean_length"] == pytest.approx(sum(x["length"] for x in lines) / 6)
    assert s["truncation_rate"] == pytest.approx(sum(x["truncated"] for x in lines) / 6)
    for x in lines:
        assert 1 <= x["length"] <= MAX_NEW
        if x["truncated"]:  # ran out of tokens; otherwise it stopped on an eos id
            assert x["length"] == MAX_NEW
    cfg = summary["config"]
    assert cfg["seed"] == 59 and "fold_in" in cfg["seed_rule"]
    assert cfg["template"]["name"] == "qwen-chat" and cfg["template"]["thinking"] is False
    assert cfg["eos_ids"] == [151645, 151643]
    assert summary["timing"]["generated_tokens"] == sum(x["length"] for x in lines)
    assert (out / "summary.txt").read_text().splitlines()[0].startswith("dataset")


def test_samples_do_not_depend_on_batch_size(run_b2, model_dir, data_file, tmp_path):
    out_b2, _ = run_b2
    _run(model_dir, data_file, tmp_path, batch_size=3)

    def read(o):
        return [json.loads(x) for x in (o / "samples.jsonl").read_text().splitlines()]
    key = lambda x: (x["id"], x["sample"])  # noqa: E731
    a, b = sorted(read(out_b2), key=key), sorted(read(tmp_path), key=key)
    assert [x["completion"] for x in a] == [x["completion"] for x in b]


@pytest.mark.parametrize("flags, message", [
    (["--samples", "0"], "--samples must be >= 1, got 0"),
    (["--template", "paper", "--thinking", "off"], "--thinking/--system apply to --template qwen-chat only"),
    (["--samples", "2", "--ks", "4"], "--ks values must be in 1..--samples=2, got [4]"),
    (["--ks", "1,x"], "--ks takes comma-separated integers, got '1,x'"),
])
def test_bad_flags_are_one_line_errors_with_exit_2(model_dir, data_file, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(data_file), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" and not out.exists()


def test_bad_data_or_model_path_is_one_line_error_not_a_traceback(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no_such.jsonl"
    assert main(["--model", str(model_dir), "--data", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data path") and str(missing) in err and err.count("\n") == 1
    assert main(["--model", str(tmp_path / "no_model"), "--data", str(data_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_model" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_flag_is_a_usage_error_and_help_exits_zero(capsys):
    assert main(["--model", "m", "--data", "d", "--out", "o", "--sample", "3"]) == 2
    assert "unrecognized arguments: --sample 3" in capsys.readouterr().err
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f in text for f in ("--model", "--data", "--out", "--samples", "--ks", "--log-level"))


def test_pad_batch_left_pads_to_a_multiple():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    with pytest.raises(ValueError, match="zero tokens"):
        pad_batch([[]], pad_id=0, multiple=4)


def test_pad_batch_to_an_exact_length_refuses_a_longer_prompt():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, length=5)
    assert ids.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8]]
    assert mask.sum(axis=1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="prompt 1 has 4 tokens > length=3"):
        pad_batch([[1], [1, 2, 3, 4]], pad_id=0, length=3)
