"""token_divergence / sampled_token_kl against a float64 NumPy reference, plus properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from topd_jax.losses import (
    common_vocab_size,
    sampled_token_kl,
    token_divergence,
    truncate_to_common_vocab,
)

B, T, V = 2, 5, 11
SETTINGS = settings(max_examples=25, deadline=None)


# --- float64 NumPy reference -------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


def np_divergence(s_logits, t_logits, mask, kind, beta=0.5, temperature=1.0):
    ls = np_log_softmax(np.asarray(s_logits, np.float64) / temperature)
    lt = np_log_softmax(np.asarray(t_logits, np.float64) / temperature)
    if kind == "reverse_kl":
        d = np_kl(ls, lt)
    elif kind == "forward_kl":
        d = np_kl(lt, ls)
    elif beta == 0.0:
        d = np_kl(lt, ls)
    elif beta == 1.0:
        d = np_kl(ls, lt)
    else:
        lm = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
        d = beta * np_kl(lt, lm) + (1 - beta) * np_kl(ls, lm)
    return np.where(mask, d, 0.0)


def random_case(seed, scale=3.0, shape=(B, T, V)):
    rng = np.random.default_rng(seed)
    s = (scale * rng.normal(size=shape)).astype(np.float32)
    t = (scale * rng.normal(size=shape)).astype(np.float32)
    mask = rng.random(shape[:-1]) < 0.7
    return s, t, mask


jit_div = jax.jit(token_divergence, static_argnames=("kind", "beta", "temperature"))


# --- against the reference ---------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(["reverse_kl", "forward_kl", "jsd"]),
    beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    temperature=st.sampled_from([1.0, 0.7, 2.0]),
)
def test_token_divergence_matches_numpy_reference(seed, kind, beta, temperature):
    s, t, mask = random_case(seed)
    got = jit_div(s, t, mask, kind=kind, beta=beta, temperature=temperature)
    want = np_divergence(s, t, mask, kind, beta, temperature)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


# --- properties --------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(["reverse_kl", "forward_kl", "jsd"]))
def test_divergence_is_nonnegative_and_zero_for_identical_distributions(seed, kind):
    s, t, mask = random_case(seed)
    assert np.all(np.asarray(jit_div(s, t, mask, kind=kind)) >= -1e-6)
    # Identical distributions (also up to a per-row shift of the logits) give 0.
    same = jit_div(s, s + 4.0, np.ones(mask.shape, bool), kind=kind)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=2e-6)


def test_kl_is_positive_when_distributions_differ():
    s, t, _ = random_case(0)
    full = np.ones((B, T), bool)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        assert np.all(np.asarray(jit_div(s, t, full, kind=kind)) > 1e-3), kind


def test_reverse_and_forward_kl_differ_on_asymmetric_inputs():
    # A peaked student vs a flat teacher: mode-seeking vs mean-seeking disagree.
    s = jnp.array([[[8.0, 0.0, 0.0, 0.0]]])
    t = jnp.zeros((1, 1, 4))
    m = jnp.ones((1, 1), bool)
    rev = float(token_divergence(s, t, m, kind="reverse_kl")[0, 0])
    fwd = float(token_divergence(s, t, m, kind="forward_kl")[0, 0])
    assert rev == pytest.approx(np_divergence(s, t, m, "reverse_kl")[0, 0], rel=1e-5)
    assert fwd == pytest.approx(np_divergence(s, t, m, "forward_kl")[0, 0], rel=1e-5)
    assert abs(rev - fwd) > 1.0


def test_jsd_endpoints_are_the_named_kls():
    s, t, mask = random_case(3)
    rev = jit_div(s, t, mask, kind="reverse_kl")
    fwd = jit_div(s, t, mask, kind="forward_kl")
    np.testing.assert_allclose(jit_div(s, t, mask, kind="jsd", beta=0.0), fwd, rtol=1e-6)
    np.testing.assert_allclose(jit_div(s, t, mask, kind="jsd", beta=1.0), rev, rtol=1e-6)
    # The classic JSD (beta = 0.5) is symmetric and bounded by log 2.
    half = jit_div(s, t, mask, kind="jsd", beta=0.5)
    swapped = jit_div(t, s, mask, kind="jsd", beta=0.5)
    np.testing.assert_allclose(half, swapped, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(half) <= np.log(2) + 1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(["reverse_kl", "jsd"]))
def test_changing_masked_out_logits_changes_nothing(seed, kind):
    s, t, mask = random_case(seed)
    rng = np.random.default_rng(seed + 1)
    s2, t2 = s.copy(), t.copy()
    s2[~mask] = rng.normal(size=s2[~mask].shape) * 100
    t2[~mask] = np.nan  # not even NaN leaks
    a = jit_div(s, t, mask, kind=kind)
    b = jit_div(s2, t2, mask, kind=kind)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.asarray(a)[~mask] == 0)
    grad = jax.grad(lambda x: token_divergence(x, t2, mask, kind=kind).sum())(s2)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~mask] == 0)


def test_padding_positions_do_not_change_valid_results():
    s, t, mask = random_case(5)
    pad_s = np.concatenate([s, np.random.default_rng(0).normal(size=(B, 3, V))], axis=1)
    pad_t = np.concatenate([t, np.zeros((B, 3, V))], axis=1)
    pad_m = np.concatenate([mask, np.zeros((B, 3), bool)], axis=1)
    short = token_divergence(s, t, mask)
    long = token_divergence(pad_s, pad_t, pad_m)
    np.testing.assert_allclose(long[:, :T], short, rtol=1e-6)
    assert np.all(np.asarray(long[:, T:]) == 0)


def test_neg_inf_logits_and_all_neg_inf_rows_give_no_nan():
    # Shared -inf entries (banned tokens) and a row that is all -inf.
    s = jnp.array([[[0.0, -jnp.inf, 1.0], [-jnp.inf] * 3]])
    t = jnp.array([[[1.0, -jnp.inf, 0.0], [-jnp.inf] * 3]])
    m = jnp.ones((1, 2), bool)
    for kind, beta in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)):
        div = token_divergence(s, t, m, kind=kind, beta=beta)
        want = np_divergence(s[:, :1, [0, 2]], t[:, :1, [0, 2]], m[:, :1], kind, beta)
        np.testing.assert_allclose(div[0, 0], want[0, 0], rtol=1e-5)
        assert float(div[0, 1]) == 0.0
        grad = jax.grad(lambda x: token_divergence(x, t, m, kind=kind, beta=beta).sum())(s)
        assert np.all(np.isfinite(np.asarray(grad))), kind


def test_bfloat16_inputs_compute_in_float32():
    s, t, mask = random_case(7)
    got = jit_div(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), mask)
    want = np_divergence(
        np.asarray(jnp.asarray(s, jnp.bfloat16), np.float32),
        np.asarray(jnp.asarray(t, jnp.bfloat16), np.float32),
        mask,
        "reverse_kl",
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_vmap_over_an_extra_leading_axis_equals_the_batched_call():
    s, t, mask = random_case(8, shape=(3, B, T, V))
    mapped = jax.jit(jax.vmap(lambda a, b, m: token_divergence(a, b, m, kind="jsd", beta=0.3)))
    np.testing.assert_allclose(
        mapped(s, t, mask), token_divergence(s, t, mask, kind="jsd", beta=0.3), rtol=1e-6
    )


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3),
                                       ("jsd", 0.0), ("jsd", 1.0)])
def test_gradient_matches_float64_finite_differences(kind, beta):
    """In float64 (x64) the central differences are exact to ~1e-10, so the tolerance can be
    tight; float32 inputs give the same values to float32 precision."""
    s, t, mask = random_case(9, scale=1.0, shape=(1, 3, 6))
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        f = jax.jit(lambda x: token_divergence(x, t64, mask, kind=kind, beta=beta).sum())
        assert f(s64).dtype == jnp.float64
        check_grads(f, (s64,), order=1, modes=("rev",), atol=1e-8, rtol=1e-7, eps=1e-5)
        grad64 = np.asarray(jax.grad(f)(s64))
    f32 = jax.jit(lambda x: token_divergence(x, t, mask, kind=kind, beta=beta).sum())
    np.testing.assert_allclose(jax.grad(f32)(jnp.asarray(s)), grad64, rtol=1e-4, atol=1e-6)
    # And the analytic reverse-KL gradient, d/dz KL(p_s||p_t) = p_s (log p_s - log p_t - KL).
    if kind == "reverse_kl":
        ls, lt = np_log_softmax(s), np_log_softmax(t)
        kl = np_kl(ls, lt)[..., None]
        want = np.exp(ls) * (ls - lt - kl) * mask[..., None]
        np.testing.assert_allclose(grad64, want, rtol=1e-10, atol=1e-12)


def test_vocab_padding_is_truncated_to_the_common_size():
    s, t, mask = random_case(10)
    padded_t = np.concatenate([t, np.full((B, T, 5), 30.0, np.float32)], axis=-1)
    np.testing.assert_allclose(
        token_divergence(s, padded_t, mask), token_divergence(s, t, mask), rtol=1e-6
    )
    assert common_vocab_size(151936, 152064) == 151936
    a, b = truncate_to_common_vocab(jnp.zeros((2, 152064)), jnp.zeros((2, 151936)))
    assert a.shape == b.shape == (2, 151936)


def test_different_vocabularies_raise_naming_both_sizes():
    with pytest.raises(ValueError, match=r"151936.*32000"):
        token_divergence(jnp.zeros((1, 2, 151936)), jnp.zeros((1, 2, 32000)), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="kind='kl'"):
        token_divergence(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)), jnp.ones((1, 2)), kind="kl")
    with pytest.raises(ValueError, match="mask"):
        token_divergence(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)), jnp.ones((1, 3)))


def test_sampled_token_kl_is_the_masked_log_ratio():
    rng = np.random.default_rng(11)
    ls, lt = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = rng.random((B, T)) < 0.6
    lt_nan = np.where(mask, lt, np.nan)
    got = jax.jit(sampled_token_kl)(jnp.asarray(ls, jnp.bfloat16), lt_nan, mask)
    want = np.where(mask, np.asarray(jnp.asarray(ls, jnp.bfloat16), np.float32) - lt, 0.0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        sampled_token_kl(ls, lt[:, :2], mask)


def test_sampled_estimator_averages_to_the_reverse_kl():
    # E_{y ~ p_s}[log p_s(y) - log p_t(y)] = KL(p_s || p_t).
    s, t, _ = random_case(12, scale=1.0, shape=(1, 1, V))
    ls, lt = np_log_softmax(s)[0, 0], np_log_softmax(t)[0, 0]
    ys = jax.random.categorical(jax.random.key(0), jnp.asarray(ls), shape=(40000,))
    est = sampled_token_kl(jnp.asarray(ls)[ys][None], jnp.asarray(lt)[ys][None], jnp.ones((1, 40000)))
    assert float(est.mean()) == pytest.approx(np_kl(ls, lt), abs=0.02)
