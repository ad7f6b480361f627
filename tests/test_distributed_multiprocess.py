"""2 processes x 4 CPU devices through jax.distributed on localhost == 1 process x 8 devices.

The sharded update (``TrainStep``: micro-batch accumulation, AdamW, the logical-axis rules
on a data=2, fsdp=2, tensor=2 mesh) runs a few steps in both set-ups; losses, gradient norms
and parameter checksums must agree. The full ``train`` loop is not used: its prompt loader
and sampling are not yet process-aware (every host would build the whole batch itself).

Run as ``python tests/test_distributed_multiprocess.py PORT PID OUT.json`` it is one worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

STEPS = 3
R, L = 8, 12


def _batch():
    import numpy as np
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8, R)
    loss_mask = (np.arange(L)[None] >= 4) & (np.arange(L)[None] < 4 + lengths[:, None])
    return {"ids": rng.integers(0, 64, (R, L)).astype(np.int32), "seq_mask": np.ones((R, L), bool),
            "loss_mask": loss_mask, "weights": np.ones((R, L), np.float32),
            "teacher_hidden": rng.normal(size=(R, L, 16)).astype(np.float32)}


def run_steps() -> dict:
    """A few sharded steps on all (global) devices; returns plain floats."""
    import functools

    import jax
    import jax.numpy as jnp

    from topd_jax.algorithms import LossSpec, make_loss_fn
    from topd_jax.algorithms.objective import add_normalizers
    from topd_jax.models import ModelConfig, init_model
    from topd_jax.sharding import MeshConfig, make_mesh
    from topd_jax.train.config import OptimConfig
    from topd_jax.train.optim import lr_schedule, make_optimizer
    from topd_jax.train.state import create_train_state, replicated
    from topd_jax.train.step import TrainStep

    s_cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                        intermediate_size=32, rope_theta=1e4)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    student = init_model(s_cfg, seed=0, mesh=mesh)
    head = init_model(s_cfg.replace(hidden_size=16), seed=1, mesh=mesh).lm_head_weight()
    opt = OptimConfig(lr=1e-2, warmup_fraction=0.0, micro_batches=2)
    tx = make_optimizer(opt, 10)
    graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0)
    spec = LossSpec(guidance=False, prefix_len=L, window=1, guidance_decay=None, guidance_weight=0.0,
                    micro_batches=2)
    step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(opt, 10), shardings, mesh, micro_batches=2,
                     normalize=functools.partial(add_normalizers, spec))
    batch, out = _batch(), {"loss": [], "grad_norm": []}
    with jax.set_mesh(mesh):
        for _ in range(STEPS):
            state, m = step(state, batch, head)
            for k in out:
                out[k].append(float(m[k]))
        sums = jax.jit(lambda p: [jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)],
                       out_shardings=replicated(mesh))(state.params)
    out["param_sq_sums"] = [float(s) for s in sums]
    out["devices"] = jax.device_count()
    out["processes"] = jax.process_count()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_cpu_devices_match_one_process_of_eight(tmp_path):
    import jax
    import numpy as np
    if jax.device_count() != 8:
        import pytest
        pytest.skip("needs the 8 CPU devices of tests/conftest.py")
    port, root = _free_port(), Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(pid), str(tmp_path / f"{pid}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    single = run_steps()
    for pid in range(2):
        multi = json.loads((tmp_path / f"{pid}.json").read_text())
        assert (multi["devices"], multi["processes"]) == (8, 2)
        for key in ("loss", "grad_norm", "param_sq_sums"):
            np.testing.assert_allclose(multi[key], single[key], rtol=2e-5, err_msg=key)
    assert single["loss"][-1] < single["loss"][0]  # the steps really trained


if __name__ == "__main__":
    port, pid, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from topd_jax.sharding.distributed import DistributedArgs, initialize_distributed
    initialize_distributed(DistributedArgs("explicit", f"127.0.0.1:{port}", 2, pid))
    Path(out_path).write_text(json.dumps(run_steps()))
