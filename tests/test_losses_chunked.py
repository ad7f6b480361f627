"""chunked_token_divergence equals the unchunked path and never builds [B, T, V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.losses import chunked_opd_loss, chunked_token_divergence, opd_loss, token_divergence

B, T, DS, DT, V = 2, 13, 8, 12, 40


def make_inputs(seed, *, teacher_vocab=V, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    hs = jax.random.normal(k[0], (B, T, DS), dtype)
    ws = (jax.random.normal(k[1], (DS, V)) / 2).astype(dtype)
    ht = jax.random.normal(k[2], (B, T, DT), dtype)
    wt = (jax.random.normal(k[3], (DT, teacher_vocab)) / 2).astype(dtype)
    mask = jax.random.bernoulli(k[4], 0.75, (B, T))
    return hs, ws, ht, wt, mask


def unchunked(hs, ws, ht, wt, mask, **kw):
    f32 = jnp.float32
    return token_divergence(hs.astype(f32) @ ws.astype(f32), ht.astype(f32) @ wt.astype(f32), mask, **kw)


def weighted_sum(fn, weights, **kw):
    # A generic linear functional of the per-token output, so the test exercises
    # arbitrary cotangents, not just a plain sum.
    return lambda hs, ws, ht, wt, mask: jnp.sum(weights * fn(hs, ws, ht, wt, mask, **kw))


@pytest.mark.parametrize(
    "chunk_size,kind",
    [(1, "reverse_kl"), (4, "forward_kl"), (5, "jsd"), (13, "reverse_kl"), (64, "reverse_kl")],
)
def test_chunked_values_and_gradients_equal_unchunked(chunk_size, kind):
    args = make_inputs(0)
    weights = jax.random.uniform(jax.random.key(1), (B, T))
    got = chunked_token_divergence(*args, chunk_size=chunk_size, kind=kind, beta=0.3)
    want = unchunked(*args, kind=kind, beta=0.3)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)

    chunked_loss = weighted_sum(chunked_token_divergence, weights, chunk_size=chunk_size, kind=kind, beta=0.3)
    plain_loss = weighted_sum(unchunked, weights, kind=kind, beta=0.3)
    g_chunk = jax.jit(jax.grad(chunked_loss, argnums=(0, 1, 2, 3)))(*args)
    g_plain = jax.grad(plain_loss, argnums=(0, 1))(*args)
    for a, b in zip(g_chunk[:2], g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The teacher is constant.
    assert not np.any(g_chunk[2]) and not np.any(g_chunk[3])


def test_chunked_truncates_padded_lm_head_columns():
    hs, ws, ht, wt, mask = make_inputs(2, teacher_vocab=V + 8)
    got = chunked_token_divergence(hs, ws, ht, wt, mask, chunk_size=4)
    want = unchunked(hs, ws, ht, wt[:, :V], mask)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_chunked_accepts_bfloat16_and_computes_in_float32():
    args = make_inputs(3, dtype=jnp.bfloat16)
    got = jax.jit(lambda *a: chunked_token_divergence(*a, chunk_size=4))(*args)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, unchunked(*args), rtol=1e-4, atol=1e-5)
    g = jax.grad(lambda hs: chunked_token_divergence(hs, *args[1:], chunk_size=4).sum())(args[0])
    assert g.dtype == jnp.bfloat16
    # The float32 gradient of the unchunked path at the same (bf16-valued) inputs, to bf16
    # precision (8 mantissa bits: ~0.4 % per element, plus the bf16 rounding of the logits).
    want = jax.grad(lambda hs: unchunked(hs, *args[1:]).sum())(args[0].astype(jnp.float32))
    scale = float(np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32), want, rtol=2e-2, atol=2e-2 * scale)


def test_chunked_masked_positions_are_zero_and_ignore_their_hidden_states():
    hs, ws, ht, wt, mask = make_inputs(4)
    noisy = jnp.where(mask[..., None], hs, jnp.nan)
    got = chunked_token_divergence(noisy, ws, ht, wt, mask, chunk_size=5)
    np.testing.assert_array_equal(got, chunked_token_divergence(hs, ws, ht, wt, mask, chunk_size=5))
    assert np.all(np.asarray(got)[~np.asarray(mask)] == 0)


def _sub_jaxprs(eqn):
    for param in eqn.params.values():
        for p in param if isinstance(param, (tuple, list)) else (param,):
            if hasattr(p, "eqns"):  # an open Jaxpr (remat, custom_vjp bodies)
                yield p
            elif hasattr(getattr(p, "jaxpr", None), "eqns"):  # a ClosedJaxpr (scan, jit)
                yield p.jaxpr


def _largest_intermediate(jaxpr) -> int:
    """Largest array size produced anywhere in a jaxpr, sub-jaxprs included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in _sub_jaxprs(eqn):
            biggest = max(biggest, _largest_intermediate(sub))
    return biggest


def test_no_full_sequence_logits_in_forward_or_backward():
    batch, seq, chunk, d, vocab = 2, 64, 8, 4, 1000
    hs = jnp.ones((batch, seq, d))
    w = jnp.ones((d, vocab))
    mask = jnp.ones((batch, seq), bool)

    def chunked(hs, w):
        return chunked_token_divergence(hs, w, hs, w, mask, chunk_size=chunk).sum()

    def plain(hs, w):
        return unchunked(hs, w, hs, w, mask).sum()

    def fused(hs, w):
        return chunked_opd_loss(hs, w, hs, w, mask, chunk_size=chunk)[0]

    full = batch * seq * vocab
    fused_peak = _largest_intermediate(jax.make_jaxpr(jax.grad(fused, argnums=(0, 1)))(hs, w).jaxpr)
    assert fused_peak <= batch * chunk * vocab
    chunked_peak = _largest_intermediate(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(hs, w).jaxpr)
    plain_peak = _largest_intermediate(jax.make_jaxpr(jax.grad(plain, argnums=(0, 1)))(hs, w).jaxpr)
    assert plain_peak >= full  # the checker does see the naive path's [B, T, V]
    assert chunked_peak <= batch * chunk * vocab


@pytest.mark.parametrize("chunk_size,kind", [(4, "reverse_kl"), (13, "jsd")])
def test_fused_chunked_opd_loss_equals_the_composition_in_value_and_gradient(chunk_size, kind):
    hs, ws, ht, wt, mask = make_inputs(6, teacher_vocab=V + 3)
    weights = jax.random.uniform(jax.random.key(7), (B, T))

    def composed(hs, ws, ht, wt):
        total, count = opd_loss(unchunked(hs, ws, ht, wt[:, :V], mask, kind=kind, beta=0.3), mask, weights)
        return total / count

    def fused(hs, ws, ht, wt):
        total, count = chunked_opd_loss(hs, ws, ht, wt, mask, weights, chunk_size=chunk_size, kind=kind, beta=0.3)
        return total / count

    np.testing.assert_allclose(jax.jit(fused)(hs, ws, ht, wt), composed(hs, ws, ht, wt), rtol=2e-5)
    g_fused = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    g_plain = jax.grad(composed, argnums=(0, 1))(hs, ws, ht, wt)
    for a, b in zip(g_fused[:2], g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.any(g_fused[2]) and not np.any(g_fused[3])
    # Forward-only use (no custom_vjp forward rule) gives the same value.
    total, count = chunked_opd_loss(hs, ws, ht, wt, mask, weights, chunk_size=chunk_size, kind=kind, beta=0.3)
    assert float(count) == pytest.approx(float(jnp.sum(weights * mask)), rel=1e-6)


def test_fused_loss_accepts_bfloat16_and_keeps_gradient_dtypes():
    hs, ws, ht, wt, mask = make_inputs(8, dtype=jnp.bfloat16)
    grads = jax.grad(lambda hs, ws: chunked_opd_loss(hs, ws, ht, wt, mask, chunk_size=4)[0], argnums=(0, 1))(hs, ws)
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    want = jax.grad(lambda hs, ws: opd_loss(unchunked(hs, ws, ht, wt, mask), mask)[0], argnums=(0, 1))(hs, ws)
    for a, b in zip(grads, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-3)


def test_chunked_rejects_mismatched_shapes_with_both_shapes_named():
    hs, ws, ht, wt, mask = make_inputs(5)
    with pytest.raises(ValueError, match=r"student_lm_head \(9, 40\)"):
        chunked_token_divergence(hs, jnp.zeros((9, V)), ht, wt, mask)
    with pytest.raises(ValueError, match="batch/seq differ"):
        chunked_token_divergence(hs, ws, ht[:, :5], wt, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_divergence(hs, ws, ht, wt, mask, chunk_size=0)
