"""Memory-bounded per-token divergence straight from hidden states and LM heads.

At a Qwen vocabulary (V = 151936) the float32 logits of one ``[2, 2048]`` batch are
2.5 GB per model, and a naive forward+backward keeps several such arrays live. Here the
sequence is cut into chunks; a ``lax.scan`` computes each chunk's logits, divergence and
nothing else, and ``jax.checkpoint`` on the chunk body makes the backward pass recompute
that chunk's logits instead of storing them. Only ``[batch, chunk, vocab]`` arrays are
ever live, in the forward and in the backward pass; the price is one extra pair of
LM-head matmuls. ``chunked_opd_loss`` avoids that price for the usual weighted token
mean by accumulating the gradient during the forward sweep (see BUILD_NOTES.md
"Losses" for measured figures).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from topd_jax.losses.divergence import (
    DEFAULT_MAX_VOCAB_PADDING,
    _check_kind,
    common_vocab_size,
    token_divergence,
)


def _check_shapes(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask):
    if student_hidden.ndim != 3 or teacher_hidden.ndim != 3:
        raise ValueError(
            f"hidden states must be [batch, seq, hidden]: student {student_hidden.shape}, "
            f"teacher {teacher_hidden.shape}"
        )
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or mask.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"batch/seq differ: student_hidden {student_hidden.shape}, teacher_hidden "
            f"{teacher_hidden.shape}, mask {mask.shape}"
        )
    for name, hidden, head in (
        ("student", student_hidden, student_lm_head),
        ("teacher", teacher_hidden, teacher_lm_head),
    ):
        if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
            raise ValueError(
                f"{name}_lm_head {head.shape} must be [hidden, vocab] with hidden = "
                f"{name}_hidden.shape[-1] = {hidden.shape[-1]}"
            )


def _to_chunks(x: jax.Array, num_chunks: int, chunk_size: int) -> jax.Array:
    """``[B, T, ...]`` (T already padded to num_chunks*chunk_size) -> ``[n, B, c, ...]``."""
    b = x.shape[0]
    x = x.reshape((b, num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _prepare(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask, *,
             chunk_size, kind, beta, max_vocab_padding):
    """Validate, cast to float32, truncate the vocab, pad T and split into chunks.

    Returns ``(h_s [n, B, c, d_s], w_s [d_s, V], h_t [n, B, c, d_t], w_t [d_t, V],
    mask [n, B, c] float32, num_chunks, chunk_size)``; the teacher is stop-gradient.
    """
    _check_kind(kind, beta)
    _check_shapes(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    vocab = common_vocab_size(
        student_lm_head.shape[1], teacher_lm_head.shape[1], max_vocab_padding=max_vocab_padding
    )
    seq = mask.shape[1]
    chunk_size = min(chunk_size, seq)
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq
    # Compute in float32 (a bf16 product of bf16 inputs is exact in f32 anyway).
    w_s = student_lm_head[:, :vocab].astype(jnp.float32)
    w_t = lax.stop_gradient(teacher_lm_head[:, :vocab].astype(jnp.float32))
    h_s = student_hidden.astype(jnp.float32)
    h_t = lax.stop_gradient(teacher_hidden.astype(jnp.float32))
    m = mask.astype(jnp.float32)
    if pad:  # padded positions are masked out
        h_s = jnp.pad(h_s, ((0, 0), (0, pad), (0, 0)))
        h_t = jnp.pad(h_t, ((0, 0), (0, pad), (0, 0)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    h_s, h_t, m = (_to_chunks(x, num_chunks, chunk_size) for x in (h_s, h_t, m))
    return h_s, w_s, h_t, w_t, m, num_chunks, chunk_size


def chunked_token_divergence(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_lm_head: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = 256,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
) -> jax.Array:
    """``token_divergence`` of ``hidden @ lm_head`` logits, never materialising ``[B, T, V]``.

    Args:
      student_hidden: ``[batch, seq, d_s]`` final (post-norm) student hidden states.
      student_lm_head: ``[d_s, vocab_s]`` (for tied embeddings: ``embedding.T``).
      teacher_hidden: ``[batch, seq, d_t]``; treated as constant (``stop_gradient``).
      teacher_lm_head: ``[d_t, vocab_t]``; constant.
      mask: ``[batch, seq]``; 0 for padding/prompt positions.
      chunk_size: sequence positions per chunk (static). ``seq`` need not be a multiple:
        the tail chunk is zero-padded and masked. Peak memory grows with
        ``batch * chunk_size * vocab``.
      kind, beta, temperature, max_vocab_padding: as in ``token_divergence``; vocabularies
        differing only by padding columns of the LM heads are truncated to the smaller.

    Returns:
      ``[batch, seq]`` float32, equal (values and gradients w.r.t. the student inputs) to
      ``token_divergence(student_hidden @ student_lm_head, teacher_hidden @
      teacher_lm_head, mask)`` up to float32 round-off.
    """
    h_s, w_s, h_t, w_t, m, num_chunks, chunk_size = _prepare(
        student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask,
        chunk_size=chunk_size, kind=kind, beta=beta, max_vocab_padding=max_vocab_padding,
    )
    batch, seq = mask.shape
    divergence = functools.partial(_chunk_divergence, kind=kind, beta=beta, temperature=temperature)
    # Rematerialise per chunk: the backward pass recomputes the chunk's logits rather
    # than saving [n, B, c, V] residuals. prevent_cse=False is safe (and faster) in scan.
    divergence = jax.checkpoint(divergence, prevent_cse=False)

    def step(carry, xs):
        h_s_c, h_t_c, m_c = xs
        return carry, divergence(h_s_c, w_s, h_t_c, w_t, m_c)

    _, per_chunk = lax.scan(step, None, (h_s, h_t, m))  # [n, B, c]
    return jnp.moveaxis(per_chunk, 0, 1).reshape(batch, num_chunks * chunk_size)[:, :seq]


def _chunk_divergence(h_s_c, w_s, h_t_c, w_t, m_c, *, kind, beta, temperature):
    """Per-token divergence of one chunk, ``[B, c, d]`` hidden -> ``[B, c]``."""
    # [B, c, d] @ [d, V] -> [B, c, V]; only this chunk's logits are ever live.
    logits_s = jnp.einsum("bcd,dv->bcv", h_s_c, w_s)
    logits_t = jnp.einsum("bcd,dv->bcv", h_t_c, w_t)
    return token_divergence(logits_s, logits_t, m_c, kind=kind, beta=beta, temperature=temperature)


def chunked_opd_loss(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_lm_head: jax.Array,
    mask: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunk_size: int = 256,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
) -> tuple[jax.Array, jax.Array]:
    """``opd_loss(chunked_token_divergence(...), mask, weights)`` with a fused backward.

    Same value and gradients as the composition, as a ``(sum, count)`` pair, but the
    gradient w.r.t. the student's hidden states and LM head is accumulated *during* the
    forward sweep (a ``custom_vjp``; the backward pass only scales it by the incoming
    cotangent). Each chunk's logits are computed once instead of twice, so a
    value-and-grad costs 4 LM-head matmuls like the unchunked path, not the 6 of the
    rematerialised ``chunked_token_divergence``. Use it when the per-token weights are
    known before the loss (they are constants here); use ``chunked_token_divergence``
    when you need ℓ_t itself, e.g. to choose candidates.

    Args:
      student_hidden ... mask, chunk_size, kind, beta, temperature, max_vocab_padding:
        as in ``chunked_token_divergence``.
      weights: optional ``[batch, seq]`` per-token weights w_t (constant).

    Returns:
      ``(sum [], count [])`` float32: Σ w m ℓ and Σ w m. Only ``sum`` carries gradients,
      to ``student_hidden`` and ``student_lm_head`` (the teacher and weights get zero).
    """
    if weights is not None and weights.shape != mask.shape:
        raise ValueError(f"weights {weights.shape} and mask {mask.shape} differ")
    weighted_mask = mask.astype(jnp.float32)
    if weights is not None:
        weighted_mask = weighted_mask * lax.stop_gradient(weights.astype(jnp.float32))
    h_s, w_s, h_t, w_t, wm, _, _ = _prepare(
        student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, weighted_mask,
        chunk_size=chunk_size, kind=kind, beta=beta, max_vocab_padding=max_vocab_padding,
    )
    divergence = functools.partial(_chunk_divergence, kind=kind, beta=beta, temperature=temperature)

    def chunk_sum(h_s_c, w_s, h_t_c, wm_c):
        # Positions with weight 0 (masked or suppressed) are skipped entirely.
        return jnp.sum(wm_c * divergence(h_s_c, w_s, h_t_c, w_t, wm_c != 0))

    def sweep(h_s, w_s, with_grad):
        def step(carry, xs):
            total, d_w = carry
            h_s_c, h_t_c, wm_c = xs
            if not with_grad:
                return (total + chunk_sum(h_s_c, w_s, h_t_c, wm_c), d_w), None
            value, (d_h_c, d_w_c) = jax.value_and_grad(chunk_sum, argnums=(0, 1))(h_s_c, w_s, h_t_c, wm_c)
            return (total + value, d_w + d_w_c), d_h_c

        init = (jnp.float32(0.0), jnp.zeros_like(w_s) if with_grad else None)
        return lax.scan(step, init, (h_s, h_t, wm))

    @jax.custom_vjp
    def weighted_sum(h_s, w_s):
        (total, _), _ = sweep(h_s, w_s, with_grad=False)
        return total

    def weighted_sum_fwd(h_s, w_s):
        (total, d_w), d_h = sweep(h_s, w_s, with_grad=True)
        return total, (d_h, d_w)

    def weighted_sum_bwd(residuals, g):
        d_h, d_w = residuals
        return g * d_h, g * d_w

    weighted_sum.defvjp(weighted_sum_fwd, weighted_sum_bwd)
    return weighted_sum(h_s, w_s), jnp.sum(weighted_mask)
