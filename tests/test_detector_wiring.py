"""The trainer's detector plumbing for issue 13: quantile candidates are every position above
the row's quantile (no cap at C)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.algorithms.topd import candidate_slots, quantile_slot_count


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), length=st.integers(1, 40), q=st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.0]),
       levels=st.sampled_from([2, 1000]))
def test_quantile_slot_count_bounds_the_positions_above_the_quantile(seed, length, q, levels):
    rng = np.random.default_rng(seed)
    for n in range(1, length + 1):
        x = rng.integers(0, levels, n).astype(np.float64)
        assert (x > np.quantile(x, q)).sum() <= quantile_slot_count(length, q)


def test_quantile_candidates_are_every_position_above_the_row_quantile():
    rng = np.random.default_rng(0)
    loss = rng.random((3, 30)).astype(np.float32)
    mask = np.ones((3, 30), bool)
    mask[1, 20:] = False
    cand, pos, valid, _ = candidate_slots(loss, mask, mode="quantile", num=2, min_separation=8, quantile=0.8,
                                          rollback=1)
    cand = np.asarray(cand)
    for r in range(3):
        above = mask[r] & (loss[r] > np.quantile(loss[r][mask[r]], 0.8))
        np.testing.assert_array_equal(cand[r], above)
        got = sorted(np.asarray(pos)[r][np.asarray(valid)[r]].tolist())
        assert got == np.flatnonzero(above).tolist()
    assert cand[0].sum() == 6 > 2  # more than num: no cap at C


# ---- the OT detector's options in the trainer (ot_solver, ot_embedding, ot_window_end) ----
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from tests._train_tiny import tiny_config  # noqa: E402
from topd_jax.algorithms import Frozen, prepare_batch  # noqa: E402
from topd_jax.algorithms.topd import _ot_jit, frozen_ot_table, pad_windows_with_eos  # noqa: E402
from topd_jax.models import ModelConfig, init_model  # noqa: E402
from topd_jax.sharding import MeshConfig, make_mesh  # noqa: E402

SMALL = dict(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32, rope_theta=1e4)


def test_pad_eos_makes_an_early_stop_a_mismatch():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
    full = jnp.array([[3, 3, 3, 3]])
    short, short_mask = jnp.array([[3, 0, 0, 0]]), jnp.array([[True, False, False, False]])
    ones = jnp.ones((1, 4), bool)
    d_short, _ = _ot_jit(table, full, ones, short, short_mask, epsilon=0.05, iters=200)
    d_pad, _ = _ot_jit(table, full, ones, short, short_mask, epsilon=0.05, iters=200, pad_eos=2)
    assert float(d_short[0]) == pytest.approx(0.0, abs=1e-5)  # shorten: same token, no mismatch
    assert float(d_pad[0]) > 0.5  # three eos tokens against three 3s: 3/4 of the mass moves
    tok, mask = pad_windows_with_eos(short, short_mask, 2)
    np.testing.assert_array_equal(tok, [[3, 2, 2, 2]])
    assert bool(mask.all())


@pytest.fixture(scope="module")
def models():
    s = init_model(ModelConfig(vocab_size=128, hidden_size=16, num_layers=1, **SMALL), seed=0)
    t = init_model(ModelConfig(vocab_size=128, hidden_size=24, num_layers=1, **SMALL), seed=1)
    ids = np.random.default_rng(0).integers(3, 128, (2, 6)).astype(np.int32)
    return s, t, {"prompt_ids": ids, "prompt_mask": np.ones((2, 6), bool)}


def test_frozen_ot_table_copies_the_initial_student_or_takes_the_teachers(tmp_path, models):
    s, t, _ = models
    s = nnx.clone(s)
    assert frozen_ot_table(tiny_config(tmp_path, "algorithm=topd"), s, t) is None
    initial = frozen_ot_table(tiny_config(tmp_path, "algorithm=topd", "topd.ot_embedding=student_initial"), s, t)
    before = np.asarray(s.embedding_table()).copy()
    s.embed[...] = s.embed[...] + 1.0  # training moves the student's table; the copy stays
    np.testing.assert_array_equal(initial, before)
    teacher = frozen_ot_table(tiny_config(tmp_path, "algorithm=topd", "topd.ot_embedding=teacher"), s, t)
    np.testing.assert_array_equal(teacher, t.embedding_table())


def _local_ot(tmp_path, models, *overrides, ot_table=None):
    s, t, prompts = models
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.guidance=false", *overrides)
    frozen = Frozen(t, t.lm_head_weight(), (2,), 0, ot_table=ot_table)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, metrics, _ = prepare_batch(cfg, s, prompts, jax.random.key(3), frozen, {})
    total, count = metrics["local_ot"]
    assert count > 0
    return float(total) / float(count)


def test_trainer_uses_the_configured_solver_table_and_window_end(tmp_path, models, monkeypatch):
    from topd_jax.algorithms import topd
    s, t, _ = models
    seen = []

    def spy(table, *args, **kw):
        seen.append((np.asarray(table), kw))
        return _ot_jit(table, *args, **kw)

    monkeypatch.setattr(topd, "_ot_jit", spy)
    local_ot = _local_ot(tmp_path, models, "topd.ot_solver=sinkhorn_divergence", "topd.ot_window_end=pad_eos",
                         ot_table=t.embedding_table())
    assert np.isfinite(local_ot) and len(seen) == 1
    table, kw = seen[0]
    np.testing.assert_array_equal(table, t.embedding_table())
    assert kw["solver"] == "sinkhorn_divergence" and kw["pad_eos"] == 2


def test_exact_solver_is_at_most_the_entropic_cost():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    a, b = jnp.asarray(rng.integers(0, 16, (5, 6))), jnp.asarray(rng.integers(0, 16, (5, 6)))
    ma, mb = jnp.ones((5, 6), bool), jnp.asarray(rng.random((5, 6)) < 0.7).at[:, 0].set(True)
    sink, err = _ot_jit(table, a, ma, b, mb, epsilon=0.05, iters=2000)
    exact, zero = _ot_jit(table, a, ma, b, mb, epsilon=0.05, iters=2000, solver="exact")
    assert np.all(np.asarray(sink) >= np.asarray(exact) - 1e-5) and not np.asarray(zero).any()
    assert np.all(np.asarray(sink) - np.asarray(exact) <= 0.05 * np.log(6) + 1e-4)
    assert np.asarray(err).max() < 1e-3
