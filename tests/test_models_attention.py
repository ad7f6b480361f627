"""topd_jax.models.attention: the chunked (flash) path equals the einsum oracle in values and
gradients under every mask the model produces, never reads cache slots past kv_len, merges
partial attentions exactly, and needs a fraction of the oracle's memory."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.models.attention import (attention, choose_impl, chunked_attention, cudnn_attention,
                                       merge_partials, naive_attention, splash_attention)


def _qkv(seed, b, t, n, kh, h, s=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kh, s, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kh, s, h)), dtype)
    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)  # cotangent weights
    return q, k, v, w


def _causal_slots(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _right_pad(lengths, t):
    return jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]


def _left_pad(lengths, t):
    return jnp.arange(t)[None, :] >= t - jnp.asarray(lengths)[:, None]


def _value_and_grads(fn, q, k, v, w):
    """fn's output and the gradient of sum(out * w), in one compiled call."""
    def both(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w.astype(out.dtype))
    return jax.jit(both)(q, k, v)


def _assert_matches_oracle(q, k, v, w, *, q_slots, kv_mask, kv_len=None, block_q, block_kv, tol=1e-5):
    naive = lambda q, k, v: naive_attention(q, k, v, q_slots=q_slots, kv_mask=kv_mask, kv_len=kv_len)
    chunk = lambda q, k, v: chunked_attention(q, k, v, q_slots=q_slots, kv_mask=kv_mask, kv_len=kv_len,
                                              block_q=block_q, block_kv=block_kv)
    out_n, grads_n = _value_and_grads(naive, q, k, v, w)
    out_c, grads_c = _value_and_grads(chunk, q, k, v, w)
    assert out_c.dtype == q.dtype and out_c.shape == q.shape
    np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_n, np.float32), atol=tol, rtol=tol)
    for name, gc, gn in zip("qkv", grads_c, grads_n):
        assert np.isfinite(np.asarray(gc, np.float32)).all(), name
        np.testing.assert_allclose(np.asarray(gc, np.float32), np.asarray(gn, np.float32), atol=tol, rtol=tol,
                                   err_msg=f"d{name}")


def test_einsum_oracle_equals_jax_dot_product_attention():
    """The oracle itself against an independent reference: jax.nn.dot_product_attention (its xla
    implementation, GQA native) with the slot rule as a dense [B, 1, T, S] mask, at every query
    that sees at least one slot (jax's masked rows are not 0)."""
    b, t, s = 2, 6, 11
    q, k, v, _ = _qkv(13, b, t, 4, 2, 8, s=s)
    mask = jnp.asarray(np.random.default_rng(14).random((b, s)) < 0.7).at[:, 0].set(True)
    slots = jnp.asarray([[2, 3, 5, 7, 8, 10], [0, 1, 4, 6, 9, 10]], jnp.int32)
    visible = (jnp.arange(s)[None, None, :] <= slots[:, :, None]) & mask[:, None, :]  # [B, T, S]
    want = jax.nn.dot_product_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=visible[:, None],
                                        implementation="xla")
    got = naive_attention(q, k, v, q_slots=slots, kv_mask=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


# GQA ratios 1, 2, 4; blocks that divide T = 12, that do not, that exceed it
@pytest.mark.parametrize("n,kh,block_q,block_kv", [(4, 4, 4, 4), (4, 2, 5, 3), (8, 2, 64, 64), (8, 2, 3, 5)])
def test_chunked_matches_einsum_causal_with_right_padding(n, kh, block_q, block_kv):
    b, t, h = 2, 12, 8
    q, k, v, w = _qkv(0, b, t, n, kh, h)
    _assert_matches_oracle(q, k, v, w, q_slots=_causal_slots(b, t), kv_mask=_right_pad([12, 7], t),
                           block_q=block_q, block_kv=block_kv)


def test_chunked_matches_einsum_with_left_padding():
    b, t = 3, 11
    q, k, v, w = _qkv(1, b, t, 4, 2, 8)
    _assert_matches_oracle(q, k, v, w, q_slots=_causal_slots(b, t), kv_mask=_left_pad([11, 6, 1], t),
                           block_q=4, block_kv=3)


def test_chunked_matches_einsum_with_branch_gaps():
    """A branched cache row: prefix slots [0, 5), slots [5, 9) masked out (the other branch's
    suffix), continuation written from slot 9; queries sit in slots 9.. 13."""
    b, s, t = 2, 16, 5
    q, k, v, w = _qkv(2, b, t, 4, 2, 8, s=s)
    mask = np.zeros((b, s), bool)
    mask[0, :5], mask[0, 9:14] = True, True
    mask[1, :3], mask[1, 9:14] = True, True
    slots = jnp.broadcast_to(9 + jnp.arange(t, dtype=jnp.int32), (b, t))
    _assert_matches_oracle(q, k, v, w, q_slots=slots, kv_mask=jnp.asarray(mask), block_q=2, block_kv=4)


def test_chunked_matches_einsum_for_decode_with_kv_len():
    b, s, index = 2, 20, 9
    q, k, v, w = _qkv(3, b, 1, 4, 2, 8, s=s)
    mask = jnp.asarray(np.arange(s)[None, :] <= index).repeat(b, 0).at[1, 2].set(False)
    slots = jnp.full((b, 1), index, jnp.int32)
    _assert_matches_oracle(q, k, v, w, q_slots=slots, kv_mask=mask, kv_len=jnp.int32(index + 1),
                           block_q=1, block_kv=4)


def test_chunked_matches_einsum_in_bfloat16():
    b, t = 2, 24
    q, k, v, w = _qkv(4, b, t, 4, 2, 16, dtype=jnp.bfloat16)
    _assert_matches_oracle(q, k, v, w, q_slots=_causal_slots(b, t), kv_mask=_right_pad([24, 17], t),
                           block_q=8, block_kv=5, tol=3e-2)


def test_chunked_bfloat16_vjp_of_a_jitted_call_keeps_the_input_dtype():
    """jax.vjp(jax.jit(f)) (TOPD's fused main pass) needs the custom VJP's primal output dtype to
    equal the function's: bf16 in, bf16 out, and the same numbers as the jit-outside path."""
    b, t = 1, 16
    q, k, v, w = _qkv(6, b, t, 4, 2, 8, dtype=jnp.bfloat16)
    fn = lambda q, k, v: chunked_attention(q, k, v, q_slots=_causal_slots(b, t), kv_mask=_right_pad([16], t),
                                           block_q=8, block_kv=8)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    grads = vjp(w.astype(out.dtype))
    out_ref, grads_ref = _value_and_grads(fn, q, k, v, w)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_ref, np.float32))
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=1e-2, rtol=1e-2)


def test_rows_with_no_visible_slot_are_zero_with_zero_gradient():
    """Left padding: query 0 of row 1 is padding and sees no real slot."""
    b, t = 2, 6
    q, k, v, w = _qkv(5, b, t, 2, 1, 4)
    mask = _left_pad([6, 3], t)
    for impl in ("xla", "chunked"):
        fn = lambda q: attention(q, k, v, q_slots=_causal_slots(b, t), kv_mask=mask, impl=impl, block_q=2,
                                 block_kv=2)
        out, dq = jax.jit(lambda q: (fn(q), jax.grad(lambda q: jnp.sum(fn(q) * w))(q)))(q)
        np.testing.assert_array_equal(np.asarray(out[1, :3]), 0.0)
        np.testing.assert_array_equal(np.asarray(dq[1, :3]), 0.0)
        assert np.isfinite(np.asarray(out)).all()


@settings(max_examples=5, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(1, 9), extra_s=st.integers(0, 5), ratio=st.sampled_from([1, 2]),
       kh=st.integers(1, 2), block_q=st.integers(1, 6), block_kv=st.integers(1, 6), seed=st.integers(0, 99))
def test_chunked_matches_einsum_property(b, t, extra_s, ratio, kh, block_q, block_kv, seed):
    """Random shapes, random key masks, queries at random increasing slots of a longer row."""
    s = t + extra_s
    q, k, v, w = _qkv(seed, b, t, kh * ratio, kh, 4, s=s)
    rng = np.random.default_rng(seed + 1)
    mask = jnp.asarray(rng.random((b, s)) < 0.7)
    slots = jnp.asarray(np.sort(rng.choice(s, size=(b, t), replace=True), axis=1), jnp.int32)
    _assert_matches_oracle(q, k, v, w, q_slots=slots, kv_mask=mask, block_q=block_q, block_kv=block_kv)


def test_decode_never_reads_slots_at_or_past_kv_len():
    """Unfilled cache slots hold NaN: the chunked path stays finite and equals the oracle over the
    filled slots; the einsum, which reads every slot, turns NaN."""
    b, s, fill, kh, h = 2, 40, 13, 2, 8
    q, k, v, _ = _qkv(6, b, 1, 4, kh, h, s=s)
    k_nan, v_nan = k.at[:, :, fill:].set(jnp.nan), v.at[:, :, fill:].set(jnp.nan)
    mask = jnp.asarray(np.arange(s)[None, :] < fill).repeat(b, 0)
    slots = jnp.full((b, 1), fill - 1, jnp.int32)
    got = jax.jit(lambda q, k, v, n: chunked_attention(q, k, v, q_slots=slots, kv_mask=mask, kv_len=n,
                                                      block_q=1, block_kv=8))(q, k_nan, v_nan, jnp.int32(fill))
    want = naive_attention(q, k[:, :, :fill], v[:, :, :fill], q_slots=slots, kv_mask=mask[:, :fill])
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert np.isnan(np.asarray(naive_attention(q, k_nan, v_nan, q_slots=slots, kv_mask=mask,
                                               kv_len=jnp.int32(fill)))).all()


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_merge_partials_of_disjoint_halves_equals_attention_over_all(impl):
    b, t, s = 2, 5, 14
    q, k, v, _ = _qkv(7, b, t, 4, 2, 8, s=s)
    mask = jnp.asarray(np.random.default_rng(8).random((b, s)) < 0.8)
    slots = jnp.broadcast_to(jnp.arange(9, 9 + t, dtype=jnp.int32), (b, t))
    split = np.arange(s) < 6  # first half: slots [0, 6); second: [6, 14)
    kw = dict(q_slots=slots, impl=impl, block_q=2, block_kv=4, return_stats=True)
    part_a = attention(q, k, v, kv_mask=mask & split, **kw)
    part_b = attention(q, k, v, kv_mask=mask & ~split, **kw)
    out, m, l = merge_partials(*part_a, *part_b)
    want, m_all, l_all = attention(q, k, v, kv_mask=mask, **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_all), atol=1e-6)
    np.testing.assert_allclose(np.asarray(l), np.asarray(l_all), rtol=1e-5)


def test_return_stats_agree_between_xla_and_chunked():
    b, t = 2, 7
    q, k, v, _ = _qkv(9, b, t, 4, 2, 8)
    kw = dict(q_slots=_causal_slots(b, t), kv_mask=_left_pad([7, 4], t), return_stats=True)
    (o1, m1, l1), (o2, m2, l2) = (attention(q, k, v, impl=i, block_q=3, block_kv=2, **kw) for i in ("xla", "chunked"))
    assert m1.shape == l1.shape == (b, 4, t)
    for a, c in ((o1, o2), (m1, m2), (l1, l2)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_chunked_training_memory_is_a_quarter_of_the_einsum_at_4096_tokens():
    """Compiled forward + backward of attention at T = 4096 (1 row, 4 query heads, 2 kv heads):
    XLA's temp allocation for the chunked path is at most 1/4 of the einsum's."""
    b, t, n, kh, h = 1, 4096, 4, 2, 64
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    slots, mask = _causal_slots(b, t), jnp.ones((b, t), bool)

    def temp_bytes(impl):
        def loss(q, k, v):
            out = attention(q, k, v, q_slots=slots, kv_mask=mask, impl=impl, block_q=512, block_kv=512)
            return jnp.sum(out * out)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            spec(b, t, n, h), spec(b, kh, t, h), spec(b, kh, t, h)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive, chunked = temp_bytes("xla"), temp_bytes("chunked")
    assert naive >= 2 * n * t * t * 4  # the [B, N, T, S] float32 scores (and their gradient) are there
    assert chunked * 4 <= naive, (chunked, naive)


# ------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("backend,dtype,layout,want", [
    ("gpu", jnp.bfloat16, "causal", "cudnn"),
    ("gpu", jnp.float16, "causal", "cudnn"),
    ("gpu", jnp.float32, "causal", "chunked"),  # cuDNN has no float32 flash kernel
    ("gpu", jnp.bfloat16, "any", "chunked"),  # a cache (q_slots not arange(T)): no fused form
    ("tpu", jnp.bfloat16, "causal", "splash"),
    ("tpu", jnp.float32, "causal", "splash"),
    ("tpu", jnp.bfloat16, "any", "chunked"),
    ("cpu", jnp.bfloat16, "causal", "chunked"),
    ("cpu", jnp.float32, "any", "chunked"),
])
def test_choose_impl_auto(backend, dtype, layout, want):
    assert choose_impl("auto", backend, dtype, layout=layout) == want


def test_choose_impl_auto_uses_chunked_for_decode_and_stats():
    assert choose_impl("auto", "gpu", jnp.bfloat16, layout="causal", decode=True) == "chunked"
    assert choose_impl("auto", "tpu", jnp.bfloat16, layout="causal", return_stats=True) == "chunked"


def test_choose_impl_explicit_choices_and_errors():
    assert choose_impl("xla", "gpu", jnp.float32) == "xla"
    assert choose_impl("chunked", "tpu", jnp.float32) == "chunked"
    with pytest.raises(ValueError, match="impl='flash'"):
        choose_impl("flash", "cpu", jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        choose_impl("cudnn", "gpu", jnp.float32, layout="causal")
    with pytest.raises(ValueError, match="layout='causal'"):
        choose_impl("splash", "tpu", jnp.float32, layout="any")


def test_attention_rejects_bad_shapes_naming_them():
    q, k, v, _ = _qkv(0, 2, 4, 4, 2, 8)
    with pytest.raises(ValueError, match=r"q_slots \(2, 3\)"):
        attention(q, k, v, q_slots=jnp.zeros((2, 3), jnp.int32), kv_mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="kv_mask"):
        attention(q, k, v, q_slots=jnp.zeros((2, 4), jnp.int32), kv_mask=jnp.ones((2, 5), bool))
    pad_slot = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 0)))  # S = 5 keys for T = 4 queries
    with pytest.raises(ValueError, match="S = 5 slots"):
        attention(q, pad_slot(k), pad_slot(v), q_slots=jnp.zeros((2, 4), jnp.int32),
                  kv_mask=jnp.ones((2, 5), bool), layout="causal")
    with pytest.raises(ValueError, match="not a multiple of K"):
        attention(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1), q_slots=jnp.zeros((2, 4), jnp.int32),
                  kv_mask=jnp.ones((2, 4), bool))


def _causal_case(seed, b, t, n, kh, h):
    q, k, v, w = _qkv(seed, b, t, n, kh, h)
    rng = np.random.default_rng(seed + 1)
    mask = np.stack([np.arange(t) >= t // 3, np.arange(t) < t - 5] + [rng.random(t) < 0.7 for _ in range(b - 2)])
    mask = jnp.asarray(mask)
    want = naive_attention(q, k, v, q_slots=_causal_slots(b, t), kv_mask=mask)
    return q, k, v, mask, jnp.where(mask[:, :, None, None], want, 0)  # fused kernels zero padding queries


def test_cudnn_row_compaction_equals_the_slot_rule_for_any_key_mask():
    """The cuDNN path gathers each row's real tokens to the front, runs causal attention with
    sequence lengths, and scatters back; through jax's xla implementation (same call, CPU) it
    equals the oracle at real queries for left padding, right padding and gaps."""
    q, k, v, mask, want = _causal_case(10, 3, 12, 4, 2, 8)
    got = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, kv_mask=mask, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_splash_in_pallas_interpret_mode_equals_the_oracle():
    """TPU splash attention run by the Pallas interpreter on CPU (T = 120 padded to one 128 block):
    values and the gradient of q at real queries, with left padding, right padding and gaps."""
    q, k, v, mask, want = _causal_case(11, 3, 120, 2, 1, 64)
    run = lambda q: splash_attention(q, k, v, kv_mask=mask, block_q=128, block_kv=128, interpret=True)
    got, dq = jax.jit(lambda q: (run(q), jax.grad(lambda q: jnp.sum(run(q) ** 2))(q)))(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    oracle = lambda q: jnp.where(mask[:, :, None, None], naive_attention(q, k, v, q_slots=_causal_slots(3, 120),
                                                                         kv_mask=mask), 0)
    np.testing.assert_allclose(np.asarray(dq), np.asarray(jax.grad(lambda q: jnp.sum(oracle(q) ** 2))(q)),
                               atol=1e-4, rtol=1e-4)


def test_splash_under_a_mesh_runs_in_a_shard_map_and_equals_the_oracle():
    """With jax.set_mesh (data 2 x tensor 2), splash runs per device (batch and heads split) and
    still equals the oracle at real queries."""
    from topd_jax.sharding import MeshConfig, make_mesh

    q, k, v, mask, want = _causal_case(12, 2, 128, 4, 2, 64)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    fn = jax.jit(lambda q, k, v: splash_attention(q, k, v, kv_mask=mask, block_q=128, block_kv=128,
                                                  interpret=True))
    with jax.set_mesh(mesh):
        assert "manual" in fn.lower(q, k, v).as_text()  # the shard_map's manual computation
        got = fn(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_splash_call_matches_installed_jax_signature():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    params = inspect.signature(sk.make_splash_mha).parameters
    for name in ("block_sizes", "head_shards", "q_seq_shards", "interpret"):
        assert name in params, name
    assert {"q", "kv"} <= set(inspect.signature(sk.SegmentIds).parameters)
    assert {"block_q", "block_kv", "block_q_dkv", "block_q_dq"} <= set(inspect.signature(sk.BlockSizes).parameters)


def test_cudnn_call_matches_installed_jax_signature():
    params = inspect.signature(jax.nn.dot_product_attention).parameters
    for name in ("is_causal", "query_seq_lengths", "key_value_seq_lengths", "implementation"):
        assert name in params, name


# ------------------------------------------------------------------------------- in the model
def _model_logits_and_grads(impl, ids, mask, *, remat="none", dtype="float32"):
    from flax import nnx

    from tests._hf_tiny import random_model
    from topd_jax.models import ModelConfig, default_positions

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=48, attention=impl, attention_block_q=3, attention_block_kv=4,
                      remat=remat, dtype=dtype)
    graphdef, params, rest = nnx.split(random_model(cfg), nnx.Param, ...)

    @jax.jit
    def run(params):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(ids, attention_mask=mask, positions=default_positions(mask))
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, logits), grads = run(params)
    return np.asarray(logits), jax.tree.map(np.asarray, grads)


def test_model_with_chunked_attention_equals_einsum_at_real_positions():
    """Left-padded, right-padded and full rows: logits at real positions and every parameter
    gradient of a masked loss agree between attention='chunked' and 'xla' (the old path), with
    per-layer remat (the custom VJP under nnx.remat)."""
    remat = "dots"
    rng = np.random.default_rng(0)
    t = 10
    ids = jnp.asarray(rng.integers(0, 64, (3, t)), jnp.int32)
    mask = jnp.asarray(np.stack([np.arange(t) >= 3, np.arange(t) < 6, np.ones(t, bool)]))
    logits_x, grads_x = _model_logits_and_grads("xla", ids, mask, remat=remat)
    logits_c, grads_c = _model_logits_and_grads("chunked", ids, mask, remat=remat)
    real = np.asarray(mask)
    np.testing.assert_allclose(logits_c[real], logits_x[real], atol=2e-5, rtol=2e-5)
    for gx, gc in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_c)):
        np.testing.assert_allclose(gc, gx, atol=2e-5, rtol=2e-4)


def test_model_config_rejects_unknown_attention_naming_it():
    from topd_jax.models import ModelConfig

    with pytest.raises(ValueError, match="attention='flash'"):
        ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                    intermediate_size=8, attention="flash")
    with pytest.raises(ValueError, match="attention_block_kv=0"):
        ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                    intermediate_size=8, attention_block_kv=0)


def test_small_model_training_memory_is_a_quarter_of_the_einsum_at_4096_tokens():
    """Compiled forward + backward of a whole (small) model at T = 4096 — embedding, one decoder
    layer with GQA, final norm, LM head and a token-mean log-likelihood — needs at most a quarter
    of the einsum path's XLA temporaries with attention='chunked'. Compile only; nothing runs."""
    from flax import nnx

    from topd_jax.models import ModelConfig, default_positions, init_model

    t = 4096
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def temp_bytes(impl):
        cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                          intermediate_size=128, attention=impl)
        graphdef, params, rest = nnx.split(init_model(cfg), nnx.Param, ...)

        def loss(params, ids, mask):
            logits = nnx.merge(graphdef, params, rest)(ids, attention_mask=mask, positions=default_positions(mask))
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(jnp.where(mask[:, 1:], logp, 0.0)) / jnp.maximum(mask[:, 1:].sum(), 1)

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        compiled = jax.jit(jax.grad(loss)).lower(abstract, ids, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive, chunked = temp_bytes("xla"), temp_bytes("chunked")
    assert naive >= 4 * t * t * 4  # the [1, 4, T, T] float32 scores are there
    assert chunked * 4 <= naive, (chunked, naive)
