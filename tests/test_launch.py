"""launch/ scripts: --dry-run prints the exact commands; bad inputs fail with a clear message.

Bash only: no gcloud, sbatch or srun is needed (or called)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU, SUBMIT, SBATCH = (str(ROOT / "launch" / n) for n in ("tpu_pod.sh", "slurm_submit.sh", "slurm.sbatch"))


def _run(*args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TOPD_"))} | (env or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)


def _commands(stdout):
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def test_tpu_dry_run_creates_installs_runs_on_all_workers_and_collects_logs():
    r = _run(TPU, "--name", "topd-v5p", "--zone", "us-east5-a", "--accelerator", "v5p-64", "--create",
             "--project", "proj", "--dry-run", "--", "--config", "my run.yaml", "steps=10")
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "topd-v5p", "--zone", "us-east5-a",
                       "--project", "proj", "--accelerator-type", "v5p-64", "--version", "v2-alpha-tpuv5"]
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    assert "pip install" in ssh[0][-1]
    train = ssh[1][-1]
    assert "TOPD_DISTRIBUTED=auto python -m topd_jax.train" in train
    assert shlex.split(train.split("topd_jax.train", 1)[1].split("2>&1")[0]) == ["--config", "my run.yaml",
                                                                                  "steps=10"]
    assert cmds[-1][4] == "scp" and cmds[-1][-1] == "--worker=W" and "runs/tpu_logs/topd-v5p/worker-W.log" in cmds[-1]


def test_tpu_attach_checks_the_vm_instead_of_creating_it():
    r = _run(TPU, "--name", "pod", "--zone", "europe-west4-b", "--dry-run", "--", "--config", "c.yaml")
    assert r.returncode == 0, r.stderr
    assert _commands(r.stdout)[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pod"]
    assert "create" not in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--name", "Pod", "--zone", "us-east5-a", "--", "x"], "--name 'Pod'"),
    (["--name", "pod", "--zone", "mars", "--", "x"], "--zone 'mars'"),
    (["--name", "pod", "--zone", "us-east5-a", "--create", "--accelerator", "h100", "--", "x"],
     "--accelerator 'h100'"),
    (["--name", "pod", "--zone", "us-east5-a", "--accelerator", "v4-8", "--", "x"], "only apply with --create"),
    (["--name", "pod", "--zone", "us-east5-a", "--dry-run"], "no training arguments"),
    (["--name", "pod", "--zone", "us-east5-a", "--bogus"], "unknown option '--bogus'"),
])
def test_tpu_bad_inputs_fail_naming_the_value(args, message):
    r = _run(TPU, *args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == "", (r.stdout, r.stderr)


def test_slurm_dry_run_prints_sbatch_and_the_per_node_srun():
    r = _run(SUBMIT, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00:00:00",
             "--port", "23456", "--dry-run", "--", "--config", "configs/demo.yaml", "data.system_prompt=be brief")
    assert r.returncode == 0, r.stderr
    sbatch, srun = _commands(r.stdout)
    assert sbatch[:4] == ["sbatch", "--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1"]
    assert "--partition=gpu" in sbatch and "--time=1-00:00:00" in sbatch
    assert any(a.startswith("--export=ALL,TOPD_REPO=") and "TOPD_COORDINATOR_PORT=23456" in a for a in sbatch)
    assert sbatch[-4:] == [SBATCH, "--config", "configs/demo.yaml", "data.system_prompt=be brief"]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"] and srun[-3:-1] == ["bash", "-c"]
    inner = shlex.split(srun[-1])
    assert inner[-6:] == ["python", "-m", "topd_jax.train", "--config", "configs/demo.yaml",
                          "data.system_prompt=be brief"]
    assert "TOPD_COORDINATOR_PORT=23456" in inner
    assert "32 GPUs" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--gpus-per-node", "8", "--", "x"], "--nodes '0'"),
    (["--nodes", "2", "--gpus-per-node", "many", "--", "x"], "--gpus-per-node 'many'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "soon", "--", "x"], "--time 'soon'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--port", "80", "--", "x"], "--port '80'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--venv", "/nonexistent", "--", "x"], "--venv '/nonexistent'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--", "--config", "missing.yaml"], "--config 'missing.yaml'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--dry-run"], "no training arguments"),
])
def test_slurm_bad_inputs_fail_naming_the_value(args, message):
    r = _run(SUBMIT, *args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == "", (r.stdout, r.stderr)


def test_sbatch_script_refuses_to_run_outside_a_job():
    r = _run(SBATCH, "--config", "configs/demo.yaml")
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr
    r = _run(SBATCH, "--config", "c.yaml", env={"SLURM_JOB_ID": "1", "SLURM_NTASKS_PER_NODE": "8"})
    assert r.returncode == 2 and "SLURM_NTASKS_PER_NODE=8" in r.stderr
