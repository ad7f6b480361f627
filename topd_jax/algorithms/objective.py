"""The differentiable part of every algorithm: one loss function over a prepared batch.

The algorithms (opd.py, topd.py, warmup.py) do everything that needs no gradient —
sampling, teacher scoring, the TOPD detector — and hand the step a batch of arrays:

main rows ``[R, L]`` (token-indexed, see ``scoring``):
  ids, seq_mask          the rollout (prompt + completion) and its real tokens
  loss_mask              the tokens the loss is taken on (completion & valid)
  weights                w_t, float32 (1 for OPD, warm-up and SFT; absent with a detector)
  teacher_hidden         ``[R, L, d_t]`` teacher final hidden states (full-vocab estimator)
  teacher_logp           ``[R, L]`` log p_T(y_t) (sampled-token estimator)
detector (TOPD, OPD + suppression; classified over the whole batch in ``topd.prepare``):
  candidates             ``[R, L]`` bool high-loss candidates
  divergence             ``[R, L]`` D_t at the candidates (0 elsewhere)
  false_alarm            ``[R, L]`` bool candidates in the suppressed regime (``losses.false_alarms``)
  token_loss             ``[R, L]`` ℓ_t, with ``topd.fused_main_pass`` only: the step reads it as a
                         constant and its gradient comes as the batch's ``PrecomputedGrad``
guidance rows ``[G, L + K]`` (TOPD only): c_t followed by the K-token continuation a
  g_ids, g_mask          the rows and their real tokens
  g_window               ``[G, K]`` valid continuation tokens of guided points
  g_targets              ``[G, K]`` the continuation tokens (NLL target)
  g_teacher_hidden       ``[G, K, d_t]`` teacher hidden states at the K predicting positions

``make_loss_fn`` returns ``loss_fn(params, micro_batch, teacher_head) -> (terms, metrics)``,
both ``{name: (sum, count)}`` as ``train.optim.accumulate_gradients`` expects. Without a
detector the term is ``opd`` = ``losses.opd_loss``. With one, the single term ``topd`` is
``losses.topd_loss`` (L_OPD_w + λ·L_traj; suppression from ``false_alarm``) normalised by the
global counts that ``add_normalizers`` puts in the batch (metrics ``opd_loss`` and
``traj_loss`` keep the two parts).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import jax
from flax import nnx
from jax import lax

from topd_jax.algorithms.scoring import hidden_states, token_divergences, token_logprobs
from topd_jax.losses import opd_loss, topd_loss, trajectory_weights
from topd_jax.config.schema import RunConfig


@dataclass(frozen=True)
class LossSpec:
    """Static settings of the loss (hashable: part of the compiled step's identity)."""
    estimator: str = "full_vocab"        # full_vocab | sampled_token
    kind: str = "reverse_kl"             # per-token divergence on the main rows; "ce": SFT, no teacher
    beta: float = 0.5                    # jsd
    temperature: float = 1.0             # KD temperature
    chunk: int | None = None             # positions per chunk (None: whole logits)
    ce_weight: float = 0.0               # warm-up: alpha * CE + (1 - alpha) * divergence
    detector: bool = False               # TOPD / OPD + suppression: the loss is losses.topd_loss
    suppress: bool = True                # (detector) weight s at false alarms
    suppression_weight: float = 0.0      # s
    guidance: bool = False
    guidance_kind: str = "forward_kl"    # forward_kl | nll
    guidance_decay: float | None = None
    prefix_len: int = 0                  # L: column where the guidance continuation starts
    window: int = 0                      # K
    guidance_weight: float = 1.0         # lambda
    micro_batches: int = 1
    main_precomputed: bool = False       # ℓ_t comes with the batch, its gradient as a PrecomputedGrad

    def __post_init__(self):
        if (self.guidance or self.main_precomputed) and not self.detector:
            raise ValueError(f"LossSpec: guidance={self.guidance} / main_precomputed={self.main_precomputed} "
                             "need detector=True (the TOPD loss, losses.topd_loss)")

    @classmethod
    def from_config(cls, cfg: RunConfig, seq_len: int) -> "LossSpec":
        warm = cfg.algorithm == "warmup"
        kind = "ce" if cfg.algorithm == "sft" else "forward_kl" if warm else cfg.loss.divergence
        return cls(
            estimator=cfg.loss.estimator, kind=kind,
            beta=cfg.loss.jsd_beta, temperature=cfg.loss.kd_temperature, chunk=cfg.loss.vocab_chunk,
            ce_weight=cfg.warmup.ce_weight if warm else 0.0, detector=cfg.uses_detector,
            suppress=cfg.suppression != "none", suppression_weight=cfg.topd.suppression_weight,
            guidance=cfg.uses_guidance,
            guidance_kind="nll" if cfg.topd.guidance_target == "teacher_tokens" else "forward_kl",
            guidance_decay=None if cfg.topd.guidance_decay == 1.0 else cfg.topd.guidance_decay,
            prefix_len=seq_len, window=cfg.topd.window, guidance_weight=cfg.topd.guidance_weight,
            micro_batches=cfg.optim.micro_batches, main_precomputed=cfg.fuses_main_pass)


def add_normalizers(spec: LossSpec, batch: dict) -> dict:
    """With a detector: the global OPD and L_traj counts of ``losses.topd_loss`` (the
    ``token_normalizer`` / ``guidance_normalizer`` it takes), as per-row copies so that they
    split into micro-batches like every other array. They depend on masks only, never on
    params, which lets ``L_OPD_w + λ·L_traj`` be one term with ONE backward pass instead of one
    per term (``optim.accumulate_gradients``' general path)."""
    if not spec.detector:
        return batch
    mask = batch["loss_mask"]
    _, counts = topd_objective(spec, jnp.zeros(mask.shape, jnp.float32), batch, None, normalizers=None)
    out = dict(batch, opd_norm=jnp.full((mask.shape[0],), counts["opd_loss"][1]))
    if spec.guidance:
        traj = jnp.sum(trajectory_weights(batch["g_window"], decay=spec.guidance_decay))
        out["traj_norm"] = jnp.full((batch["g_ids"].shape[0],), traj)
    return out


def topd_objective(spec: LossSpec, token_loss: jax.Array, mb: dict, guidance_logits, *, normalizers):
    """``losses.topd_loss`` of a (micro-)batch: ``(loss, metrics)``.

    token_loss ``[R, L]`` ℓ_t; ``guidance_logits``: ``(student [G, K, V], teacher [G, K, V])``
    at the continuation tokens, or None (no L_traj); ``normalizers``: the global
    ``(opd count, L_traj count or None)`` (``add_normalizers``), or None: this batch's own.
    """
    s_logits, t_logits = (None, None) if guidance_logits is None else guidance_logits
    token_norm, traj_norm = (None, None) if normalizers is None else normalizers
    return topd_loss(
        token_loss, mb["loss_mask"], candidates=mb["candidates"], divergence=mb["divergence"],
        false_alarm=mb["false_alarm"], guidance_student_logits=s_logits, guidance_teacher_logits=t_logits,
        guidance_mask=None if s_logits is None else mb["g_window"],
        guidance_targets=None if s_logits is None else mb["g_targets"],
        lam=spec.guidance_weight, suppression_weight=spec.suppression_weight, suppress=spec.suppress,
        traj_kind=spec.guidance_kind, traj_decay=spec.guidance_decay, traj_temperature=spec.temperature,
        token_normalizer=token_norm, guidance_normalizer=traj_norm)


def main_term_cotangent(spec: LossSpec, token_loss: jax.Array, batch: dict) -> jax.Array:
    """∂L/∂ℓ ``[R, L]`` of the step's loss over the whole ``batch`` (``topd.fused_main_pass``
    pulls it back through ℓ's residuals). L_traj does not depend on ℓ, and over the whole batch
    the own counts are the global ones, so ``topd_loss`` without guidance gives it."""
    return jax.grad(lambda ell: topd_objective(spec, ell, batch, None, normalizers=None)[0])(token_loss)


def metric_pair(x, mask):
    """``(Σ x·mask, Σ mask)`` without gradient: a metric in the ``(sum, count)`` contract."""
    m = mask.astype(jnp.float32)
    return jnp.sum(lax.stop_gradient(x) * m), jnp.sum(m)


def make_loss_fn(spec: LossSpec, graphdef: nnx.GraphDef):
    """``loss_fn(params, mb, teacher_head)``; see the module docstring for ``mb``."""

    def loss_fn(params, mb, teacher_head):
        model = nnx.merge(graphdef, params)
        head = model.lm_head_weight()  # [d_s, V]
        ids, mask = mb["ids"], mb["loss_mask"]
        metrics = {}
        if spec.main_precomputed:  # ℓ_t from prepare's forward; its gradient is the PrecomputedGrad
            per_token = kl = lax.stop_gradient(mb["token_loss"])
        else:
            hidden = hidden_states(model, ids, mb["seq_mask"])  # [R, L, d_s]
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
        if not spec.detector:
            return {"opd": opd_loss(per_token, mask, mb["weights"])}, metrics
        guidance = _guidance_logits(spec, model, head, mb, teacher_head) if spec.guidance else None
        norms = (mb["opd_norm"][0], mb["traj_norm"][0] if spec.guidance else None)
        value, parts = topd_objective(spec, per_token, mb, guidance, normalizers=norms)
        metrics["opd_loss"] = parts["opd_loss"]
        if spec.guidance:
            metrics["traj_loss"] = parts["traj_loss"]
        # One term, already divided by the global counts (add_normalizers); its counts sum to 1
        # over the micro-batches, so accumulate_gradients' division is by 1.
        return {"topd": (value, jnp.float32(1.0 / spec.micro_batches))}, metrics

    return loss_fn


def _guidance_logits(spec: LossSpec, model, head, mb, teacher_head):
    """Student and teacher logits ``[G, K, V]`` float32 on the guidance rows: only the K
    positions that predict the continuation tokens (columns L-1 .. L+K-2); the teacher's
    are constants."""
    start, k = spec.prefix_len - 1, spec.window
    g_hidden = hidden_states(model, mb["g_ids"], mb["g_mask"])[:, start:start + k]  # [G, K, d_s]
    s_logits = jnp.einsum("gkd,dv->gkv", g_hidden, head.astype(g_hidden.dtype),
                          preferred_element_type=jnp.float32)
    t_hidden = mb["g_teacher_hidden"]
    t_logits = jnp.einsum("gkd,dv->gkv", t_hidden, teacher_head.astype(t_hidden.dtype),
                          preferred_element_type=jnp.float32)
    return s_logits, lax.stop_gradient(t_logits)
