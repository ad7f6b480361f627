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
aggregated as ``token_mean`` or ``sequence_mean`` over its own rows. ``add_rl_normalizers``
turns that into one per-token coefficient ``tok_coef [R, L]`` from the masks of the batch
it is given, so the loss is a single term ``Σ_t tok_coef_t · ℓ_t`` that splits into
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
from topd_jax.losses import clipped_surrogate, kl_to_reference
from topd_jax.train.config import RunConfig


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


def token_coefficients(loss_mask: jax.Array, term: jax.Array, *, aggregation: str,
                       term_weights: tuple[float, ...]) -> jax.Array:
    """``[R, L]`` float32 coefficients such that ``Σ coef · ℓ = Σ_k weight_k · agg_k(ℓ)``.

    loss_mask ``[R, L]``; term ``[R]`` (k >= 0: the row's term, -1: ignored).
    ``token_mean``: agg_k = Σ_{rows of k, tokens} ℓ / (number of those tokens);
    ``sequence_mean``: agg_k = mean over k's non-empty rows of each row's token mean.
    An empty term contributes 0 (no division by zero).
    """
    mask = loss_mask.astype(jnp.float32)
    row_tokens = jnp.sum(mask, axis=1)  # [R]
    coef = jnp.zeros_like(mask)
    for k, weight in enumerate(term_weights):
        in_k = (term == k).astype(jnp.float32)  # [R]
        if aggregation == "token_mean":
            n = jnp.sum(in_k * row_tokens)
            per_row = in_k / jnp.where(n > 0, n, 1.0)
        elif aggregation == "sequence_mean":
            rows = jnp.sum(in_k * (row_tokens > 0))
            per_row = in_k / (jnp.where(row_tokens > 0, row_tokens, 1.0) * jnp.where(rows > 0, rows, 1.0))
        else:
            raise ValueError(f"aggregation must be token_mean or sequence_mean, got {aggregation!r}")
        coef = coef + weight * per_row[:, None] * mask
    return coef


def add_rl_normalizers(spec: RlSpec, batch: dict) -> dict:
    """Add ``tok_coef [R, L]`` for the rows of ``batch`` (params-independent)."""
    coef = token_coefficients(batch["loss_mask"], batch["term"], aggregation=spec.aggregation,
                              term_weights=(1.0, spec.ref_weight))
    return dict(batch, tok_coef=coef)


def make_rl_loss_fn(spec: RlSpec, graphdef: nnx.GraphDef):
    """``loss_fn(params, mb, _unused_head) -> ({"rl": (Σ coef·ℓ, 1/micro)}, metrics)``."""

    def loss_fn(params, mb, _head):
        model = nnx.merge(graphdef, params)
        ids, mask = mb["ids"], mb["loss_mask"].astype(bool)
        hidden = hidden_states(model, ids, mb["seq_mask"])
        logp = token_logprobs(hidden, model.lm_head_weight(), ids, mask, chunk=spec.chunk)
        per_token, clipped = clipped_surrogate(logp, mb["old_logp"], mb["advantages"], mask,
                                               clip_low=spec.clip_low, clip_high=spec.clip_high,
                                               weights=mb["weights"])
        orig = mask & (mb["term"] == 0)[:, None]
        ref = mask & (mb["term"] == 1)[:, None]
        metrics = {"clip_fraction": metric_pair(clipped.astype(jnp.float32), mask),
                   "ratio": metric_pair(jnp.exp(logp - mb["old_logp"]), mask),
                   "pg_orig_loss": metric_pair(per_token, orig)}
        if spec.ref_weight > 0:
            metrics["pg_ref_loss"] = metric_pair(per_token, ref)
        if spec.kl_coef > 0:
            kl = kl_to_reference(logp, mb["ref_logp"], mask, estimator=spec.kl_estimator)
            per_token = per_token + spec.kl_coef * kl
            metrics["ref_kl"] = metric_pair(kl, mask)
        value = jnp.sum(per_token * mb["tok_coef"])
        # tok_coef already divides by the (mini-)batch's counts; these counts sum to 1 over
        # the micro-batches, so accumulate_gradients' division is by 1.
        return {"rl": (value, jnp.float32(1.0 / spec.micro_batches))}, metrics

    return loss_fn
