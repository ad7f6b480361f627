"""``topd_jax.losses``: pure, jit-able loss functions for OPD and TOPD.

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
from topd_jax.losses.transport import cosine_cost, margin_w1, ot_distance, sinkhorn_plan

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
)

__all__ = [
    "DIVERGENCE_KINDS",
    "chunked_opd_loss",
    "chunked_token_divergence",
    "common_vocab_size",
    "cosine_cost",
    "divergence_from_logp",
    "false_alarms",
    "margin_w1",
    "masked_quantile",
    "near_future_count",
    "near_future_window",
    "opd_loss",
    "ot_distance",
    "safe_log_softmax",
    "sampled_token_kl",
    "select_candidates",
    "select_candidates_quantile",
    "select_guidance_points",
    "sinkhorn_plan",
    "suppression_weights",
    "token_divergence",
    "topd_loss",
    "trajectory_guidance_loss",
    "truncate_to_common_vocab",
]
