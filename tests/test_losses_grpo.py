"""GRPO/TAPO loss pieces against float64 NumPy references, plus properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.losses import (
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
    ots_weights,
    policy_ratio_terms,
    token_entropy,
)

P, G = 3, 6
R, L, V = 4, 7, 9
SETTINGS = settings(max_examples=25, deadline=None)


# --- float64 NumPy references --------------------------------------------------------


def np_advantages(r, m, eps=1e-6, scale="std", ddof=0):
    out = np.zeros(r.shape)
    for i in range(r.shape[0]):
        x = r[i][m[i]].astype(np.float64)
        if len(x) == 0 or x.max() == x.min():
            continue
        a = x - x.mean()
        if scale == "std":
            a = a / (x.std(ddof=ddof) + eps)
        out[i][m[i]] = a
    return out


def np_surrogate(logp, old, adv, mask, cl, ch, w=None):
    adv = adv[:, None] if adv.ndim == 1 else adv
    ratio = np.exp(logp.astype(np.float64) - old)
    loss = -np.minimum(ratio * adv, np.clip(ratio, 1 - cl, 1 + ch) * adv)
    if w is not None:
        loss = loss * w
    return np.where(mask, loss, 0.0)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_case(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (R, L))).astype(np.float32)
    old = (logp + spread * rng.normal(size=(R, L))).astype(np.float32)
    mask = rng.random((R, L)) < 0.75
    mask[0] = False  # one empty row
    return logp, old, mask


rewards_st = st.lists(st.sampled_from([0.0, 1.0, 0.5, -2.0, 3.25]), min_size=P * G,
                      max_size=P * G).map(lambda v: np.array(v, np.float32).reshape(P, G))
mask_st = st.lists(st.booleans(), min_size=P * G, max_size=P * G).map(
    lambda v: np.array(v).reshape(P, G))


# --- advantages ------------------------------------------------------------------------


@SETTINGS
@given(r=rewards_st, m=mask_st, scale=st.sampled_from(["std", "none"]), ddof=st.sampled_from([0, 1]))
def test_advantages_match_numpy(r, m, scale, ddof):
    got = np.asarray(group_advantages(r, m, scale=scale, std_ddof=ddof))
    np.testing.assert_allclose(got, np_advantages(r, m, scale=scale, ddof=ddof), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(r=rewards_st, m=mask_st)
def test_advantages_sum_to_zero_per_group_and_padding_gets_zero(r, m):
    a = np.asarray(group_advantages(r, m))
    assert np.all(a[~m] == 0)
    for i in range(P):
        if len(set(r[i][m[i]].tolist())) >= 2:
            assert abs(a[i][m[i]].sum()) < 1e-4
            # population std: the real members get unit variance (up to eps)
            np.testing.assert_allclose(a[i][m[i]].std(), 1.0, rtol=1e-4)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1e6])
def test_zero_variance_group_gives_exactly_zero_advantage(value):
    r = np.array([[value] * G, [0, 1, 0, 1, 1, 0]], np.float32)
    for scale in ("std", "none"):
        a = np.asarray(group_advantages(r, scale=scale))
        assert np.all(a[0] == 0.0) and np.any(a[1] != 0)


def test_binary_rewards_give_the_textbook_values():
    # 2 right of 8: mean 0.25, population std sqrt(0.25 * 0.75)
    r = np.array([[1, 1, 0, 0, 0, 0, 0, 0]], np.float32)
    a = np.asarray(group_advantages(r, eps=0.0))
    s = np.sqrt(0.25 * 0.75)
    np.testing.assert_allclose(a[0, :2], 0.75 / s, rtol=1e-6)
    np.testing.assert_allclose(a[0, 2:], -0.25 / s, rtol=1e-6)
    a1 = np.asarray(group_advantages(r, eps=0.0, std_ddof=1))
    np.testing.assert_allclose(a1 / a, np.sqrt(7 / 8), rtol=1e-6)


def test_padding_rewards_never_leak_into_real_members():
    r = np.array([[1, 0, 1, np.nan, -np.inf, 9]], np.float32)
    m = np.array([[True, True, True, False, False, False]])
    a = np.asarray(group_advantages(r, m))
    np.testing.assert_allclose(a, np_advantages(np.nan_to_num(r), m), atol=1e-6)


def test_advantage_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="'zscore'"):
        group_advantages(np.zeros((2, 3)), scale="zscore")
    with pytest.raises(ValueError, match=r"rewards \(2, 3\).*group_mask \(2, 4\)"):
        group_advantages(np.zeros((2, 3)), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"\(6,\)"):
        group_advantages(np.zeros(6))


# --- clipped surrogate ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_clipped_surrogate_matches_numpy(seed, per_token_adv):
    logp, old, mask = token_case(seed, spread=0.7)
    rng = np.random.default_rng(seed + 100)
    adv = rng.normal(size=(R, L) if per_token_adv else (R,)).astype(np.float32)
    w = rng.uniform(0.01, 3, (R, L)).astype(np.float32)
    loss, clipped = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, weights=w)
    ref = np_surrogate(logp, old, adv, mask, 0.2, 0.28, w)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-5, atol=1e-6)
    ratio = np.exp(logp.astype(np.float64) - old)
    a = adv[:, None] if adv.ndim == 1 else adv
    expect_clipped = mask & (np.clip(ratio, 0.8, 1.28) * a < ratio * a - 1e-7)
    assert np.array_equal(np.asarray(clipped), expect_clipped)
    assert np.asarray(clipped).any(), "the case should exercise clipping"


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_clipping_is_inactive_at_ratio_one_and_gradient_is_minus_a_grad_logp(seed):
    logp, _, mask = token_case(seed)
    rng = np.random.default_rng(seed)
    adv = rng.normal(size=(R,)).astype(np.float32)
    w = rng.uniform(0.1, 2, (R, L)).astype(np.float32)

    def total(lp):
        return jnp.sum(clipped_surrogate(lp, lp, adv, mask, weights=w)[0])

    _, clipped = clipped_surrogate(logp, logp, adv, mask, weights=w)
    assert not np.asarray(clipped).any()
    grad = np.asarray(jax.grad(total)(jnp.asarray(logp)))
    np.testing.assert_allclose(grad, np.where(mask, -adv[:, None] * w, 0.0), rtol=1e-6, atol=1e-7)


def test_clipped_tokens_get_no_gradient_and_padding_garbage_is_harmless():
    logp = np.log(np.full((2, 3), 0.5, np.float32))
    old = np.log(np.array([[0.25, 0.5, 0.5], [0.5, 0.5, 0.5]], np.float32))  # ratio 2 at [0, 0]
    logp[1, 2], old[1, 1] = np.nan, -np.inf  # padding
    mask = np.array([[True, True, True], [True, False, False]])
    adv = np.array([1.0, -1.0], np.float32)

    def total(lp):
        return jnp.sum(clipped_surrogate(lp, old, adv, mask)[0])

    value, grad = jax.value_and_grad(total)(jnp.asarray(logp))
    grad = np.asarray(grad)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert grad[0, 0] == 0.0  # ratio 2 > 1.2 with A > 0: clipped
    np.testing.assert_allclose(grad[0, 1:], -1.0)
    np.testing.assert_allclose(grad[1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(float(value), -(1.2 + 1 + 1) + 1, rtol=1e-6)


def test_huge_log_ratio_stays_finite():
    logp = np.array([[0.0, -200.0]], np.float32)
    old = np.array([[-200.0, 0.0]], np.float32)
    for a in (1.0, -1.0):
        f = lambda lp: jnp.sum(clipped_surrogate(lp, old, np.array([a], np.float32), np.ones((1, 2), bool))[0])  # noqa: E731
        v, g = jax.value_and_grad(f)(jnp.asarray(logp))
        assert np.isfinite(v) and np.all(np.isfinite(np.asarray(g)))


def test_policy_ratio_terms_is_the_same_function_and_shapes_are_checked():
    assert policy_ratio_terms is clipped_surrogate
    logp, old, mask = token_case(0)
    with pytest.raises(ValueError, match=r"advantages \(3,\)"):
        clipped_surrogate(logp, old, np.zeros(3), mask)
    with pytest.raises(ValueError, match=r"logp \(4, 7\).*old_logp \(4, 6\)"):
        clipped_surrogate(logp, old[:, :6], np.zeros(R), mask)
    with pytest.raises(ValueError, match=r"weights \(4, 6\)"):
        clipped_surrogate(logp, old, np.zeros(R), mask, weights=np.ones((R, 6)))


# --- aggregation ----------------------------------------------------------------------


def test_aggregate_modes_match_their_definitions():
    x = np.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    s, n = aggregate(x, m, "token_mean")
    assert (float(s), float(n)) == (10.0, 4.0)
    s, n = aggregate(x, m, "sequence_mean")
    assert (float(s), float(n)) == (2.0 + 4.0, 2.0)
    with pytest.raises(ValueError, match="'mean'"):
        aggregate(x, m, "mean")


@SETTINGS
@given(seed=st.integers(0, 10_000), split=st.integers(1, R - 1),
       mode=st.sampled_from(["token_mean", "sequence_mean"]))
def test_aggregation_over_two_micro_batches_equals_the_full_batch(seed, split, mode):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(R, L)).astype(np.float32)
    m = rng.random((R, L)) < 0.5
    s, n = aggregate(x, m, mode)
    s1, n1 = aggregate(x[:split], m[:split], mode)
    s2, n2 = aggregate(x[split:], m[split:], mode)
    np.testing.assert_allclose(float(s1 + s2), float(s), rtol=1e-5, atol=1e-6)
    assert float(n1 + n2) == float(n)
    rows = [x[i][m[i]] for i in range(R) if m[i].any()]
    expect = (np.mean(np.concatenate(rows)) if mode == "token_mean"
              else np.mean([r.mean() for r in rows])) if rows else 0.0
    got = float(s) / float(n) if float(n) else 0.0
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


# --- KL to reference --------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(estimator):
    logp, ref, mask = token_case(3, spread=0.8)
    d = ref.astype(np.float64) - logp
    expect = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1}[estimator]
    got = np.asarray(kl_to_reference(logp, ref, mask, estimator))
    np.testing.assert_allclose(got, np.where(mask, expect, 0.0), rtol=1e-5, atol=1e-6)


def test_k3_is_nonnegative_zero_at_equality_and_unbiased_for_the_kl():
    rng = np.random.default_rng(0)
    lp = np_log_softmax(rng.normal(size=6))
    lq = np_log_softmax(rng.normal(size=6))
    tokens = rng.choice(6, size=20000, p=np.exp(lp))
    logp = lp[tokens][None].astype(np.float32)
    ref = lq[tokens][None].astype(np.float32)
    mask = np.ones_like(logp, bool)
    k3 = np.asarray(kl_to_reference(logp, ref, mask, "k3"))
    assert k3.min() >= 0 and np.all(np.asarray(kl_to_reference(logp, logp, mask)) == 0)
    exact = float(np.sum(np.exp(lp) * (lp - lq)))
    assert abs(k3.mean() - exact) < 0.05 * exact + 1e-3
    with pytest.raises(ValueError, match="'k4'"):
        kl_to_reference(logp, ref, mask, "k4")


# --- entropy and OTS ----------------------------------------------------------------------


def test_token_entropy_matches_numpy_and_tolerates_minus_inf():
    rng = np.random.default_rng(0)
    logits = (2 * rng.normal(size=(R, L, V))).astype(np.float32)
    logits[1, 2, :4] = -np.inf
    logits[2, 3] = np.nan  # masked
    mask = np.ones((R, L), bool)
    mask[2, 3] = False
    lp = np_log_softmax(np.where(np.isfinite(logits), logits, -1e30) / 0.7)
    expect = np.where(mask, -np.sum(np.where(lp > -1e20, np.exp(lp) * lp, 0.0), -1), 0.0)
    got = np.asarray(token_entropy(logits, mask, temperature=0.7))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda z: jnp.sum(token_entropy(z, mask)))(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(g)))


@SETTINGS
@given(seed=st.integers(0, 10_000), lo=st.sampled_from([0.01, 0.1, 0.5]),
       hi=st.sampled_from([1.0, 2.0, 10.0]))
def test_ots_weights_match_numpy_and_stay_within_bounds(seed, lo, hi):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(1e-6, 1, (R, L))).astype(np.float32)
    logp[0, 0] = -np.inf
    ent = rng.uniform(0, 5, (R, L)).astype(np.float32)
    mask = rng.random((R, L)) < 0.8
    mask[0, 0] = True
    w = np.asarray(ots_weights(logp, ent, mask, lo=lo, hi=hi))
    with np.errstate(over="ignore"):
        expect = np.clip(np.exp(logp.astype(np.float64) + ent), lo, hi)
    np.testing.assert_allclose(w, np.where(mask, expect, 0.0), rtol=1e-5)
    assert np.all((w[mask] >= lo) & (w[mask] <= hi)) and np.all(w[~mask] == 0)


def test_ots_weights_carry_no_gradient_and_reject_bad_bounds():
    logp, _, mask = token_case(1)
    g = jax.grad(lambda lp: jnp.sum(ots_weights(lp, jnp.ones((R, L)), mask)))(jnp.asarray(logp))
    assert np.all(np.asarray(g) == 0)
    with pytest.raises(ValueError, match="lo=0.0"):
        ots_weights(logp, logp, mask, lo=0.0)


def test_typical_tokens_weigh_about_one_and_surprising_ones_little():
    # uniform over 4: p = 1/4, H = log 4 -> w = 1; a token of probability 1e-4 under a
    # peaked distribution gets w = lo.
    logits = np.array([[[0.0] * 4, [10.0, 0.0, 0.0, 0.0]]], np.float32)
    mask = np.ones((1, 2), bool)
    ent = token_entropy(logits, mask)
    lp = np_log_softmax(logits)
    logp = np.array([[lp[0, 0, 2], lp[0, 1, 3]]], np.float32)
    w = np.asarray(ots_weights(logp, ent, mask))
    np.testing.assert_allclose(w[0, 0], 1.0, rtol=1e-5)
    assert w[0, 1] == pytest.approx(0.01)


def test_everything_jits():
    logp, old, mask = token_case(2)
    adv = group_advantages(jnp.asarray(np.arange(R * 2, dtype=np.float32).reshape(R, 2)))[:, 0]
    f = jax.jit(lambda lp: aggregate(clipped_surrogate(lp, old, adv, mask)[0] +
                                     0.1 * kl_to_reference(lp, old, mask), mask, "sequence_mean"))
    s, n = f(jnp.asarray(logp))
    assert np.isfinite(float(s)) and float(n) == float(np.sum(mask.any(-1)))
