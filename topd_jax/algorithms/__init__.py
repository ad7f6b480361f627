"""One module per algorithm, wiring rollout -> scoring -> losses (no gradient here):

    batch, metrics, rollouts = prepare_batch(cfg, student, prompts, key, frozen, timings)
    state, out = train_step(state, batch, teacher_head)     # batch: a PreparedBatch (prepared.py)

``opd`` (plain OPD), ``topd`` (TOPD, and OPD + suppression / the high-divergence ablation),
``warmup`` (stage-1, teacher samples); ``sft`` (fixed responses, e.g. TAPO's cold start); ``grpo`` and ``tapo`` (RL with verifiable rewards,
no teacher). The differentiable loss over the batch is ``objective.make_loss_fn`` (the
distillation algorithms) or ``rl_objective.make_rl_loss_fn`` (GRPO/TAPO), chosen by
``build_objective``; the jitted update is ``train.step``.
"""

from __future__ import annotations

import dataclasses
import functools

from topd_jax.algorithms import grpo, opd, sft, tapo, topd, warmup
from topd_jax.algorithms.objective import LossSpec, add_normalizers, make_loss_fn
from topd_jax.algorithms.rl_objective import RlSpec, add_rl_normalizers, make_rl_loss_fn
from topd_jax.algorithms.opd import Frozen
from topd_jax.algorithms.prepared import PrecomputedGrad, PreparedBatch
from topd_jax.config.schema import RunConfig


def prepare_batch(cfg: RunConfig, student, prompts: dict, key, frozen: Frozen, timings: dict):
    """``(PreparedBatch, metrics, rollouts)``: dispatch on ``cfg.algorithm`` (and whether the
    TOPD detector is needed). Only TOPD's fused main pass adds a ``PrecomputedGrad``."""
    if cfg.uses_detector:
        return topd.prepare(cfg, student, prompts, key, frozen, timings)
    module = {"warmup": warmup, "sft": sft, "grpo": grpo, "tapo": tapo, "opd": opd}[cfg.algorithm]
    batch, metrics, rollouts = module.prepare(cfg, student, prompts, key, frozen, timings)
    return PreparedBatch(batch), metrics, rollouts


def build_objective(cfg: RunConfig, graphdef, seq_len: int):
    """``(loss_fn, normalize)`` for ``train.step.TrainStep``: the algorithm's loss over a
    prepared batch and the params-independent normaliser applied to each (mini-)batch."""
    if cfg.is_rl:
        spec = RlSpec.from_config(cfg)
        return make_rl_loss_fn(spec, graphdef), functools.partial(add_rl_normalizers, spec)
    spec = LossSpec.from_config(cfg, seq_len)
    return make_loss_fn(spec, graphdef), functools.partial(add_normalizers, spec)


def build_opd_term(cfg: RunConfig, graphdef, seq_len: int):
    """The distillation loss restricted to L_OPD_w (``logging.grad_norms_by_term``: ``train.step``
    takes ∇(λ·L_traj) as the difference): ``make_loss_fn`` of the objective without guidance,
    or None when the objective has no L_traj term (it is L_OPD_w already)."""
    if cfg.is_rl or cfg.algorithm in ("sft", "warmup"):
        raise ValueError(f"algorithm={cfg.algorithm} has no L_OPD/L_traj terms (opd and topd do)")
    spec = LossSpec.from_config(cfg, seq_len)
    if not spec.guidance:
        return None
    return make_loss_fn(dataclasses.replace(spec, guidance=False), graphdef)


__all__ = ["Frozen", "LossSpec", "PrecomputedGrad", "PreparedBatch", "RlSpec", "build_objective", "build_opd_term", "grpo",
           "make_loss_fn", "opd", "prepare_batch", "sft", "tapo", "topd", "warmup"]
