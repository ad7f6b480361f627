"""The differentiable part of every algorithm: one loss function over a prepared batch.

The algorithms (opd.py, topd.py, warmup.py) do everything that needs no gradient —
sampling, teacher scoring, the TOPD detector — and hand the step a batch of arrays:

main rows ``[R, L]`` (token-indexed, see ``scoring``):
  ids, seq_mask          the rollout (prompt + completion) and its real tokens
  loss_mask              the tokens the loss is taken on (completion & valid)
  weights                w_t (suppression; 1 for plain OPD), float32
  teacher_hidden         ``[R, L, d_t]`` teacher final hidden states (full-vocab estimator)
  teacher_logp           ``[R, L]`` log p_T(y_t) (sampled-token estimator)
guidance rows ``[G, L + K]`` (TOPD only): c_t followed by the K-token continuation a
  g_ids, g_mask          the rows and their real tokens
  g_window               ``[G, K]`` valid continuation tokens of guided points
  g_targets              ``[G, K]`` the continuation tokens (NLL target)
  g_teacher_hidden       ``[G, K, d_t]`` teacher hidden states at the K predicting positions

``make_loss_fn`` returns ``loss_fn(params, micro_batch, teacher_head) -> (terms, metrics)``,
both ``{name: (sum, count)}`` as ``train.optim.accumulate_gradients`` expects: term ``opd``
(OPD, warm-up), or with guidance the single term ``topd`` = L_OPD_w + λ·L_traj normalised by
the global counts that ``add_normalizers`` puts in the batch (metrics ``opd_loss`` and
``traj_loss`` keep the two parts).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import jax
from flax import nnx
from jax import lax

from topd_jax.algorithms.scoring import hidden_states, token_divergences, token_logprobs
from topd_jax.losses import opd_loss, trajectory_guidance_loss
from topd_jax.train.config import RunConfig


@dataclass(frozen=True)
class LossSpec:
    """Static settings of the loss (hashable: part of the compiled step's identity)."""
    estimator: str = "full_vocab"        # full_vocab | sampled_token
    kind: str = "reverse_kl"             # per-token divergence on the main rows; "ce": SFT, no teacher
    beta: float = 0.5                    # jsd
    temperature: float = 1.0             # KD temperature
    chunk: int | None = None             # positions per chunk (None: whole logits)
    ce_weight: float = 0.0               # warm-up: alpha * CE + (1 - alpha) * divergence
    guidance: bool = False
    guidance_kind: str = "forward_kl"    # forward_kl | nll
    guidance_decay: float | None = None
    prefix_len: int = 0                  # L: column where the guidance continuation starts
    window: int = 0                      # K
    guidance_weight: float = 1.0         # lambda
    micro_batches: int = 1
    main_precomputed: bool = False       # the OPD term's value and gradient come with the batch

    @classmethod
    def from_config(cls, cfg: RunConfig, seq_len: int) -> "LossSpec":
        warm = cfg.algorithm == "warmup"
        kind = "ce" if cfg.algorithm == "sft" else "forward_kl" if warm else cfg.loss.divergence
        return cls(
            estimator=cfg.loss.estimator, kind=kind,
            beta=cfg.loss.jsd_beta, temperature=cfg.loss.kd_temperature, chunk=cfg.loss.vocab_chunk,
            ce_weight=cfg.warmup.ce_weight if warm else 0.0, guidance=cfg.uses_guidance,
            guidance_kind="nll" if cfg.topd.guidance_target == "teacher_tokens" else "forward_kl",
            guidance_decay=None if cfg.topd.guidance_decay == 1.0 else cfg.topd.guidance_decay,
            prefix_len=seq_len, window=cfg.topd.window, guidance_weight=cfg.topd.guidance_weight,
            micro_batches=cfg.optim.micro_batches, main_precomputed=cfg.fuses_main_pass)


def _window_weights(spec: LossSpec, window_mask: jax.Array) -> jax.Array:
    """The per-token weights ``trajectory_guidance_loss`` counts (1, or gamma^i along the row)."""
    valid = window_mask.astype(bool)
    w = valid.astype(jnp.float32)
    if spec.guidance_decay is not None:
        index = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.float32)
        w = w * jnp.power(jnp.float32(spec.guidance_decay), index)
    return w


def add_normalizers(spec: LossSpec, batch: dict) -> dict:
    """With guidance: the global OPD and L_traj counts, as per-row copies (so that they split
    into micro-batches like every other array). They depend on masks only, never on params,
    which lets ``L_OPD_w + λ·L_traj`` be one term with ONE backward pass instead of one per
    term (``optim.accumulate_gradients``' general path)."""
    if not spec.guidance:
        return batch
    opd = jnp.sum(batch["loss_mask"].astype(jnp.float32) * batch["weights"])
    traj = jnp.sum(_window_weights(spec, batch["g_window"]))
    return dict(batch, opd_norm=jnp.full((batch["ids"].shape[0],), opd),
                traj_norm=jnp.full((batch["g_ids"].shape[0],), traj))


def metric_pair(x, mask):
    """``(Σ x·mask, Σ mask)`` without gradient: a metric in the ``(sum, count)`` contract."""
    m = mask.astype(jnp.float32)
    return jnp.sum(lax.stop_gradient(x) * m), jnp.sum(m)


def make_loss_fn(spec: LossSpec, graphdef: nnx.GraphDef):
    """``loss_fn(params, mb, teacher_head)``; see the module docstring for ``mb``."""

    def loss_fn(params, mb, teacher_head):
        model = nnx.merge(graphdef, params)
        head = model.lm_head_weight()  # [d_s, V]
        if spec.main_precomputed:  # the OPD term arrives as (value, grads): L_traj only, if any
            if not spec.guidance:
                return {"opd": (jnp.float32(0.0), jnp.float32(1.0))}, {}
            traj = _guidance_term(spec, model, head, mb, teacher_head)
            safe = jnp.where(mb["traj_norm"][0] > 0, mb["traj_norm"][0], 1.0)
            return ({"guidance": (spec.guidance_weight * traj[0] / safe, jnp.float32(1.0 / spec.micro_batches))},
                    {"traj_loss": (lax.stop_gradient(traj[0]), traj[1])})
        ids, mask = mb["ids"], mb["loss_mask"]
        hidden = hidden_states(model, ids, mb["seq_mask"])  # [R, L, d_s]
        metrics = {}
        if spec.kind == "ce":  # supervised: token-mean cross-entropy of the targets
            nll = -token_logprobs(hidden, head, ids, mask, temperature=1.0, chunk=spec.chunk)
            metrics["ce"] = metric_pair(nll, mask)
            return {"opd": opd_loss(nll, mask, mb["weights"])}, metrics
        if spec.estimator == "sampled_token":
            # Tinker-style policy gradient: advantage -(log p_s - log p_T), held constant,
            # times log p_s(y_t); its gradient is the sampled-token estimate of the reverse KL's.
            logp = token_logprobs(hidden, head, ids, mask, temperature=spec.temperature, chunk=spec.chunk)
            kl = logp - mb["teacher_logp"]
            per_token = lax.stop_gradient(kl) * logp
        else:
            kl = token_divergences(hidden, head, mb["teacher_hidden"], teacher_head, mask, kind=spec.kind,
                                   beta=spec.beta, temperature=spec.temperature, chunk=spec.chunk)
            per_token = kl
            if spec.ce_weight > 0:
                logp = token_logprobs(hidden, head, ids, mask, temperature=1.0, chunk=spec.chunk)
                per_token = spec.ce_weight * -logp + (1.0 - spec.ce_weight) * kl
                metrics["ce"] = metric_pair(-logp, mask)
        metrics["token_kl"] = metric_pair(kl, mask)
        opd = opd_loss(per_token, mask, mb["weights"])
        if not spec.guidance:
            return {"opd": opd}, metrics
        traj = _guidance_term(spec, model, head, mb, teacher_head)
        metrics["opd_loss"] = (lax.stop_gradient(opd[0]), opd[1])
        metrics["traj_loss"] = (lax.stop_gradient(traj[0]), traj[1])
        # One term, already divided by the global counts (add_normalizers); its counts sum to 1
        # over the micro-batches, so accumulate_gradients' division is by 1.
        safe = lambda n: jnp.where(n > 0, n, 1.0)  # noqa: E731 - empty term: 0, not NaN
        value = opd[0] / safe(mb["opd_norm"][0]) + spec.guidance_weight * traj[0] / safe(mb["traj_norm"][0])
        return {"topd": (value, jnp.float32(1.0 / spec.micro_batches))}, metrics

    return loss_fn


def _guidance_term(spec: LossSpec, model, head, mb, teacher_head):
    """L_traj (sum, count) on the guidance rows: only the K positions that predict the
    continuation tokens (columns L-1 .. L+K-2) are turned into logits: ``[G, K, V]``."""
    start, k = spec.prefix_len - 1, spec.window
    g_hidden = hidden_states(model, mb["g_ids"], mb["g_mask"])[:, start:start + k]  # [G, K, d_s]
    s_logits = jnp.einsum("gkd,dv->gkv", g_hidden, head.astype(g_hidden.dtype),
                          preferred_element_type=jnp.float32)
    t_hidden = mb["g_teacher_hidden"]
    t_logits = jnp.einsum("gkd,dv->gkv", t_hidden, teacher_head.astype(t_hidden.dtype),
                          preferred_element_type=jnp.float32)
    return trajectory_guidance_loss(s_logits, lax.stop_gradient(t_logits), mb["g_window"],
                                    kind=spec.guidance_kind, decay=spec.guidance_decay,
                                    temperature=spec.temperature, targets=mb["g_targets"])
