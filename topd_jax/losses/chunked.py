"""Memory-bounded per-token divergence straight from hidden states and LM heads.

At a Qwen vocabulary (V = 151936) the float32 logits of one ``[2, 2048]`` batch are
2.5 GB per model, and a naive forward+backward keeps several such arrays live. Here the
sequence is cut into chunks; a ``lax.scan`` computes each chunk's logits, divergence and
nothing else, and ``jax.checkpoint`` on the chunk body makes the backward pass recompute
that chunk's logits instead of storing them. Only ``[batch, chunk, vocab]`` arrays are
ever live, in the forward and in the backward pass; the price is one extra pair of
LM-head matmuls (see BUILD_NOTES.md "Losses" for measured figures).
"""

from __future__ import annotations

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
    _check_kind(kind, beta)
    _check_shapes(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    vocab = common_vocab_size(
        student_lm_head.shape[1], teacher_lm_head.shape[1], max_vocab_padding=max_vocab_padding
    )
    batch, seq = mask.shape
    chunk_size = min(chunk_size, seq)
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq

    # Compute in float32 (a bf16 product of bf16 inputs is exact in f32 anyway).
    w_s = student_lm_head[:, :vocab].astype(jnp.float32)
    w_t = lax.stop_gradient(teacher_lm_head[:, :vocab].astype(jnp.float32))
    h_s = student_hidden.astype(jnp.float32)
    h_t = lax.stop_gradient(teacher_hidden.astype(jnp.float32))
    m = mask.astype(bool)
    if pad:
        h_s = jnp.pad(h_s, ((0, 0), (0, pad), (0, 0)))
        h_t = jnp.pad(h_t, ((0, 0), (0, pad), (0, 0)))
        m = jnp.pad(m, ((0, 0), (0, pad)))

    def chunk_divergence(w_s, h_s_c, h_t_c, m_c):
        # [B, c, d] @ [d, V] -> [B, c, V]; only this chunk's logits are ever live.
        logits_s = jnp.einsum("bcd,dv->bcv", h_s_c, w_s)
        logits_t = jnp.einsum("bcd,dv->bcv", h_t_c, w_t)
        return token_divergence(
            logits_s, logits_t, m_c, kind=kind, beta=beta, temperature=temperature
        )

    # Rematerialise per chunk: the backward pass recomputes the chunk's logits rather
    # than saving [n, B, c, V] residuals. prevent_cse=False is safe (and faster) in scan.
    chunk_divergence = jax.checkpoint(chunk_divergence, prevent_cse=False)

    def step(carry, xs):
        return carry, chunk_divergence(w_s, *xs)

    xs = tuple(_to_chunks(x, num_chunks, chunk_size) for x in (h_s, h_t, m))
    _, per_chunk = lax.scan(step, None, xs)  # [n, B, c]
    return jnp.moveaxis(per_chunk, 0, 1).reshape(batch, num_chunks * chunk_size)[:, :seq]
