"""select_candidates (greedy top-C with separation), quantile variant, masked_quantile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.losses import masked_quantile, select_candidates, select_candidates_quantile

SETTINGS = settings(max_examples=30, deadline=None)
jit_select = jax.jit(select_candidates, static_argnames=("num", "min_separation"))


def greedy_reference(loss, mask, num, min_separation):
    out = np.zeros(loss.shape, bool)
    for row in range(loss.shape[0]):
        available = mask[row].copy()
        for _ in range(num):
            if not available.any():
                break
            best = int(np.argmax(np.where(available, loss[row], -np.inf)))
            out[row, best] = True
            lo, hi = max(0, best - min_separation + 1), best + min_separation
            available[lo:hi] = False
    return out


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    length=st.sampled_from([1, 7, 40]),
    num=st.sampled_from([0, 1, 3, 6]),
    min_separation=st.sampled_from([1, 2, 8]),
    keep=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_candidates_equal_greedy_reference_and_respect_separation(seed, length, num, min_separation, keep):
    rng = np.random.default_rng(seed)
    loss = rng.random((3, length)).astype(np.float32)  # distinct with probability 1
    mask = rng.random((3, length)) < keep
    got = np.asarray(jit_select(loss, mask, num=num, min_separation=min_separation))
    np.testing.assert_array_equal(got, greedy_reference(loss, mask, num, min_separation))
    for row in range(3):
        picked = np.flatnonzero(got[row])
        assert len(picked) <= num and np.all(mask[row, picked])
        assert np.all(np.diff(picked) >= min_separation)
        # Every unpicked valid position is either lower than all picks or blocked by one.
        for j in np.flatnonzero(mask[row] & ~got[row]):
            blocked = np.any(np.abs(picked - j) < min_separation)
            assert blocked or (len(picked) == num and np.all(loss[row, j] <= loss[row, picked]))


def test_the_top_candidate_is_the_row_maximum_and_ties_go_left():
    loss = jnp.array([[0.1, 0.9, 0.2, 0.9, 0.0, 0.3]])
    got = select_candidates(loss, jnp.ones_like(loss, bool), num=2, min_separation=3)
    # 0.9 at 1 (leftmost of the tie) blocks 0..3, including the other 0.9; then 0.3 at 5.
    np.testing.assert_array_equal(got, [[False, True, False, False, False, True]])


def test_fewer_candidates_when_the_row_is_short_or_masked():
    loss = jnp.arange(10.0)[None].repeat(2, 0)
    mask = jnp.array([[1] * 10, [0] * 10], bool)
    got = select_candidates(loss, mask, num=5, min_separation=4)
    assert int(got[0].sum()) == 3  # positions 9, 5, 1
    np.testing.assert_array_equal(np.flatnonzero(got[0]), [1, 5, 9])
    assert int(got[1].sum()) == 0


def test_masked_values_never_win_and_nan_or_neg_inf_valid_losses_are_still_selectable():
    loss = jnp.array([[100.0, jnp.nan, -jnp.inf, 1.0]])
    mask = jnp.array([[0, 1, 1, 1]], bool)
    got = select_candidates(loss, mask, num=3, min_separation=1)
    np.testing.assert_array_equal(got, [[False, True, True, True]])
    top = select_candidates(loss, mask, num=1, min_separation=1)
    np.testing.assert_array_equal(top, [[False, False, False, True]])


def test_vmap_and_bfloat16_candidates():
    rng = np.random.default_rng(0)
    loss = rng.random((4, 2, 30)).astype(np.float32)
    mask = rng.random((4, 2, 30)) < 0.8
    mapped = jax.jit(jax.vmap(lambda l, m: select_candidates(l, m, num=3, min_separation=4)))
    np.testing.assert_array_equal(mapped(loss, mask), select_candidates(loss, mask, num=3, min_separation=4))
    half = select_candidates(jnp.asarray(loss, jnp.bfloat16), mask, num=3, min_separation=4)
    assert half.dtype == jnp.bool_ and int(half.sum()) == int(mapped(loss, mask).sum())


@SETTINGS
@given(seed=st.integers(0, 2**31), q=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]), keep=st.sampled_from([0.2, 1.0]))
def test_masked_quantile_equals_numpy_quantile(seed, q, keep):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 17)).astype(np.float32)
    mask = rng.random((3, 17)) < keep
    got = jax.jit(masked_quantile, static_argnames=("q", "axis"))(x, mask, q=q)
    for row in range(3):
        want = np.quantile(x[row][mask[row]], q) if mask[row].any() else 0.0
        assert float(got[row]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    whole = masked_quantile(x, mask, q, axis=None)
    assert float(whole) == pytest.approx(np.quantile(x[mask], q) if mask.any() else 0.0, rel=1e-5, abs=1e-6)


def test_quantile_candidates_are_the_positions_above_the_row_quantile():
    rng = np.random.default_rng(5)
    loss = rng.random((2, 50)).astype(np.float32)
    mask = rng.random((2, 50)) < 0.7
    loss_nan = np.where(mask, loss, np.nan)
    got = np.asarray(select_candidates_quantile(loss_nan, mask, quantile=0.8))
    for row in range(2):
        threshold = np.quantile(loss[row][mask[row]], 0.8)
        np.testing.assert_array_equal(got[row], mask[row] & (loss[row] > threshold))
    flat = select_candidates_quantile(jnp.ones((1, 5)), jnp.ones((1, 5)), quantile=0.5)
    assert not np.any(np.asarray(flat))


def test_bad_arguments_raise():
    x = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="min_separation"):
        select_candidates(x, x, num=2, min_separation=0)
    with pytest.raises(ValueError, match="num"):
        select_candidates(x, x, num=-1)
    with pytest.raises(ValueError, match="quantile"):
        masked_quantile(x, x, 1.5)
