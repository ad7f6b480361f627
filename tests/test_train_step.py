"""The jitted update: micro-batch accumulation, sharding invariance, non-finite skip."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.algorithms import LossSpec, make_loss_fn
from topd_jax.algorithms.objective import add_normalizers
from topd_jax.models import ModelConfig, init_model
from topd_jax.sharding import MeshConfig, make_mesh
from topd_jax.config.schema import OptimConfig
from topd_jax.train.optim import lr_schedule, make_optimizer
from topd_jax.train.state import create_train_state
from topd_jax.train.step import TrainStep

S_CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=32, rope_theta=1e4)
T_CFG = S_CFG.replace(hidden_size=16)
R, L, G, K = 8, 12, 8, 3


def _batch(seed=0, guidance=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (R, L)).astype(np.int32)
    seq_mask = np.ones((R, L), bool)
    seq_mask[:, :2] = rng.random((R, 2)) < 0.5  # some left padding
    lengths = rng.integers(1, 8, R)  # uneven completion lengths: the global count matters
    loss_mask = (np.arange(L)[None] >= 4) & (np.arange(L)[None] < 4 + lengths[:, None])
    b = {"ids": ids, "seq_mask": seq_mask | loss_mask, "loss_mask": loss_mask,
         "weights": np.where(rng.random((R, L)) < 0.2, 0.0, 1.0).astype(np.float32),
         "teacher_hidden": rng.normal(size=(R, L, 16)).astype(np.float32)}
    if guidance:  # TOPD: the detector's classification (weights come from it), guidance rows
        cand = loss_mask & (rng.random((R, L)) < 0.5)
        del b["weights"]
        b.update(candidates=cand, divergence=rng.random((R, L)).astype(np.float32),
                 false_alarm=cand & (rng.random((R, L)) < 0.4))
        b.update(g_ids=rng.integers(0, 64, (G, L + K)).astype(np.int32), g_mask=np.ones((G, L + K), bool),
                 g_window=rng.random((G, K)) < 0.7, g_targets=rng.integers(0, 64, (G, K)).astype(np.int32),
                 g_teacher_hidden=rng.normal(size=(G, K, 16)).astype(np.float32))
    return b


def _run(mesh, batch, *, micro=1, guidance=False, steps=2):
    s = init_model(S_CFG, seed=0, mesh=mesh)
    head = init_model(T_CFG, seed=1, mesh=mesh).lm_head_weight()
    opt = OptimConfig(lr=1e-2, micro_batches=micro, warmup_fraction=0.0)
    tx = make_optimizer(opt, 10)
    graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
    spec = LossSpec(detector=guidance, suppression_weight=0.25, guidance=guidance, prefix_len=L, window=K, guidance_decay=0.8 if guidance else None,
                    guidance_weight=0.5, micro_batches=micro)
    step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(opt, 10), shardings, mesh, micro_batches=micro,
                     normalize=functools.partial(add_normalizers, spec))
    outs = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, out = step(state, batch, head)
            outs.append(jax.device_get(out))
    return jax.device_get(state.params), outs, state


def _one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_four_micro_batches_equal_one_full_batch():
    batch = _batch(guidance=True)
    p1, o1, _ = _run(_one_device(), batch, micro=1, guidance=True, steps=1)
    p4, o4, _ = _run(_one_device(), batch, micro=4, guidance=True, steps=1)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(o1[0][key], o4[0][key], rtol=1e-5)
    assert float(o1[0]["opd_loss"][1]) == float(o4[0]["opd_loss"][1])  # global weighted token count
    for o in (o1[0], o4[0]):  # L = L_OPD_w + λ·L_traj, each over its global count (λ = 0.5)
        want = o["opd_loss"][0] / o["opd_loss"][1] + 0.5 * o["traj_loss"][0] / o["traj_loss"][1]
        np.testing.assert_allclose(o["loss"], want, rtol=1e-5)
    # Adam turns near-zero gradient entries into ~lr-sized steps: compare at 1 % of lr.
    _assert_trees_close(p1, p4, atol=1e-4)


def test_sharded_step_on_data2_fsdp2_tensor2_equals_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    batch = _batch(seed=1, guidance=True)
    p1, o1, _ = _run(_one_device(), batch, guidance=True, steps=1)
    p8, o8, state = _run(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), batch, guidance=True, steps=1)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(o1[0][key], o8[0][key], rtol=1e-5)
    _assert_trees_close(p1, p8, atol=1e-4)
    assert state.params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_non_finite_loss_skips_the_update_and_counts_it():
    batch = _batch(seed=2)
    batch["teacher_hidden"] = batch["teacher_hidden"].copy()
    batch["teacher_hidden"][0] = np.nan  # the whole row: some of it is scored
    mesh = _one_device()
    before = jax.device_get(init_model(S_CFG, seed=0, mesh=mesh).lm_head_weight())
    params, outs, state = _run(mesh, batch, steps=2)
    assert [float(o["skipped"]) for o in outs] == [1.0, 1.0]
    assert int(state.step) == 2 and int(state.opt_steps) == 0
    np.testing.assert_array_equal(np.asarray(params["embed"]).T, before)
