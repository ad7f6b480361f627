"""The README's loss-library example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def loss_library_example() -> str:
    text = README.read_text()
    section = text.split("## The loss library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's loss-library section has no python example"
    return blocks[0]


def test_readme_loss_library_example_runs(capsys):
    exec(compile(loss_library_example(), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "false_alarm_fraction" in out
