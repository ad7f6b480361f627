"""One module per algorithm, wiring rollout -> scoring -> losses (no gradient here):

    batch, metrics, rollouts = prepare_batch(cfg, student, prompts, key, frozen, timings)

``opd`` (plain OPD), ``topd`` (TOPD, and OPD + suppression / the high-divergence ablation),
``warmup`` (stage-1, teacher samples). The differentiable loss over the batch is
``objective.make_loss_fn`` (shared by all three); the jitted update is ``train.step``.
"""

from __future__ import annotations

from topd_jax.algorithms import opd, topd, warmup
from topd_jax.algorithms.objective import LossSpec, make_loss_fn
from topd_jax.algorithms.opd import Frozen
from topd_jax.train.config import RunConfig


def prepare_batch(cfg: RunConfig, student, prompts: dict, key, frozen: Frozen, timings: dict):
    """Dispatch on ``cfg.algorithm`` (and whether the TOPD detector is needed)."""
    if cfg.algorithm == "warmup":
        return warmup.prepare(cfg, student, prompts, key, frozen, timings)
    if cfg.uses_detector:
        return topd.prepare(cfg, student, prompts, key, frozen, timings)
    return opd.prepare(cfg, student, prompts, key, frozen, timings)


__all__ = ["Frozen", "LossSpec", "make_loss_fn", "opd", "prepare_batch", "topd", "warmup"]
