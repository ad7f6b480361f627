import json

import pytest

from topd_jax.eval.pass_filter import main, parse_rate, pass_rates


def _write(tmp_path, n_right: dict[str, int], samples: int = 8):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "problem": f"p{i}", "answer": "1"}) + "\n" for i in n_right))
    lines = [json.dumps({"dataset": "train", "id": i, "sample": j, "correct": j < r})
             for i, r in n_right.items() for j in range(samples)]
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return data, tmp_path / "samples.jsonl"


def test_keeps_prompts_solved_one_to_seven_eighths_of_the_time(tmp_path, capsys):
    data, samples = _write(tmp_path, {"a": 0, "b": 1, "c": 4, "d": 7, "e": 8})
    out = tmp_path / "out.jsonl"
    assert main(["--samples", str(samples), "--data", str(data), "--out", str(out)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [k["id"] for k in kept] == ["b", "c", "d"]
    assert [k["pass_rate"] for k in kept] == [1 / 8, 0.5, 7 / 8]
    assert "kept 3" in capsys.readouterr().out


def test_unsampled_problems_are_an_error_unless_allowed(tmp_path, capsys):
    data, samples = _write(tmp_path, {"a": 3})
    with data.open("a") as f:
        f.write(json.dumps({"id": "z", "problem": "pz", "answer": "2"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["--samples", str(samples), "--data", str(data), "--out", str(out)]) == 2
    assert "id 'z'" in capsys.readouterr().err and not out.exists()
    assert main(["--samples", str(samples), "--data", str(data), "--out", str(out), "--allow-missing"]) == 0
    assert "unsampled 1" in capsys.readouterr().out


def test_bad_rates_and_records_name_the_value(tmp_path, capsys):
    assert parse_rate("1/8") == 0.125 and parse_rate("0.5") == 0.5
    for bad in ("9/8", "x", "1/0"):
        with pytest.raises(ValueError, match="rate|not a rate"):
            parse_rate(bad)
    with pytest.raises(ValueError, match="s.jsonl:2"):
        pass_rates(['{"dataset": "d", "id": "1", "correct": true}', '{"id": 1}'], where="s.jsonl")
    data, samples = _write(tmp_path, {"a": 3})
    assert main(["--samples", str(samples), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--min-pass", "7/8", "--max-pass", "1/8"]) == 2
    assert "--min-pass 7/8 > --max-pass 1/8" in capsys.readouterr().err


def test_missing_samples_file_and_bad_flags_exit_2_without_a_traceback(tmp_path, capsys):
    data, _ = _write(tmp_path, {"a": 1})
    missing = tmp_path / "nope.jsonl"
    assert main(["--samples", str(missing), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: --samples {str(missing)!r} does not exist\n"
    assert main(["--samples", str(missing), "--data", str(data)]) == 2  # --out missing: argparse
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "--allow-missing" in capsys.readouterr().out
