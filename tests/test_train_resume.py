"""Resume and preemption: 2N steps straight == N steps, SIGKILL, resume to 2N; SIGTERM mid-run
saves a checkpoint and exits 0 (both in real subprocesses)."""

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
N = 2


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


def test_sigkill_after_checkpoint_then_resume_equals_the_straight_run(tmp_path):
    killed_dir, marker = tmp_path / "killed", tmp_path / "saved_step_n"
    child = tmp_path / "child.py"
    # The child saves step N, then hangs (as a job would be killed at an arbitrary point after it).
    child.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests._train_tiny import tiny_config
        from topd_jax.train import loop
        real_save = loop.TrainCheckpointer.save
        def save(self, step, *args, **kwargs):
            started = real_save(self, step, *args, **kwargs)
            if step == {N}:
                self.wait()
                open({str(marker)!r}, "w").close()
                time.sleep(600)
            return started
        loop.TrainCheckpointer.save = save
        loop.train(tiny_config({str(killed_dir)!r}, steps={2 * N}))
    """))
    proc = subprocess.Popen([sys.executable, str(child)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker.exists, proc, 240, f"the checkpoint at step {N}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resumed = train(tiny_config(killed_dir, steps=2 * N))
    # The resumed run continued at N + 1 (it did not start over): one JSONL row per step.
    logged = [json.loads(x)["step"] for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 2 * N + 1)), logged
    straight = train(tiny_config(tmp_path / "straight", steps=2 * N))
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
