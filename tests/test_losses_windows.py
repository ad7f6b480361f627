"""near_future_window / near_future_count against a naive double loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.losses import near_future_count, near_future_window

SETTINGS = settings(max_examples=30, deadline=None)
jit_window = jax.jit(near_future_window, static_argnames=("window", "reduce", "decay"))


def naive_window(values, mask, window, reduce, decay):
    """The definition, literally: a float64 double loop over t and i."""
    values = np.asarray(values, np.float64)
    out = np.zeros(values.shape)
    count = np.zeros(values.shape, np.int64)
    for row in np.ndindex(values.shape[:-1]):
        length = values.shape[-1]
        for t in range(length):
            total = weight = 0.0
            for i in range(window):
                j = t + 1 + i
                if j < length and mask[row + (j,)]:
                    g = 1.0 if decay is None else decay**i
                    total += g * values[row + (j,)]
                    weight += g
                    count[row + (t,)] += 1
            if reduce == "sum":
                out[row + (t,)] = total
            else:
                out[row + (t,)] = total / weight if weight > 0 else 0.0
    return out, count


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    shape=st.sampled_from([(1, 1), (2, 9), (3, 24)]),
    window=st.sampled_from([1, 3, 8, 30]),
    reduce=st.sampled_from(["sum", "mean"]),
    decay=st.sampled_from([None, 0.5, 0.9, 1.0]),
    keep=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_window_equals_naive_double_loop(seed, shape, window, reduce, decay, keep):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape) < keep
    got = jit_window(values, mask, window=window, reduce=reduce, decay=decay)
    want, count = naive_window(values, mask, window, reduce, decay)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(near_future_count(mask, window), count)


def test_mean_is_zero_where_no_valid_future_position():
    values = jnp.arange(6.0)[None]
    mask = jnp.array([[1, 1, 1, 0, 0, 0]], bool)
    got = near_future_window(values, mask, 2)
    np.testing.assert_allclose(got, [[1.5, 2.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(near_future_count(mask, 2), [[2, 1, 0, 0, 0, 0]])
    assert np.all(np.asarray(near_future_window(values, jnp.zeros_like(mask), 3)) == 0)


def test_masked_values_are_never_read():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 20)).astype(np.float32)
    mask = rng.random((3, 20)) < 0.5
    poisoned = np.where(mask, values, np.nan)
    for decay in (None, 0.8):
        a = near_future_window(values, mask, 4, decay=decay)
        b = near_future_window(poisoned, mask, 4, decay=decay)
        np.testing.assert_array_equal(a, b)


def test_decayed_window_stays_accurate_over_long_rows():
    # gamma^-t formulations overflow float32 around t ~ 1700 at gamma = 0.95.
    rng = np.random.default_rng(2)
    length, window, decay = 6000, 50, 0.95
    values = rng.normal(size=(1, length)).astype(np.float32)
    mask = np.ones((1, length), bool)
    got = np.asarray(near_future_window(values, mask, window, reduce="sum", decay=decay))
    weights = decay ** np.arange(window)
    padded = np.concatenate([values[0].astype(np.float64), np.zeros(window)])
    want = np.array([padded[t + 1 : t + 1 + window] @ weights for t in range(length)])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0], want, atol=2e-4)


def test_window_larger_than_the_row_covers_the_rest_of_the_row():
    values = jnp.ones((2, 5))
    mask = jnp.ones((2, 5), bool)
    np.testing.assert_allclose(near_future_window(values, mask, 100, reduce="sum"), [[4, 3, 2, 1, 0]] * 2)


def test_vmap_and_bfloat16():
    rng = np.random.default_rng(3)
    values = jnp.asarray(rng.normal(size=(4, 2, 16)), jnp.bfloat16)
    mask = rng.random((4, 2, 16)) < 0.7
    mapped = jax.jit(jax.vmap(lambda v, m: near_future_window(v, m, 5, decay=0.9)))(values, mask)
    want, _ = naive_window(np.asarray(values, np.float32), mask, 5, "mean", 0.9)
    assert mapped.dtype == jnp.float32
    np.testing.assert_allclose(mapped, want, rtol=1e-5, atol=1e-5)


def test_gradient_is_the_window_membership_weight():
    # d/dv_j Σ_t window(t) = Σ_t [j ∈ t+1..t+K] γ^(j-t-1) m_j / weight_t: check against
    # the reference's Jacobian built column by column.
    rng = np.random.default_rng(4)
    values = rng.normal(size=(1, 12)).astype(np.float32)
    mask = rng.random((1, 12)) < 0.8
    f = lambda v: near_future_window(v, mask, 3, decay=0.7).sum()
    grad = np.asarray(jax.grad(f)(jnp.asarray(values)))
    eye = np.eye(12)
    want = np.array([naive_window(eye[j][None], mask, 3, "mean", 0.7)[0].sum() for j in range(12)])
    np.testing.assert_allclose(grad[0], want, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    v, m = jnp.zeros((1, 4)), jnp.ones((1, 4))
    with pytest.raises(ValueError, match="window"):
        near_future_window(v, m, 0)
    with pytest.raises(ValueError, match="reduce='max'"):
        near_future_window(v, m, 2, reduce="max")
    with pytest.raises(ValueError, match="decay"):
        near_future_window(v, m, 2, decay=1.5)
    with pytest.raises(ValueError, match=r"\(1, 4\).*\(1, 3\)"):
        near_future_window(v, m[:, :3], 2)
