"""The real ``train(cfg)`` on 2 processes x 4 CPU devices (jax.distributed on localhost) equals
the same run on 1 process x 8 devices.

TOPD with the OT detector on a data=2, fsdp=2, tensor=2 mesh, 2 micro-batches, 3 steps:
prompts placed as global arrays, sampling, the detector's continuations (host-side branch
points gathered across processes), guidance rows, the sharded update, evaluation, Orbax saves
from both processes and the HF export. Checked: every history value and the final parameters
equal the 1-process run; only process 0 logged and wrote metrics; the 2-process checkpoint
restores in the 1-process run (another host count) to the same parameters and data position.

Run as ``python tests/test_distributed_multiprocess.py PORT PID RUN_DIR OUT.json`` it is one worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TIMING = ("time_sampling", "time_scoring", "time_update", "time_step", "tokens_per_s")


def run_config(run_dir):
    sys.path.insert(0, str(ROOT))  # the worker runs this file as a script
    from tests._train_tiny import tiny_config
    return tiny_config(run_dir, "algorithm=topd", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                       "data.prompts_per_step=4", "optim.micro_batches=2", "eval.at_end=true",
                       "eval.num_prompts=4", "checkpoint.export_hf=true", steps=STEPS)


def param_sq_sums(params) -> list[float]:
    """Per-leaf Σx² of (possibly multi-process) params, computed on the mesh, replicated out."""
    import jax
    import jax.numpy as jnp
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sums = jax.jit(lambda p: [jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)],
                   out_shardings=rep)(params)
    return [float(s) for s in sums]


def run(run_dir):
    """One training run: ``(plain numbers: history without wall-time keys, ...; TrainResult)``."""
    import jax

    from topd_jax.train.loop import train
    result = train(run_config(run_dir))
    summary = {"history": [{k: v for k, v in r.items() if k not in TIMING} for r in result.history],
               "evals": {str(k): v for k, v in result.evals.items()}, "params": param_sq_sums(result.params),
               "devices": jax.device_count(), "processes": jax.process_count()}
    return summary, result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_on_two_processes_of_four_cpu_devices_equals_one_process_of_eight(tmp_path):
    import jax
    import numpy as np
    if jax.device_count() != 8:
        import pytest
        pytest.skip("needs the 8 CPU devices of tests/conftest.py")
    port, multi_dir = _free_port(), tmp_path / "multi"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(pid), str(multi_dir),
                               str(tmp_path / f"{pid}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    single, result = run(tmp_path / "single")
    for pid in range(2):
        multi = json.loads((tmp_path / f"{pid}.json").read_text())
        assert (multi["devices"], multi["processes"]) == (8, 2)
        assert multi["any_process"] == [True, False]  # a flag raised on process 1 reaches both
        assert len(multi["history"]) == STEPS and multi["history"][0].keys() == single["history"][0].keys()
        for row_m, row_s in zip(multi["history"], single["history"]):
            for key in row_s:
                np.testing.assert_allclose(row_m[key], row_s[key], rtol=2e-5, atol=1e-7,
                                           err_msg=f"step {row_s['step']} {key}")
        assert multi["evals"] == single["evals"]
        np.testing.assert_allclose(multi["params"], single["params"], rtol=2e-5)
    assert single["history"][-1]["loss"] < single["history"][0]["loss"]  # it really trained
    assert single["history"][0]["guided_points_per_rollout"] > 0  # the guidance path ran

    # Only process 0 printed and wrote: one metrics row per step, the config, the export.
    assert "training prompts" in logs[0] and "training prompts" not in logs[1]
    rows = [json.loads(x) for x in (multi_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert (multi_dir / "config.yaml").is_file() and (multi_dir / "student_hf" / "model.safetensors").is_file()

    # The 2-process checkpoint restores on 1 process (a different host count).
    from topd_jax.checkpoints.train_state import TrainCheckpointer, abstract_state
    from topd_jax.train.loop import _loader
    from topd_jax.train.setup import plan_run
    ckpt = TrainCheckpointer(multi_dir / "checkpoints", every=1, keep=3)
    try:
        assert ckpt.steps == [2, 3]
        restored = ckpt.restore(abstract_state(result.state))
    finally:
        ckpt.close()
    assert restored.step == STEPS and int(restored.state.step) == STEPS
    np.testing.assert_allclose(param_sq_sums(restored.state.params), single["params"], rtol=2e-5)
    cfg = run_config(tmp_path / "single")
    loader = _loader(cfg, plan_run(cfg))
    for _ in range(STEPS):
        next(loader)
    assert restored.data == loader.get_state()  # the data stream is the same on any host count


if __name__ == "__main__":
    port, pid, run_dir, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from topd_jax.sharding.distributed import DistributedArgs, initialize_distributed
    initialize_distributed(DistributedArgs("explicit", f"127.0.0.1:{port}", 2, pid))
    from topd_jax.cli_common import setup_logging  # the loop logs as the train CLI shows it
    setup_logging("info")
    summary = run(run_dir)[0]
    from topd_jax.sharding.hosts import any_process  # e.g. SIGTERM seen by one host only
    summary["any_process"] = [any_process(pid == 1), any_process(False)]
    Path(out_path).write_text(json.dumps(summary))
