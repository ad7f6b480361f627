"""Sampling warpers (temperature, top-k, top-p, greedy) against NumPy, and in distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.rollout import SamplingConfig, sample, sampling_logits, top_k_mask, top_p_mask
from topd_jax.rollout.sampling import argmax_first

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -1.0, -1.1, -2.5, -4.0], np.float32)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_warped_probs(logits, temperature, top_k, top_p):
    """Reference: divide by T, keep the k largest, then the smallest prefix of the sorted
    renormalised distribution whose mass reaches top_p; softmax of what is kept."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:
        p = np_softmax(np.where(keep, z, -np.inf))
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kept = np.zeros(z.shape, bool)
        kept[order[before < top_p]] = True
        keep &= kept
    return np.where(keep, np_softmax(np.where(keep, z, -np.inf)), 0.0)


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)), jnp.float32)
    for k in (1, 7, 50):
        keep = np.asarray(top_k_mask(logits, k))
        assert (keep.sum(axis=1) == k).all()
        ref = np.asarray(logits) >= np.sort(np.asarray(logits), axis=1)[:, -k][:, None]
        np.testing.assert_array_equal(keep, ref)
    assert np.asarray(top_k_mask(logits, 0)).all()
    tied = jnp.asarray(np.random.default_rng(1).integers(-3, 3, (4, 50)), jnp.float32)  # ties: all kept
    ref = np.asarray(tied) >= np.sort(np.asarray(tied), axis=1)[:, -7][:, None]
    np.testing.assert_array_equal(top_k_mask(tied, 7), ref)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(seed, p):
    logits = np.random.default_rng(seed).normal(scale=2.0, size=(2, 16)).astype(np.float32)
    keep = np.asarray(top_p_mask(jnp.asarray(logits), p))
    for row, kept in zip(logits, keep):
        probs = np_softmax(row.astype(np.float64))
        order = np.argsort(-probs)
        n = int(kept.sum())
        assert kept[order[:n]].all()  # the kept tokens are the n most likely
        assert probs[order[:n]].sum() >= p - 1e-6  # they reach p ...
        assert n == 1 or probs[order[:n - 1]].sum() < p + 1e-6  # ... and one fewer would not


def test_top_p_of_one_keeps_everything():
    assert np.asarray(top_p_mask(jnp.asarray(LOGITS[None]), 1.0)).all()


CONFIGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.5, top_k=4),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=0.8, top_k=6, top_p=0.7),
]


def spread_logits(vocab):
    """LOGITS for vocab 10; for a larger vocab the same ten values scattered over different
    512-token blocks of `categorical`, every other token at -25 (total mass ~1e-7)."""
    if vocab == LOGITS.size:
        return LOGITS
    logits = np.full(vocab, -25.0, np.float32)
    logits[np.linspace(3, vocab - 2, LOGITS.size).astype(int)] = LOGITS
    return logits


@pytest.mark.parametrize("vocab", [10, 3000], ids=["one_level", "two_level"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_sampled_frequencies_match_the_warped_softmax(config, vocab):
    """20,000 draws of one step (fixed seed). Tolerance: every token's frequency within
    5 standard errors sqrt(p (1 - p) / n) of its probability (a per-token false-alarm rate
    below 1e-6), tokens outside the top-k / top-p support never drawn."""
    n = 20_000
    logits = spread_logits(vocab)
    expected = np_warped_probs(logits, config.temperature, config.top_k, config.top_p)
    keys = jax.random.split(jax.random.key(1234), n)
    # vmap over keys only: the logits stay one row (nothing [n, vocab] is materialised)
    draw = jax.jit(jax.vmap(lambda k: sample(k[None], jnp.asarray(logits)[None], config)))
    tokens, logprobs = (np.asarray(x)[:, 0] for x in draw(keys))
    freq = np.bincount(tokens, minlength=vocab) / n
    assert (freq[expected == 0] == 0).all(), (freq, expected)
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12
    bad = np.flatnonzero(np.abs(freq - expected) > tol)
    assert bad.size == 0, (bad, freq[bad], expected[bad])
    # the returned log-probs are those of the sampling distribution
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-4)


def test_argmax_first_is_argmax_with_ties_to_the_first():
    x = jnp.asarray(np.random.default_rng(3).integers(0, 5, (50, 40)), jnp.float32)  # many ties
    np.testing.assert_array_equal(argmax_first(x), np.argmax(np.asarray(x), axis=1))


def test_sampling_logits_are_scaled_and_truncated():
    got = np.asarray(sampling_logits(jnp.asarray(LOGITS[None]), SamplingConfig(temperature=0.5, top_k=3)))[0]
    np.testing.assert_allclose(got[:3], LOGITS[:3] / 0.5)
    assert np.isneginf(got[3:]).all()


def test_greedy_returns_the_argmax_with_log_prob_zero():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(5, 30)), jnp.float32)
    tokens, logprobs = sample(jax.random.split(jax.random.key(0), 5), logits, SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=1))
    assert (np.asarray(logprobs) == 0).all()


def test_same_keys_same_tokens_and_rows_are_independent():
    logits = jnp.zeros((2, 1000), jnp.float32)  # uniform: two rows agreeing by chance is 1e-3
    keys = jax.random.split(jax.random.key(7), 2)
    a, _ = sample(keys, logits, SamplingConfig())
    b, _ = sample(keys, logits, SamplingConfig())
    np.testing.assert_array_equal(a, b)
    assert int(a[0]) != int(a[1])


@pytest.mark.parametrize("kwargs,name", [(dict(temperature=-1.0), "temperature=-1.0"),
                                         (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
                                         (dict(top_k=-2), "top_k=-2")])
def test_invalid_sampling_settings_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)
