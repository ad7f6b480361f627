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
    assert frozen_ot_table(tiny_config(tmp_path, "algorithm=topd", "topd.ot_embedding=student"), s, t) is None
    initial = frozen_ot_table(tiny_config(tmp_path, "algorithm=topd"), s, t)  # the default: student_initial
    before = np.asarray(s.embedding_table()).copy()
    s.embed[...] = s.embed[...] + 1.0  # training moves the student's table; the copy stays
    np.testing.assert_array_equal(initial, before)
    teacher = frozen_ot_table(tiny_config(tmp_path, "algorithm=topd", "topd.ot_embedding=teacher"), s, t)
    np.testing.assert_array_equal(teacher, t.embedding_table())


def _prepare_metrics(tmp_path, models, *overrides, ot_table=None):
    s, t, prompts = models
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.guidance=false", *overrides)
    frozen = Frozen(t, t.lm_head_weight(), (2,), 0, ot_table=ot_table)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, metrics, _ = prepare_batch(cfg, s, prompts, jax.random.key(3), frozen, {})
    return metrics


def test_trainer_uses_the_configured_solver_table_window_end_and_rule(tmp_path, models, monkeypatch):
    from topd_jax.algorithms import topd
    s, t, _ = models
    seen = []

    def spy(table, *args, **kw):
        seen.append((np.asarray(table), kw, args))
        return _ot_jit(table, *args, **kw)

    monkeypatch.setattr(topd, "_ot_jit", spy)
    metrics = _prepare_metrics(tmp_path, models, "topd.ot_solver=sinkhorn_divergence", "topd.ot_window_end=pad_eos",
                               "topd.false_alarm_rule=teacher_null", "topd.continuations_per_side=2",
                               ot_table=t.embedding_table())
    assert len(seen) == 2  # D(teacher, student) and D(teacher, teacher')
    for table, kw, _ in seen:
        np.testing.assert_array_equal(table, t.embedding_table())
        assert kw["solver"] == "sinkhorn_divergence" and kw["pad_eos"] == 2
    t_tok, _, t_tok2, _ = seen[1][2]  # the null pairs each teacher sample with its sibling
    np.testing.assert_array_equal(np.asarray(t_tok2).reshape(-1, 2, t_tok.shape[1])[:, ::-1],
                                  np.asarray(t_tok).reshape(-1, 2, t_tok.shape[1]))
    total, count = metrics["false_alarm_fraction"]
    assert count > 0 and 0 <= total <= count
    err, rows = metrics["ot_marginal_error"]
    assert rows == 2 * len(t_tok) and 0 <= err / rows < 1e-2  # per window: the worst of its 3 solves
    assert metrics["undefined_divergence_fraction"][0] == 0  # OT windows always hold y_t's regeneration


# ---- classify: empty windows and the teacher-null rule ----
def _classify(d_slot, defined, null=None, guidance=True):
    from topd_jax.algorithms.topd import classify
    # two rows of 6 tokens, two candidate slots each
    pos = jnp.array([[1, 4], [2, 5]])
    valid = jnp.array([[True, True], [True, True]])
    cand = jnp.zeros((2, 6), bool).at[jnp.arange(2)[:, None], pos].set(True)
    loss = jnp.ones((2, 6))
    return classify(cand, pos, valid, jnp.asarray(d_slot, jnp.float32), loss, jnp.ones((2, 6), bool),
                    jnp.asarray(defined), None if null is None else jnp.asarray(null, jnp.float32),
                    quantile=0.3, regime="low_divergence", suppress=True, guidance=guidance, max_per_row=1)


def test_a_candidate_with_an_empty_window_is_never_suppressed_nor_guided():
    # slot (1, 1) at the row's last token has D = 0 only because its window is empty
    d = [[0.5, 0.9], [0.2, 0.0]]
    cand, _, fa, idx, g_valid, sums = _classify(d, [[True, True], [True, False]])
    fa = np.asarray(fa)
    assert not np.asarray(cand)[1, 5] and np.asarray(cand).sum() == 3  # the step sees the classified ones
    assert not fa[1, 5] and fa[1, 2]  # the lowest *defined* D is the false alarm
    assert float(sums["undefined"]) == 1 and float(sums["classified"]) == 3 and float(sums["cand"]) == 4
    guided = {(r, int(np.asarray(idx)[r, 0])) for r in range(2) if np.asarray(g_valid)[r, 0]}
    assert (1, 1) not in guided and (0, 1) in guided
    # without the exclusion the empty window (D = 0) would be the false alarm
    _, _, fa_all, *_ = _classify(d, [[True, True], [True, True]])
    assert np.asarray(fa_all)[1, 5] and not np.asarray(fa_all)[1, 2]


def test_teacher_null_rule_in_classify_is_measured_not_a_quantile():
    d = [[0.5, 0.9], [0.2, 0.3]]
    null = [[0.6, 1.0], [0.3, 0.4]]  # every candidate within the teacher's own spread
    _, _, fa, idx, g_valid, sums = _classify(d, np.ones((2, 2), bool), null)
    assert float(sums["low"]) == 4 and np.asarray(fa).sum() == 4  # 100 %, not q = 30 %
    assert not np.asarray(g_valid).any()  # nothing left to guide
    _, _, fa, *_ = _classify(d, np.ones((2, 2), bool), [[0.1, 0.1], [0.1, 0.1]])
    assert not np.asarray(fa).any()


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
