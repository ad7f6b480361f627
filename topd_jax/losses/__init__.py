"""``topd_jax.losses``: pure, jit-able loss functions for OPD, TOPD, GRPO and TAPO.

Arrays in, arrays (or ``(loss, metrics)``) out; no Flax modules, no config objects, no
I/O, and no import of anything else in ``topd_jax``. Every function computes in float32
(bfloat16 inputs welcome), honours masks, works under ``jax.vmap`` and produces no NaN
from ``-inf`` logits or fully masked rows. Shapes are documented per function.
"""

# ---------------------------------------------------------------------------
# Per-token divergences (full vocabulary, and the sampled-token estimator)
# ---------------------------------------------------------------------------
from topd_jax.losses.divergence import (
    DIVERGENCE_KINDS,
    common_vocab_size,
    divergence_from_logp,
    safe_log_softmax,
    sampled_token_kl,
    token_divergence,
    truncate_to_common_vocab,
)

# ---------------------------------------------------------------------------
# Memory-bounded path: hidden states + LM heads, chunked over the sequence
# ---------------------------------------------------------------------------
from topd_jax.losses.chunked import chunked_opd_loss, chunked_token_divergence

# ---------------------------------------------------------------------------
# Near-future windows (t+1 … t+K, O(T) for all t)
# ---------------------------------------------------------------------------
from topd_jax.losses.windows import near_future_count, near_future_window

# ---------------------------------------------------------------------------
# High-loss candidates
# ---------------------------------------------------------------------------
from topd_jax.losses.candidates import (
    masked_quantile,
    select_candidates,
    select_candidates_quantile,
)

# ---------------------------------------------------------------------------
# Optimal transport between two short futures
# ---------------------------------------------------------------------------
from topd_jax.losses.transport import (
    OT_SOLVERS,
    cosine_cost,
    exact_plan,
    margin_w1,
    ot_distance,
    sinkhorn_plan,
)

# ---------------------------------------------------------------------------
# TOPD assembly: suppression, guidance, L_OPD_w + λ·L_traj
# ---------------------------------------------------------------------------
from topd_jax.losses.topd import (
    false_alarms,
    opd_loss,
    select_guidance_points,
    suppression_weights,
    topd_loss,
    trajectory_guidance_loss,
    trajectory_weights,
)

# ---------------------------------------------------------------------------
# Measuring the detector: the teacher-null false-alarm rule, AUROC, label metrics
# ---------------------------------------------------------------------------
from topd_jax.losses.detection import (
    FALSE_ALARM_RULES,
    auroc,
    detector_label_metrics,
    teacher_null_false_alarms,
)

# ---------------------------------------------------------------------------
# GRPO / TAPO: group advantages, clipped surrogate, aggregation, KL, OTS weights
# ---------------------------------------------------------------------------
from topd_jax.losses.grpo import (
    ADVANTAGE_SCALES,
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
    ots_weights,
    policy_ratio_terms,
    token_entropy,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "FALSE_ALARM_RULES",
    "OT_SOLVERS",
    "AGGREGATION_MODES",
    "DIVERGENCE_KINDS",
    "KL_ESTIMATORS",
    "aggregate",
    "auroc",
    "chunked_opd_loss",
    "chunked_token_divergence",
    "clipped_surrogate",
    "common_vocab_size",
    "cosine_cost",
    "detector_label_metrics",
    "divergence_from_logp",
    "exact_plan",
    "false_alarms",
    "group_advantages",
    "kl_to_reference",
    "margin_w1",
    "masked_quantile",
    "near_future_count",
    "near_future_window",
    "opd_loss",
    "ot_distance",
    "ots_weights",
    "policy_ratio_terms",
    "safe_log_softmax",
    "sampled_token_kl",
    "select_candidates",
    "select_candidates_quantile",
    "select_guidance_points",
    "sinkhorn_plan",
    "suppression_weights",
    "teacher_null_false_alarms",
    "token_divergence",
    "token_entropy",
    "topd_loss",
    "trajectory_guidance_loss",
    "trajectory_weights",
    "truncate_to_common_vocab",
]
