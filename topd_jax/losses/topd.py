"""TOPD assembly (TOPD §3.4 and §4): suppression, guidance, L_TOPD = L_OPD_w + λ·L_traj.

Everything reduces to ``(sum, count)`` pairs so that micro-batches, devices and hosts
can be accumulated without bias: the global mean is Σ sums / Σ counts, never the mean of
per-micro-batch means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from topd_jax.losses.candidates import masked_quantile, select_candidates
from topd_jax.losses.divergence import (
    DEFAULT_MAX_VOCAB_PADDING,
    compute_dtype,
    safe_log_softmax,
    token_divergence,
)

SUPPRESSION_REGIMES = ("low_divergence", "high_divergence")
TRAJECTORY_KINDS = ("forward_kl", "reverse_kl", "jsd", "nll")

SumCount = tuple[jax.Array, jax.Array]


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, 0 (with a zero, not NaN, gradient) where count == 0."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


# ---------------------------------------------------------------------------
# Classification of candidates (§3.4)
# ---------------------------------------------------------------------------


def false_alarms(
    candidates: jax.Array,
    divergence: jax.Array,
    *,
    quantile: float = 0.3,
    regime: str = "low_divergence",
) -> jax.Array:
    """Candidates in the suppressed regime, with the threshold taken over the whole batch.

    Args:
      candidates: ``[batch, seq]`` bool high-loss candidates.
      divergence: ``[batch, seq]`` near-future divergence D_t (read only at candidates).
      quantile: q; ``"low_divergence"`` (TOPD: surface-form false alarms) marks candidates
        with D_t ≤ the q-quantile of D over all candidates of the batch (default 0.3);
        ``"high_divergence"`` (the paper's ablation) marks the matched high set,
        D_t ≥ the (1 − q)-quantile.

    Returns:
      ``[batch, seq]`` bool, a subset of ``candidates``. Compute it once per global batch
      (before micro-batching) so the quantile is the batch's, as in the paper.
    """
    if regime not in SUPPRESSION_REGIMES:
        raise ValueError(f"regime={regime!r} is not one of {SUPPRESSION_REGIMES}")
    if candidates.shape != divergence.shape:
        raise ValueError(f"candidates {candidates.shape} and divergence {divergence.shape} differ")
    cand = candidates.astype(bool)
    d = lax.stop_gradient(divergence.astype(jnp.float32))
    if regime == "low_divergence":
        return cand & (d <= masked_quantile(d, cand, quantile, axis=None))
    return cand & (d >= masked_quantile(d, cand, 1.0 - quantile, axis=None))


def suppression_weights(
    candidates: jax.Array,
    divergence: jax.Array,
    *,
    quantile: float = 0.3,
    weight: float = 0.0,
    regime: str = "low_divergence",
    false_alarm: jax.Array | None = None,
) -> jax.Array:
    """Per-token weights w_t: ``weight`` (s, default 0 = drop) at false alarms, 1 elsewhere.

    ``[batch, seq]`` bool candidates and float divergence -> ``[batch, seq]`` float32.
    See ``false_alarms`` for ``quantile`` and ``regime``. ``false_alarm``: ``[batch, seq]``
    bool from ``false_alarms`` over the *global* batch (micro-batching); only candidates
    among them are suppressed, and ``quantile``/``regime`` are then unused. ``None``
    classifies here.
    """
    cand = candidates.astype(bool)
    if false_alarm is None:
        alarm = false_alarms(cand, divergence, quantile=quantile, regime=regime)
    else:
        if false_alarm.shape != cand.shape:
            raise ValueError(f"false_alarm {false_alarm.shape} and candidates {cand.shape} differ")
        alarm = false_alarm.astype(bool) & cand
    return jnp.where(alarm, jnp.float32(weight), jnp.float32(1.0))


def select_guidance_points(
    candidates: jax.Array,
    divergence: jax.Array,
    *,
    quantile: float = 0.3,
    max_per_row: int | None = 1,
) -> jax.Array:
    """Divergent states to guide: non-false-alarm candidates, most divergent first.

    Args:
      candidates, divergence: ``[batch, seq]`` as in ``false_alarms``.
      quantile: the false-alarm quantile (low-divergence regime).
      max_per_row: at most this many guided points per rollout (TOPD default 1); ``None``
        keeps every divergent candidate.

    Returns:
      ``[batch, seq]`` bool.
    """
    divergent = candidates.astype(bool) & ~false_alarms(candidates, divergence, quantile=quantile)
    if max_per_row is None:
        return divergent
    return select_candidates(divergence, divergent, num=max_per_row, min_separation=1)


# ---------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------


def opd_loss(token_loss: jax.Array, mask: jax.Array, weights: jax.Array | None = None) -> SumCount:
    """Weighted token-mean OPD loss as a ``(sum, count)`` pair.

    L_OPD_w = Σ_t w_t m_t ℓ_t / Σ_t w_t m_t. Return the pair rather than the ratio: with
    micro-batches, the loss to differentiate is Σ_i sum_i / (Σ_i count_i), i.e. every
    micro-batch divides by the *global* weighted token count.

    Args:
      token_loss: ``[batch, seq]`` differentiable per-token loss ℓ.
      mask: ``[batch, seq]`` valid (non-pad, non-prompt) positions.
      weights: optional ``[batch, seq]`` w_t (e.g. ``suppression_weights``); treated as
        constants.

    Returns:
      ``(sum [], count [])`` float32.
    """
    if token_loss.shape != mask.shape:
        raise ValueError(f"token_loss {token_loss.shape} and mask {mask.shape} differ")
    w = mask.astype(jnp.float32)
    if weights is not None:
        if weights.shape != mask.shape:
            raise ValueError(f"weights {weights.shape} and mask {mask.shape} differ")
        w = w * lax.stop_gradient(weights.astype(jnp.float32))
    loss = jnp.where(w != 0, token_loss.astype(compute_dtype(token_loss)), 0.0)  # float64 stays float64
    return jnp.sum(w * loss), jnp.sum(w)


def trajectory_weights(window_mask: jax.Array, *, decay: float | None = None) -> jax.Array:
    """The per-token weights of L_traj: 1 on window tokens, or γ^i for the i-th window token
    of the row (i = 0, 1, … counted along the last axis) with ``decay``; 0 elsewhere.

    ``[rows, seq]`` bool -> ``[rows, seq]`` float32. Their sum is the count of
    ``trajectory_guidance_loss`` (the ``guidance_normalizer`` of ``topd_loss``); it depends
    on the masks only, so it can be taken over the global batch before micro-batching.
    """
    valid = window_mask.astype(bool)
    w = valid.astype(jnp.float32)
    if decay is not None:
        index = jnp.cumsum(valid, axis=-1) - 1  # i for every window token of the row
        w = w * jnp.power(jnp.float32(decay), jnp.maximum(index, 0).astype(jnp.float32))
    return w


def trajectory_guidance_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    window_mask: jax.Array,
    *,
    kind: str = "forward_kl",
    decay: float | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    targets: jax.Array | None = None,
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
) -> SumCount:
    """L_traj over guidance windows, as a ``(sum, count)`` pair.

    Guidance rows are c_t + a (prefix, then the teacher's K-token continuation)
    teacher-forced through both models; ``window_mask`` marks the K continuation
    positions. Default: mean over guided points and i < K of KL(p_T ‖ p_θ) (forward KL,
    teaching the student the teacher's way out of the fork).

    Args:
      student_logits: ``[rows, seq, vocab]`` (differentiated).
      teacher_logits: ``[rows, seq, vocab]`` (constant); unused (may be None) for "nll".
      window_mask: ``[rows, seq]`` the guided continuation tokens.
      kind: ``"forward_kl"`` (default), ``"reverse_kl"``, ``"jsd"`` (β as in
        ``token_divergence``), or ``"nll"``: one-hot teacher tokens, −log p_θ(a_i), which
        needs ``targets``.
      decay: None (uniform over i) or γ: the i-th window token (i = 0, 1, … counted along
        the row) is weighted γ^i; the count is then Σ γ^i.
      targets: ``[rows, seq]`` int token ids a_i, for ``"nll"`` only.

    Returns:
      ``(sum [], count [])`` float32; count = number of window tokens (Σ γ^i with decay).
    """
    if kind not in TRAJECTORY_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {TRAJECTORY_KINDS}")
    if window_mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"window_mask {window_mask.shape} does not match student_logits {student_logits.shape}[:-1]"
        )
    valid = window_mask.astype(bool)
    if kind == "nll":
        if targets is None or targets.shape != window_mask.shape:
            raise ValueError(
                f"kind='nll' needs targets of shape {window_mask.shape}, got "
                f"{None if targets is None else targets.shape}"
            )
        s = jnp.where(valid[..., None], student_logits.astype(compute_dtype(student_logits)), 0.0) / temperature
        logp = safe_log_softmax(s)
        picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        per_token = jnp.where(valid, -picked, 0.0)
    else:
        if teacher_logits is None:
            raise ValueError(f"kind={kind!r} needs teacher_logits")
        per_token = token_divergence(
            student_logits,
            lax.stop_gradient(teacher_logits),
            valid,
            kind=kind,
            beta=beta,
            temperature=temperature,
            max_vocab_padding=max_vocab_padding,
        )
    w = trajectory_weights(valid, decay=decay)
    return jnp.sum(w * per_token), jnp.sum(w)


def topd_loss(
    token_loss: jax.Array,
    mask: jax.Array,
    *,
    candidates: jax.Array,
    divergence: jax.Array,
    false_alarm: jax.Array | None = None,
    guidance_student_logits: jax.Array | None = None,
    guidance_teacher_logits: jax.Array | None = None,
    guidance_mask: jax.Array | None = None,
    guidance_targets: jax.Array | None = None,
    lam: float = 1.0,
    suppression_weight: float = 0.0,
    suppress: bool = True,
    quantile: float = 0.3,
    regime: str = "low_divergence",
    traj_kind: str = "forward_kl",
    traj_decay: float | None = None,
    traj_temperature: float = 1.0,
    traj_beta: float = 0.5,
    token_normalizer: jax.Array | None = None,
    guidance_normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, SumCount]]:
    """L_TOPD = L_OPD_w + λ·L_traj, with metrics as ``(sum, count)`` pairs.

    Args:
      token_loss: ``[batch, seq]`` differentiable ℓ_t (e.g. reverse KL on the rollouts).
      mask: ``[batch, seq]`` valid completion positions.
      candidates: ``[batch, seq]`` bool high-loss candidates.
      divergence: ``[batch, seq]`` D_t at candidates (constant).
      false_alarm: ``[batch, seq]`` bool from ``false_alarms`` over the *global* batch;
        ``None`` computes it here from ``candidates``/``divergence`` with ``quantile`` and
        ``regime`` (fine when the whole batch is one call).
      guidance_student_logits, guidance_teacher_logits: ``[rows, seq_g, vocab]`` guidance
        rows; ``guidance_mask`` ``[rows, seq_g]`` their continuation tokens (rows with no
        valid token are padding). ``None`` drops the L_traj term (OPD + suppression).
      guidance_targets: ``[rows, seq_g]`` ids, for ``traj_kind="nll"``.
      lam: λ (default 1.0). suppression_weight: s (default 0). suppress: False gives
        plain OPD weights (all 1) while still reporting the classification metrics.
      traj_kind, traj_decay, traj_temperature, traj_beta: ``kind``, ``decay``,
        ``temperature`` and ``beta`` of ``trajectory_guidance_loss``.
      token_normalizer, guidance_normalizer: the *global* OPD and L_traj counts when this
        call sees one micro-batch; then Σ over micro-batches of the returned loss equals
        the full-batch loss. ``None`` uses this call's own counts.

    Returns:
      ``(loss [], metrics)`` with metrics ``{name: (sum, count)}``: ``token_loss`` (mean ℓ,
      unweighted), ``opd_loss``, ``traj_loss``, ``candidates_per_rollout``,
      ``false_alarm_fraction`` (high-loss tokens in the low-divergence regime),
      ``divergence`` (mean D over candidates, e.g. mean local OT),
      ``guided_points_per_rollout``.
    """
    valid = mask.astype(bool)
    cand = candidates.astype(bool) & valid
    if false_alarm is None:
        false_alarm = false_alarms(cand, divergence, quantile=quantile, regime=regime)
    alarm = false_alarm.astype(bool) & cand
    weights = suppression_weights(cand, divergence, weight=suppression_weight, false_alarm=alarm) if suppress else None
    opd_sum, opd_count = opd_loss(token_loss, valid, weights)

    if guidance_student_logits is None:
        traj_sum, traj_count, guided = jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0)
    else:
        if guidance_mask is None:
            raise ValueError("guidance_mask is required with guidance_student_logits")
        traj_sum, traj_count = trajectory_guidance_loss(
            guidance_student_logits,
            guidance_teacher_logits,
            guidance_mask,
            kind=traj_kind,
            decay=traj_decay,
            beta=traj_beta,
            temperature=traj_temperature,
            targets=guidance_targets,
        )
        guided = jnp.sum(jnp.any(guidance_mask.astype(bool), axis=-1)).astype(jnp.float32)

    opd_norm = opd_count if token_normalizer is None else jnp.asarray(token_normalizer, jnp.float32)
    traj_norm = traj_count if guidance_normalizer is None else jnp.asarray(guidance_normalizer, jnp.float32)
    loss = _safe_mean(opd_sum, opd_norm) + lam * _safe_mean(traj_sum, traj_norm)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    num_rows = f32(valid.reshape(-1, valid.shape[-1]).shape[0])
    num_cand = f32(jnp.sum(cand))
    d = lax.stop_gradient(jnp.where(cand, divergence.astype(jnp.float32), 0.0))
    metrics = {
        "token_loss": (f32(jnp.sum(jnp.where(valid, lax.stop_gradient(token_loss), 0.0))), f32(jnp.sum(valid))),
        "opd_loss": (lax.stop_gradient(opd_sum), opd_count),
        "traj_loss": (lax.stop_gradient(traj_sum), traj_count),
        "candidates_per_rollout": (num_cand, num_rows),
        "false_alarm_fraction": (f32(jnp.sum(alarm)), num_cand),
        "divergence": (jnp.sum(d), num_cand),
        "guided_points_per_rollout": (guided, num_rows),
    }
    return loss, metrics
