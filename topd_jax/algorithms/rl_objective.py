"""The differentiable part of GRPO and TAPO: a PPO-clipped token surrogate over a batch.

``grpo.py`` / ``tapo.py`` sample, grade and score without gradient, and hand the step rows
``[R, L]`` (token-indexed, see ``scoring``):

  ids, seq_mask, loss_mask   the trajectory (prompt + completion) and the trained tokens
  old_logp                   log π_old(y_t) from one teacher-forced pass before the update
  advantages                 ``[R]`` per-row advantage (broadcast over the row's tokens)
  weights                    ``[R, L]`` w_t: OTS on constructed rows, 1 elsewhere
  term                       ``[R]`` int32: 0 = G_orig, 1 = G_ref (TAPO), -1 = padding row
  ref_logp                   log π_ref(y_t) (only with ``grpo.kl_coef > 0``)

The loss is ``L = L_GRPO(G_orig) + λ · L_ref(G_ref)`` (TAPO.md step 8), each term
``losses.aggregate`` (``token_mean`` or ``sequence_mean``) of ``losses.clipped_surrogate``
(+ ``kl_coef · losses.kl_to_reference``) over its own rows: ``sum_k / count_k``.
``add_rl_normalizers`` puts the counts of the batch it is given into it (``rl_norm [R, 2]``,
per-row copies), so the loss is a single term ``Σ_k λ_k sum_k / count_k`` that splits into
micro-batches exactly (one backward pass), and a mini-batch (``grpo.updates_per_batch``)
is normalised by its own counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.algorithms.objective import metric_pair
from topd_jax.algorithms.scoring import hidden_states, token_logprobs
from topd_jax.losses import aggregate, clipped_surrogate, kl_to_reference
from topd_jax.config.schema import RunConfig


@dataclass(frozen=True)
class RlSpec:
    """Static settings of the RL loss (hashable: part of the compiled step's identity)."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token_mean"     # token_mean | sequence_mean
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    ref_weight: float = 1.0             # λ (TAPO's G_ref term)
    chunk: int | None = None            # positions per logit chunk (None: whole logits)
    micro_batches: int = 1

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "RlSpec":
        g = cfg.grpo
        return cls(clip_low=g.clip_low, clip_high=g.clip_high, aggregation=g.aggregation,
                   kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
                   ref_weight=cfg.tapo.ref_weight if cfg.algorithm == "tapo" else 0.0,
                   chunk=cfg.loss.vocab_chunk, micro_batches=cfg.optim.micro_batches)


def term_masks(loss_mask: jax.Array, term: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(G_orig, G_ref)`` token masks ``[R, L]`` bool: the trained tokens of rows with term 0
    and 1 (term ``[R]``; -1 = padding row, in neither)."""
    mask = loss_mask.astype(bool)
    return mask & (term == 0)[:, None], mask & (term == 1)[:, None]


def term_weights(spec: RlSpec) -> tuple[float, float]:
    """λ_k of ``(G_orig, G_ref)``: 1 and ``tapo.ref_weight`` (0 for GRPO)."""
    return 1.0, spec.ref_weight


def add_rl_normalizers(spec: RlSpec, batch: dict) -> dict:
    """Add ``rl_norm [R, 2]``: ``losses.aggregate``'s count of each term over ``batch``'s rows
    (it depends on the masks only), copied per row so that it splits into micro-batches."""
    masks = term_masks(batch["loss_mask"], batch["term"])
    zeros = jnp.zeros(masks[0].shape, jnp.float32)
    counts = jnp.stack([aggregate(zeros, m, spec.aggregation)[1] for m in masks])  # [2]
    return dict(batch, rl_norm=jnp.broadcast_to(counts, (masks[0].shape[0], 2)))


def make_rl_loss_fn(spec: RlSpec, graphdef: nnx.GraphDef):
    """``loss_fn(params, mb, _unused_head) -> ({"rl": (Σ_k λ_k sum_k / count_k, 1/micro)}, metrics)``."""

    def loss_fn(params, mb, _head):
        model = nnx.merge(graphdef, params)
        ids, mask = mb["ids"], mb["loss_mask"].astype(bool)
        hidden = hidden_states(model, ids, mb["seq_mask"])
        logp = token_logprobs(hidden, model.lm_head_weight(), ids, mask, chunk=spec.chunk)
        per_token, clipped = clipped_surrogate(logp, mb["old_logp"], mb["advantages"], mask,
                                               clip_low=spec.clip_low, clip_high=spec.clip_high,
                                               weights=mb["weights"])
        orig, ref = term_masks(mask, mb["term"])
        metrics = {"clip_fraction": metric_pair(clipped.astype(jnp.float32), mask),
                   "ratio": metric_pair(jnp.exp(logp - mb["old_logp"]), mask),
                   "pg_orig_loss": metric_pair(per_token, orig)}
        if spec.ref_weight > 0:
            metrics["pg_ref_loss"] = metric_pair(per_token, ref)
        if spec.kl_coef > 0:
            kl = kl_to_reference(logp, mb["ref_logp"], mask, estimator=spec.kl_estimator)
            per_token = per_token + spec.kl_coef * kl
            metrics["ref_kl"] = metric_pair(kl, mask)
        value = jnp.float32(0.0)
        for k, (m, weight) in enumerate(zip((orig, ref), term_weights(spec))):
            if weight == 0:
                continue
            total, _ = aggregate(per_token, m, spec.aggregation)  # this micro-batch's sum
            count = mb["rl_norm"][0, k]  # the (mini-)batch's count
            value = value + weight * jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
        # Already divided by the (mini-)batch's counts; these counts sum to 1 over the
        # micro-batches, so accumulate_gradients' division is by 1.
        return {"rl": (value, jnp.float32(1.0 / spec.micro_batches))}, metrics

    return loss_fn
