"""Resume and preemption: SIGKILL between two checkpoints, then resume to 2N == 2N steps
straight (parameters, history, and metrics.jsonl / TensorBoard rows, each step once); SIGTERM
mid-run saves a checkpoint and exits 0 (both in real subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np

from tests._train_tiny import cli_config_file, tiny_config, tiny_model_dirs
from topd_jax.train.loop import TIMING_KEYS, train

REPO = Path(__file__).resolve().parents[1]
N = 3  # checkpoint.every (kill between N and 2N); logging.every=2, so the step-N + 1 row mixes both runs


def _wait_for(predicate, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"child exited early ({proc.returncode}) while waiting for {what}:\n{out[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _jsonl_rows(run_dir):
    """metrics.jsonl rows without the wall-time fields (they differ between runs)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and k not in TIMING_KEYS} for r in rows]


def _tb_steps(run_dir):
    """Steps of the scalar-summary events in every TensorBoard file of a run, in file-name
    order (the order TensorBoard reads them)."""
    from topd_jax.train.metrics import event_info, read_tfrecords
    paths = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    return [step for p in paths for step, fields in map(event_info, read_tfrecords(p.read_bytes()))
            if 5 in fields]


def test_sigkill_between_checkpoints_then_resume_logs_each_step_once_as_the_straight_run(tmp_path):
    """checkpoint.every=N=3, logging.every=2: the child is killed after step N + 1 = 4 was
    logged (the mean of steps 3 and 4) but before the checkpoint at 2N; the resumed run restores
    step N with its unfinished log interval (step 3), rewinds metrics.jsonl and tb/ to N and
    logs 4 and 6 again, so every logged step is there once, equal to the uninterrupted run."""
    killed_dir, marker = tmp_path / "killed", tmp_path / "logged_step_n_plus_1"
    overrides = ("logging.tensorboard=true", f"checkpoint.every={N}", "logging.every=2")
    logged = list(range(2, 2 * N + 1, 2))
    child = tmp_path / "child.py"
    # The loop asks the checkpointer whether step N + 1 is due right after logging it: hang
    # there (a job killed at an arbitrary point between two checkpoints).
    child.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests._train_tiny import tiny_config
        from topd_jax.train import loop
        real_due = loop.TrainCheckpointer.due
        def due(self, step, **kwargs):
            if step == {N + 1}:
                open({str(marker)!r}, "w").close()
                time.sleep(600)
            return real_due(self, step, **kwargs)
        loop.TrainCheckpointer.due = due
        loop.train(tiny_config({str(killed_dir)!r}, *{overrides!r}, steps={2 * N}))
    """))
    proc = subprocess.Popen([sys.executable, str(child)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker.exists, proc, 240, f"step {N + 1} to be logged")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in _jsonl_rows(killed_dir)] == [2, N + 1]  # N + 1 logged, not saved
    assert sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit()) == [N]

    resumed = train(tiny_config(killed_dir, *overrides, steps=2 * N))
    straight = train(tiny_config(tmp_path / "straight", *overrides, steps=2 * N))
    assert [r["step"] for r in _jsonl_rows(killed_dir)] == logged
    assert _jsonl_rows(killed_dir) == _jsonl_rows(tmp_path / "straight")
    assert _tb_steps(killed_dir) == _tb_steps(tmp_path / "straight") == logged
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(jax.device_get(straight.params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert len(resumed.history) == 2 * N
    np.testing.assert_equal(strip(resumed.history), strip(straight.history))
    assert int(resumed.state.step) == 2 * N


def test_sigterm_mid_run_saves_a_checkpoint_and_exits_zero(tmp_path):
    cfg = tiny_config(tmp_path / "run", "logging.every=1", "checkpoint.every=1000", steps=100000)
    student, teacher = tiny_model_dirs(tmp_path, cfg)
    config = cli_config_file(tmp_path / "run.yaml", cfg, student, teacher)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "topd_jax.train", "--config", str(config)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, 240,
              "two logged steps")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and 2 <= max(steps) < 100000
