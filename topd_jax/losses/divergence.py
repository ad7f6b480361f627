"""Per-token divergences between a student and a teacher distribution.

Arrays in, arrays out. Every function computes in float32 whatever the input dtype
(bfloat16 logits are upcast first: log-softmax over a 150k vocabulary in bf16 loses
the tail) — float64 inputs (under ``jax.enable_x64``) stay float64, which is what exact
finite-difference checks use — honours a ``mask`` (padding and prompt positions contribute exactly 0, and
their logits are never read), and produces no NaN from ``-inf`` logits or fully
masked rows.

KL directions are named, never implied by a bare β:
  * ``reverse_kl``: KL(p_s ‖ p_t) = Σ_v p_s (log p_s − log p_t)  — mode seeking; OPD default.
  * ``forward_kl``: KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s)  — mean seeking.
  * ``jsd``: generalised Jensen–Shannon with mixture m = β·p_t + (1 − β)·p_s,
    JSD(β) = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m). The endpoints are defined as the
    KLs, following TRL's ``generalized_jsd_loss`` (EasyDeL flips this convention):
    **β = 0 → forward KL(p_t ‖ p_s), β = 1 → reverse KL(p_s ‖ p_t)**. Note the formula
    itself tends to 0 at both ends; the endpoints are special-cased, as in TRL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DIVERGENCE_KINDS = ("reverse_kl", "forward_kl", "jsd")

# Qwen checkpoints pad the LM head to a multiple of 128/256 rows (151936 vs 152064 for
# the same 151665-token tokenizer); bigger gaps mean genuinely different vocabularies.
DEFAULT_MAX_VOCAB_PADDING = 1024


# ---------------------------------------------------------------------------
# Numerics helpers
# ---------------------------------------------------------------------------


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float32, or float64 when an input is float64 (bfloat16/float16 are upcast)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def safe_log_softmax(logits: jax.Array) -> jax.Array:
    """float32 (``compute_dtype``) log-softmax over the last axis that tolerates ``-inf``
    entries and rows.

    ``[..., V] -> [..., V]``. Entries at ``-inf`` give ``-inf``; a row that is entirely
    ``-inf`` gives ``-inf`` everywhere (probability 0 everywhere) instead of NaN.
    """
    x = logits.astype(compute_dtype(logits))
    row_max = jnp.max(x, axis=-1, keepdims=True)
    # An all -inf row has max -inf; shifting by it would give -inf - -inf = NaN.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    shifted = x - lax.stop_gradient(row_max)
    sum_exp = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    # log(0) only for all -inf rows; its gradient would be inf * 0 = NaN, so guard it.
    log_z = jnp.log(jnp.where(sum_exp > 0, sum_exp, 1.0))
    return shifted - log_z


def _kl_from_logp(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p ‖ q) over the last axis from log-probabilities; ``[..., V] -> [...]``.

    Terms with p = 0 are exactly 0 (0·log 0 := 0). Both log-probs are replaced before
    the product ("double where"), otherwise the untaken branch 0·(−inf) poisons the
    gradient with NaN. If q = 0 where p > 0 the KL is +inf, as it should be.
    """
    p = jnp.exp(logp)
    support = p > 0
    logp_safe = jnp.where(support, logp, 0.0)
    logq_safe = jnp.where(support, logq, 0.0)
    return jnp.sum(p * (logp_safe - logq_safe), axis=-1)


def _log_mixture(logp_t: jax.Array, logp_s: jax.Array, beta: float) -> jax.Array:
    """log(β·p_t + (1 − β)·p_s) elementwise, safe when both are ``-inf``."""
    a = logp_t + jnp.log(beta)
    b = logp_s + jnp.log1p(-beta)
    hi = jnp.maximum(a, b)
    hi = jnp.where(jnp.isfinite(hi), hi, 0.0)
    total = jnp.exp(a - hi) + jnp.exp(b - hi)
    positive = total > 0
    return jnp.where(positive, hi + jnp.log(jnp.where(positive, total, 1.0)), -jnp.inf)


def _check_kind(kind: str, beta: float) -> None:
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {DIVERGENCE_KINDS}")
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a Python float in [0, 1] for kind='jsd', got {beta!r}")


def divergence_from_logp(
    student_logp: jax.Array, teacher_logp: jax.Array, *, kind: str = "reverse_kl", beta: float = 0.5
) -> jax.Array:
    """Per-row divergence from full-vocabulary log-probabilities, ``[..., V] -> [...]``."""
    _check_kind(kind, beta)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_from_logp(student_logp, teacher_logp)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_from_logp(teacher_logp, student_logp)
    log_m = _log_mixture(teacher_logp, student_logp, beta)
    return beta * _kl_from_logp(teacher_logp, log_m) + (1.0 - beta) * _kl_from_logp(student_logp, log_m)


# ---------------------------------------------------------------------------
# Vocabulary alignment
# ---------------------------------------------------------------------------


def common_vocab_size(
    student_vocab: int, teacher_vocab: int, *, max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING
) -> int:
    """The vocabulary size both sides are truncated to.

    Sizes that differ by at most ``max_vocab_padding`` are taken to differ only by
    LM-head padding rows (Qwen: 151936 vs 152064) and are truncated to the smaller one;
    a bigger gap means different tokenizers, which is an error.
    """
    if abs(student_vocab - teacher_vocab) > max_vocab_padding:
        raise ValueError(
            f"student vocab {student_vocab} and teacher vocab {teacher_vocab} differ by "
            f"{abs(student_vocab - teacher_vocab)} > max_vocab_padding={max_vocab_padding}: "
            "they do not look like the same tokenizer with padded LM heads"
        )
    return min(student_vocab, teacher_vocab)


def truncate_to_common_vocab(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
) -> tuple[jax.Array, jax.Array]:
    """Slice both ``[..., V_s]`` / ``[..., V_t]`` logits to ``[..., min(V_s, V_t)]``.

    Raises ``ValueError`` naming both shapes if the leading shapes differ or the vocab
    sizes differ by more than ``max_vocab_padding``.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits "
            f"{teacher_logits.shape} differ before the vocab axis"
        )
    v = common_vocab_size(
        student_logits.shape[-1], teacher_logits.shape[-1], max_vocab_padding=max_vocab_padding
    )
    return student_logits[..., :v], teacher_logits[..., :v]


# ---------------------------------------------------------------------------
# Public per-token divergences
# ---------------------------------------------------------------------------


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
) -> jax.Array:
    """Full-vocabulary per-token divergence between student and teacher.

    Args:
      student_logits: ``[batch, seq, vocab_s]`` (any float dtype; differentiated).
      teacher_logits: ``[batch, seq, vocab_t]``; wrap in ``stop_gradient`` yourself if the
        teacher is not constant already (it is usually an input, so it is).
      mask: ``[batch, seq]`` bool/float; 0 for padding and prompt positions.
      kind: ``"reverse_kl"`` KL(p_s‖p_t) (OPD default), ``"forward_kl"`` KL(p_t‖p_s), or
        ``"jsd"`` (generalised JSD; β = 0 → forward KL, β = 1 → reverse KL).
      beta: JSD mixture weight of the *teacher*, a Python float in [0, 1].
      temperature: both logits are divided by it before the softmax (KD temperature).
      max_vocab_padding: see ``common_vocab_size``.

    Returns:
      ``[batch, seq]`` float32 divergence, exactly 0 at masked positions. Any leading
      shape works (``[..., vocab]`` with ``mask`` of shape ``[...]``).
    """
    _check_kind(kind, beta)
    student_logits, teacher_logits = truncate_to_common_vocab(
        student_logits, teacher_logits, max_vocab_padding=max_vocab_padding
    )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {mask.shape} does not match logits {student_logits.shape}[:-1]")
    valid = mask.astype(bool)
    # Masked rows are replaced by zeros (a uniform distribution) so their values -- even
    # NaN or all -inf -- can neither leak into the output nor into the gradient.
    dtype = compute_dtype(student_logits, teacher_logits)
    s = jnp.where(valid[..., None], student_logits.astype(dtype), 0.0) / temperature
    t = jnp.where(valid[..., None], teacher_logits.astype(dtype), 0.0) / temperature
    div = divergence_from_logp(safe_log_softmax(s), safe_log_softmax(t), kind=kind, beta=beta)
    return jnp.where(valid, div, 0.0)


def sampled_token_kl(student_logp: jax.Array, teacher_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Single-sample KL estimator ``log p_s(y_t) − log p_t(y_t)`` per token.

    Args:
      student_logp, teacher_logp: ``[batch, seq]`` log-probabilities of the sampled tokens.
      mask: ``[batch, seq]``.

    Returns:
      ``[batch, seq]`` float32, 0 at masked positions. Its expectation under the student
      is the reverse KL; used as a per-token reward by policy-gradient OPD (Tinker-style).
    """
    if student_logp.shape != teacher_logp.shape or mask.shape != student_logp.shape:
        raise ValueError(
            f"shapes differ: student_logp {student_logp.shape}, teacher_logp "
            f"{teacher_logp.shape}, mask {mask.shape}"
        )
    valid = mask.astype(bool)
    dtype = compute_dtype(student_logp, teacher_logp)
    diff = student_logp.astype(dtype) - teacher_logp.astype(dtype)
    return jnp.where(valid, diff, 0.0)
