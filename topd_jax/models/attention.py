"""Attention: the one place the model computes softmax(q k^T / sqrt(h)) v.

    out[b, t, j] = sum_s p[b, j, t, s] v[b, j // g, s],   p = softmax_s(q[b, t, j] . k[b, j // g, s] / sqrt(h))

over the slots s that query (b, t) may see: s <= q_slots[b, t] and kv_mask[b, s] (and s < kv_len).
One rule covers causal training rows, left or right padding, the gaps rollout branching leaves
in a cache row, and decode (one query in slot `index` over the whole cache).

Implementations (`impl`, config key `model.attention`):

- ``xla``: the naive einsum; materialises [B, K, G, T, S] float32 scores. The test oracle.
- ``chunked``: online-softmax ("flash") attention in plain JAX. Query blocks x key blocks,
  running max / sum in float32, O(T * block) memory; a custom VJP recomputes each block's
  probabilities from the saved log-sum-exp (FlashAttention-2 backward), so training memory is
  O(T * h) per layer too. Key blocks no query of a block can see (causality, ``kv_len``) are
  never read: forward and backward loop over a dynamic number of blocks.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` with ``is_causal`` and
  sequence lengths, never a dense mask (GPU, bf16/fp16). Only for the "causal" layout
  (q_slots = arange(T), S = T): each row's real tokens are first gathered to the front in order
  (a stable sort), so any key mask becomes a prefix of length len_b, and scattered back after.
- ``splash``: TPU splash attention (Pallas), "causal" layout: causal mask + segment ids
  (real = 1, padding = 0).
- ``auto``: `choose_impl`: cudnn on GPU (bf16/fp16), splash on TPU, for the "causal" layout
  without kv_len or statistics; chunked otherwise (decode, caches with gaps, CPU).

Letters: b batch, t query positions, s key slots, n query heads, k kv heads, g query heads per
kv head (n = k g), h head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from topd_jax.sharding.rules import _active_rules, logical_to_spec

IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
LAYOUTS = ("any", "causal")
# A finite stand-in for -inf: the running max of a row that has seen no visible slot yet.
_NEG = -1e30


# ------------------------------------------------------------------------------- entry point
def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array, kv_mask: jax.Array,
              kv_len: jax.Array | int | None = None, impl: str = "auto", block_q: int = 512,
              block_kv: int = 512, return_stats: bool = False, layout: str = "any"):
    """q [B, T, N, H]; k, v [B, K, S, H] (kv-heads-major: the cache layout, no transpose);
    q_slots [B, T] int32: slot index of each query; kv_mask [B, S] bool: slot holds a real token.

    Query (b, t) sees slot s iff s <= q_slots[b, t] and kv_mask[b, s] (causal by slot + key mask;
    this covers padding (left or right), gaps from rollout branching, and decode).
    kv_len: None, or an int32 scalar (traced ok): no slot >= kv_len is visible AND no key/value
    block starting at or beyond kv_len is read (decode cost follows the filled length).
    GQA: query head j uses kv head j // (N/K), without repeating K/V in memory.
    Softmax statistics in float32; output [B, T, N, H] in q.dtype. A query with no visible slot
    returns 0 (not NaN).
    return_stats=True also returns (m [B, N, T] running max, l [B, N, T] sum of exp(score - m)),
    float32, so that partial attentions over disjoint key sets merge exactly (`merge_partials`).
    Rows with no visible slot have l = 0. The stats path is forward-only (decode).
    layout: "any", or "causal" when the caller guarantees q_slots[b] = arange(T) and S = T
    (self-attention over the T tokens, any kv_mask); only "causal" lets cudnn / splash run.
    For cudnn / splash, query rows that are themselves padding (kv_mask[b, t] False) come back
    as 0; every implementation agrees at real rows.
    """
    _check_inputs(q, k, v, q_slots, kv_mask, layout)
    chosen = choose_impl(impl, jax.default_backend(), q.dtype, layout=layout,
                         return_stats=return_stats, decode=kv_len is not None)
    if chosen == "xla":
        return naive_attention(q, k, v, q_slots=q_slots, kv_mask=kv_mask, kv_len=kv_len,
                               return_stats=return_stats)
    if chosen == "chunked":
        return chunked_attention(q, k, v, q_slots=q_slots, kv_mask=kv_mask, kv_len=kv_len,
                                 block_q=block_q, block_kv=block_kv, return_stats=return_stats)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, kv_mask=kv_mask)
    return splash_attention(q, k, v, kv_mask=kv_mask, block_q=block_q, block_kv=block_kv)


def choose_impl(impl: str, backend: str, dtype, *, layout: str = "any", return_stats: bool = False,
                decode: bool = False) -> str:
    """The implementation `attention` runs: `impl` itself unless it is "auto".

    auto: gpu + bf16/fp16 + causal layout -> cudnn; tpu + causal layout -> splash; else chunked
    (a cache with gaps, decode (kv_len) and partial statistics need the general slot rule).
    An explicit cudnn / splash that cannot honour the request raises (no silent fallback).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; expected one of {IMPLS}")
    fused_ok = layout == "causal" and not return_stats and not decode
    if impl == "auto":
        if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and fused_ok:
            return "cudnn"
        if backend == "tpu" and fused_ok:
            return "splash"
        return "chunked"
    if impl in ("cudnn", "splash") and not fused_ok:
        raise ValueError(f"attention impl={impl!r} needs layout='causal' (q_slots = arange(T), S = T), "
                         f"no kv_len and no return_stats; got layout={layout!r}, "
                         f"decode={decode}, return_stats={return_stats}. Use 'chunked' or 'auto'.")
    if impl == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention impl='cudnn' needs bfloat16 or float16 inputs, got {jnp.dtype(dtype)}")
    return impl


def _check_inputs(q, k, v, q_slots, kv_mask, layout):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q {q.shape} must be [B, T, N, H] and k {k.shape}, v {v.shape} "
                         f"the same [B, K, S, H]")
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h or n % k.shape[1]:
        raise ValueError(f"attention: q {q.shape} [B, T, N, H] and k {k.shape} [B, K, S, H] disagree "
                         f"(batch, head_dim, or N not a multiple of K)")
    if q_slots.shape != (b, t):
        raise ValueError(f"attention: q_slots {q_slots.shape} must be [B, T] = {(b, t)}")
    if kv_mask.shape != (b, k.shape[2]):
        raise ValueError(f"attention: kv_mask {kv_mask.shape} must be [B, S] = {(b, k.shape[2])}")
    if layout not in LAYOUTS:
        raise ValueError(f"attention layout={layout!r}; expected one of {LAYOUTS}")
    if layout == "causal" and k.shape[2] != t:
        raise ValueError(f"attention layout='causal' is self-attention over the T = {t} queries, "
                         f"but k {k.shape} has S = {k.shape[2]} slots")


def _visible(q_slots, kv_mask, kv_len, slots):
    """[B, T, S'] bool for the key slots `slots` [S'] (kv_mask given for those slots, [B, S'])."""
    vis = (slots[None, None, :] <= q_slots[:, :, None]) & kv_mask[:, None, :]
    if kv_len is not None:
        vis = vis & (slots < kv_len)[None, None, :]
    return vis


# ------------------------------------------------------------------------------- xla (oracle)
def naive_attention(q, k, v, *, q_slots, kv_mask, kv_len=None, return_stats=False):
    """The einsum reference: [B, K, G, T, S] float32 scores in memory. Same contract as `attention`."""
    b, t, n, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, k, g, h]
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * h**-0.5
    vis = _visible(q_slots, kv_mask.astype(bool), kv_len, jnp.arange(s))[:, None, None]  # [B,1,1,T,S]
    masked = jnp.where(vis, scores, _NEG)
    m = jnp.max(masked, axis=-1, keepdims=True)  # [B, k, g, T, 1]
    e = jnp.where(vis, jnp.exp(masked - m), 0.0)  # exp of finite values only: no NaN in the gradient
    l = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / jnp.where(l > 0, l, 1.0)).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, n, h).astype(q.dtype)
    if not return_stats:
        return out
    return out, m[..., 0].reshape(b, n, t), l[..., 0].reshape(b, n, t)


# ------------------------------------------------------------------------------- merging partials
def merge_partials(out_a, m_a, l_a, out_b, m_b, l_b):
    """Exact softmax attention over the union of two disjoint key sets, from each set's
    (out [B, T, N, H], m [B, N, T], l [B, N, T]) as `attention(..., return_stats=True)` returns
    them. Returns the merged (out, m, l); rows empty in both stay 0 with l = 0."""
    m = jnp.maximum(m_a, m_b)
    wa = l_a * jnp.exp(m_a - m)  # [B, N, T]
    wb = l_b * jnp.exp(m_b - m)
    l = wa + wb
    denom = jnp.where(l > 0, l, 1.0)
    to_btn = lambda w: jnp.transpose(w / denom, (0, 2, 1))[..., None]  # [B, T, N, 1]
    out = to_btn(wa) * out_a.astype(jnp.float32) + to_btn(wb) * out_b.astype(jnp.float32)
    return out.astype(out_a.dtype), m, l


# ------------------------------------------------------------------------------- chunked (flash)
def chunked_attention(q, k, v, *, q_slots, kv_mask, kv_len=None, block_q=512, block_kv=512,
                      return_stats=False):
    """Online-softmax attention, same contract as `attention`. Blocks need not divide T or S
    (inputs are padded internally; padded queries see nothing, padded slots are masked)."""
    b, t, n, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    bq, bkv = max(1, min(block_q, t)), max(1, min(block_kv, s))
    tp, sp = -(-t // bq) * bq, -(-s // bkv) * bkv
    qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, k, g, T, h]
    qg = jnp.pad(qg, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    slots = jnp.pad(q_slots.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    mask = jnp.pad(kv_mask.astype(bool), ((0, 0), (0, sp - s)))
    limit = jnp.asarray(s if kv_len is None else jnp.minimum(kv_len, s), jnp.int32)
    if return_stats:
        out, m, l = _flash_forward(qg, kp, vp, slots, mask, limit, bq, bkv)
        stats = (m[..., :t].reshape(b, n, t), l[..., :t].reshape(b, n, t))
    else:
        out = _flash(qg, kp, vp, slots, mask, limit, bq, bkv)
    out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
    return (out, *stats) if return_stats else out


def _kv_blocks_needed(slots_blk, limit, bkv):
    """Key blocks [0, n) hold every slot the queries of `slots_blk` [B, bq] may see."""
    hi = jnp.minimum(jnp.max(slots_blk) + 1, limit)  # one past the last visible slot
    return (jnp.maximum(hi, 0) + bkv - 1) // bkv


def _block_scores(q_blk, k, v, slots_blk, mask, limit, j, bkv):
    """Scores of query block q_blk [B, k, g, bq, h] against key block j: (s [B, k, g, bq, bkv] f32,
    vis [B, 1, 1, bq, bkv], v_blk [B, k, bkv, h]). Invisible slots' k / v are zeroed, so garbage
    (even NaN) in unfilled cache slots never reaches the result."""
    h = q_blk.shape[-1]
    start = j * bkv
    k_blk = jax.lax.dynamic_slice_in_dim(k, start, bkv, axis=2)  # [B, k, bkv, h]
    v_blk = jax.lax.dynamic_slice_in_dim(v, start, bkv, axis=2)
    m_blk = jax.lax.dynamic_slice_in_dim(mask, start, bkv, axis=1)  # [B, bkv]
    slot_ids = start + jnp.arange(bkv)
    vis = _visible(slots_blk, m_blk, limit, slot_ids)  # [B, bq, bkv]
    live = (m_blk & (slot_ids < limit)[None])[:, None, :, None]  # [B, 1, bkv, 1]
    k_blk, v_blk = jnp.where(live, k_blk, 0), jnp.where(live, v_blk, 0)
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * h**-0.5
    return s, vis[:, None, None], v_blk, k_blk


def _flash_forward(qg, k, v, slots, mask, limit, bq, bkv):
    """qg [B, k, g, Tp, h] -> (out [B, k, g, Tp, h] f32, m, l [B, k, g, Tp] f32)."""
    b, kh, g, tp, h = qg.shape

    def q_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)  # [B, k, g, bq, h]
        slots_blk = jax.lax.dynamic_slice_in_dim(slots, i * bq, bq, axis=1)  # [B, bq]

        def kv_step(j, carry):
            acc, m, l = carry
            s, vis, v_blk, _ = _block_scores(q_blk, k, v, slots_blk, mask, limit, j, bkv)
            m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, _NEG), axis=-1))
            p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)  # [B, k, g, bq, bkv]
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            return acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

        init = (jnp.zeros((b, kh, g, bq, h), jnp.float32), jnp.full((b, kh, g, bq), _NEG, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32))
        acc, m, l = jax.lax.fori_loop(0, _kv_blocks_needed(slots_blk, limit, bkv), kv_step, init)
        return acc / jnp.where(l > 0, l, 1.0)[..., None], m, l

    out, m, l = jax.lax.map(q_block, jnp.arange(tp // bq))  # [nq, B, k, g, bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tp, h)
    m = jnp.moveaxis(m, 0, 3).reshape(b, kh, g, tp)
    l = jnp.moveaxis(l, 0, 3).reshape(b, kh, g, tp)
    return out, m, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(qg, k, v, slots, mask, limit, bq, bkv):
    # the same dtype as _flash_fwd's primal output (custom_vjp requires it under jit(vjp))
    return _flash_forward(qg, k, v, slots, mask, limit, bq, bkv)[0].astype(qg.dtype)


def _flash_fwd(qg, k, v, slots, mask, limit, bq, bkv):
    out, m, l = _flash_forward(qg, k, v, slots, mask, limit, bq, bkv)
    # log-sum-exp per row; +inf for rows with no visible slot, so their recomputed p is exp(-inf) = 0
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    out = out.astype(qg.dtype)
    return out, (qg, k, v, slots, mask, limit, out, lse)


def _flash_bwd(bq, bkv, res, d_out):
    """FlashAttention-2 backward: for each key block j (scan), for each query block i that can
    see it (dynamic range + cond): p = exp(s - lse), dv_j += p^T dO_i, ds = p (dO_i v_j^T - D_i),
    dq_i += ds k_j / sqrt(h), dk_j += ds^T q_i / sqrt(h), with D = rowsum(dO * O)."""
    qg, k, v, slots, mask, limit, out, lse = res
    b, kh, g, tp, h = qg.shape
    sp = k.shape[2]
    nq = tp // bq
    scale = h**-0.5
    dt = qg.dtype
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, k, g, Tp]
    q_max = jnp.max(slots.reshape(b, nq, bq), axis=(0, 2))  # [nq]: last slot any query of block i sees

    def kv_block(dq, j):
        def q_step(i, carry):
            dq, dk_j, dv_j = carry

            def compute(carry):
                dq, dk_j, dv_j = carry
                q_blk = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
                slots_blk = jax.lax.dynamic_slice_in_dim(slots, i * bq, bq, axis=1)
                s, vis, v_blk, k_blk = _block_scores(q_blk, k, v, slots_blk, mask, limit, j, bkv)
                lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)[..., None]
                p = jnp.where(vis, jnp.exp(s - lse_i), 0.0)  # [B, k, g, bq, bkv]
                do_i = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=3)  # [B, k, g, bq, h]
                dl_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)[..., None]
                # matmul operands in the input dtype, float32 accumulation (as the forward)
                mm = lambda spec, x, y: jnp.einsum(spec, x.astype(dt), y.astype(dt), preferred_element_type=jnp.float32)
                dv_j = dv_j + mm("bkgqs,bkgqh->bksh", p, do_i)
                dp = mm("bkgqh,bksh->bkgqs", do_i, v_blk)
                ds = p * (dp - dl_i) * scale
                dq_i = jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=3)
                dq_i = dq_i + mm("bkgqs,bksh->bkgqh", ds, k_blk)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=3)
                dk_j = dk_j + mm("bkgqs,bkgqh->bksh", ds, q_blk)
                return dq, dk_j, dv_j

            sees = q_max[i] >= j * bkv
            return jax.lax.cond(sees, compute, lambda c: c, (dq, dk_j, dv_j))

        zeros = jnp.zeros((b, kh, bkv, h), jnp.float32)
        live = j * bkv < limit
        n_q = jnp.where(live, nq, 0)
        dq, dk_j, dv_j = jax.lax.fori_loop(0, n_q, q_step, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qg.shape, jnp.float32), jnp.arange(sp // bkv))
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kh, sp, h)  # [nkv, B, k, bkv, h] -> [B, k, S, h]
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, kh, sp, h)
    return dq.astype(qg.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------- cudnn (GPU)
def compact_rows(kv_mask):
    """(perm, inverse, lengths): perm [B, T] lists each row's real slots first, in order (a stable
    sort), so gathering by perm turns any key mask into a prefix of lengths [B] real tokens;
    gathering by inverse undoes it. Causal order among real tokens is kept, so causal attention
    over the compacted row equals the slot rule at every real query."""
    mask = kv_mask.astype(bool)
    perm = jnp.argsort(~mask, axis=-1, stable=True)
    return perm, jnp.argsort(perm, axis=-1), jnp.sum(mask.astype(jnp.int32), axis=-1)


def cudnn_attention(q, k, v, *, kv_mask, implementation="cudnn"):
    """Causal layout (q_slots = arange(T), S = T): cuDNN flash attention with is_causal and
    sequence lengths on the compacted rows (`compact_rows`), never a dense mask (which cuDNN
    would turn into a [B, N, T, S] bias). Padding query rows come back as 0. `implementation`
    "xla" runs the same compaction through jax's einsum path (how CPU tests check it)."""
    perm, inverse, lengths = compact_rows(kv_mask)
    take = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
    qc = take(q, perm)  # [B, T, N, H]
    kc, vc = take(jnp.swapaxes(k, 1, 2), perm), take(jnp.swapaxes(v, 1, 2), perm)  # [B, S, K, H]
    out = jax.nn.dot_product_attention(qc, kc, vc, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return jnp.where(kv_mask[:, :, None, None], take(out, inverse), 0).astype(q.dtype)


# ------------------------------------------------------------------------------- splash (TPU)
def splash_attention(q, k, v, *, kv_mask, block_q=512, block_kv=512, interpret=False):
    """Causal layout (q_slots = arange(T), S = T): TPU splash attention with a causal mask and
    segment ids (real = 1, padding = 0), so padding rows see only padding and never an empty row;
    those rows are then zeroed. T is padded up to a multiple of the block (at least 128).
    With a mesh set (`jax.set_mesh`), runs in a shard_map: batch over the "act_batch" axes, heads
    over "act_heads" when query and kv heads split alike (else heads stay whole)."""
    b, t, n, h = q.shape
    block = max(128, min(block_q, block_kv, -(-t // 128) * 128))
    tp = -(-t // block) * block
    pad = tp - t
    seg = jnp.pad(kv_mask.astype(jnp.int32), ((0, 0), (0, pad)))  # [B, Tp]; padded tail: segment 0
    qh = jnp.pad(q * jnp.asarray(h**-0.5, q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))  # [B, K, Tp, h]
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    local = functools.partial(_splash_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(qh, kp, vp, seg)
    else:
        sizes, rules = dict(mesh.shape), _active_rules()
        batch = logical_to_spec(("act_batch",), (b,), sizes, rules)[0]
        heads = logical_to_spec(("act_heads",), (n,), sizes, rules)[0]
        if logical_to_spec(("act_heads",), (k.shape[1],), sizes, rules)[0] != heads:
            heads = None  # kv heads cannot split like query heads: keep heads whole
        qkv_spec = P(batch, heads, None, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
                            out_specs=qkv_spec, check_vma=False)(qh, kp, vp, seg)
    out = out.transpose(0, 2, 1, 3)[:, :t]  # [B, T, N, h]
    return jnp.where(kv_mask[:, :, None, None], out, 0).astype(q.dtype)


def _splash_local(qh, kp, vp, seg, *, block, interpret):
    """qh [b, n, Tp, h] (pre-scaled), kp, vp [b, k, Tp, h], seg [b, Tp] -> [b, n, Tp, h]: one
    splash kernel (built for the local head count) vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    n, tp = qh.shape[1], qh.shape[2]
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(n)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))
    return jax.vmap(one)(qh, kp, vp, seg)
