"""Optimizer: schedule values, AdamW + clipping, accumulation normalised by global counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from topd_jax.config.schema import OptimConfig
from topd_jax.train.optim import (accumulate_gradients, decay_mask, lr_schedule, make_optimizer,
                                  select_if_finite, split_micro_batches)


def test_schedule_values_at_known_steps():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_fraction=0.1)
    f = lr_schedule(cfg, total_steps=101)  # W = 10, cosine over s = 10 .. 100
    np.testing.assert_allclose(f(0), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(f(4), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(f(9), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(f(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(f(55), (1e-3 + 1e-5) / 2, rtol=1e-5)  # cosine midpoint
    s = 32.5
    ref = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (s - 10) / 90))
    np.testing.assert_allclose(f(s), ref, rtol=1e-5)
    np.testing.assert_allclose(f(100), 1e-5, rtol=1e-5)
    np.testing.assert_allclose(f(500), 1e-5, rtol=1e-5)


def test_schedule_without_warmup_starts_at_peak_and_rejects_zero_steps():
    f = lr_schedule(OptimConfig(lr=2e-6, min_lr=0.0, warmup_fraction=0.0), total_steps=5)
    np.testing.assert_allclose([f(i) for i in range(5)],
                               [2e-6 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)],
                               rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        lr_schedule(OptimConfig(), 0)


def test_first_adamw_step_moves_each_weight_by_lr_and_clipping_bounds_the_norm():
    cfg = OptimConfig(lr=0.1, min_lr=0.0, warmup_fraction=0.0, clip_norm=1.0, weight_decay=0.0)
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.full((3, 2), 100.0), "b": jnp.array([-5.0, 0.5])}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's bias-corrected first step is -lr * sign(g) (up to eps), whatever the clipping.
    np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["b"], [0.1, -0.1], rtol=1e-5)
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, clip.init(params))
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-5)


def test_weight_decay_applies_to_matrices_only():
    cfg = OptimConfig(lr=0.1, min_lr=0.0, warmup_fraction=0.0, weight_decay=0.5, clip_norm=None)
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(updates["scale"], 0.0)
    assert decay_mask(params) == {"w": True, "scale": False}


def _toy(seed=0, n=8, t=5, d=3):
    """Per-token squared error of a linear model; masks with very uneven counts per row."""
    rng = np.random.default_rng(seed)
    batch = {"x": jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(n, t)), jnp.float32),
             "mask": jnp.asarray(np.arange(t)[None] < rng.integers(1, t + 1, (n, 1)))}
    params = {"w": jnp.asarray(rng.normal(size=(d,)), jnp.float32), "b": jnp.float32(0.3)}
    return params, batch


def _loss_fn(params, mb):
    err = (mb["x"] @ params["w"] + params["b"] - mb["y"]) ** 2  # [m, T]
    m = mb["mask"].astype(jnp.float32)
    guided = m * (mb["y"] > 0.5)  # a second term with its own (smaller) count
    terms = {"opd": ((err * m).sum(), m.sum()), "traj": ((jnp.abs(err) * guided).sum(), guided.sum())}
    return terms, {"err": ((err * m).sum(), m.sum()), "rows": (jnp.float32(mb["x"].shape[0]), 1.0)}


def _full_batch_loss(params, batch, coefs):
    terms, _ = _loss_fn(params, batch)
    return sum(coefs[k] * s / jnp.where(c > 0, c, 1) for k, (s, c) in terms.items())


@pytest.mark.parametrize("coefs", [None, {"opd": 1.0, "traj": 0.7}])
def test_four_micro_batches_equal_one_full_batch(coefs):
    params, batch = _toy()
    full_coefs = coefs or {"opd": 1.0, "traj": 1.0}
    loss_ref, grad_ref = jax.value_and_grad(_full_batch_loss)(params, batch, full_coefs)
    fn = jax.jit(accumulate_gradients, static_argnums=(0, 3))
    loss, grads, terms, metrics = fn(_loss_fn, params, batch, 4, coefs)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(grads[k], grad_ref[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["opd"][1], batch["mask"].sum())
    np.testing.assert_allclose(metrics["rows"], (8.0, 4.0))
    # The mean of micro-batch means is a different number here: the test can fail.
    means = [sum(full_coefs[k] * s / jnp.maximum(c, 1) for k, (s, c) in _loss_fn(
        params, jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch))[0].items()) for i in range(4)]
    assert abs(float(np.mean(means)) - float(loss_ref)) > 1e-3


def test_empty_term_contributes_zero_not_nan():
    params, batch = _toy()
    batch = dict(batch, y=-jnp.abs(batch["y"]) - 1.0)  # no guided tokens at all
    loss, grads, terms, _ = accumulate_gradients(_loss_fn, params, batch, 2)
    assert float(terms["traj"][1]) == 0.0 and np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_bad_micro_batch_split_and_coef_keys_are_errors():
    params, batch = _toy(n=6)
    with pytest.raises(ValueError, match=r"not divisible by micro_batches=4"):
        split_micro_batches(batch, 4)
    with pytest.raises(ValueError, match="coefs keys"):
        accumulate_gradients(_loss_fn, params, batch, 2, {"opd": 1.0})


def test_select_if_finite_keeps_old_state_on_a_bad_step():
    old, new = {"a": jnp.ones(2)}, {"a": jnp.full(2, jnp.nan)}
    np.testing.assert_array_equal(select_if_finite(jnp.bool_(False), new, old)["a"], old["a"])
    assert np.isnan(select_if_finite(jnp.bool_(True), new, old)["a"]).all()


def test_fractional_counts_are_divided_exactly():
    # Suppression weights w_t = s in (0, 1) make Σ w_t fractional, possibly below 1.
    params = {"w": jnp.float32(2.0)}
    batch = {"x": jnp.ones((2, 1)), "w": jnp.array([[0.25], [0.25]])}
    fn = lambda p, mb: ({"opd": ((p["w"] * mb["x"] * mb["w"]).sum(), mb["w"].sum())}, {})  # noqa: E731
    loss, grads, _, _ = accumulate_gradients(fn, params, batch, 2)
    np.testing.assert_allclose(loss, 2.0, rtol=1e-6)
    np.testing.assert_allclose(grads["w"], 1.0, rtol=1e-6)
