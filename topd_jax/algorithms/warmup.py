"""Stage-1 off-policy warm-up (TOPD.md §5): the teacher samples a response per prompt
(``rollout.n`` of them, at the warm-up temperature / top-p), the student is trained on the
teacher's tokens with ``alpha * CE + (1 - alpha) * forward KL(p_T || p_θ)`` per token
(token mean over the batch). The loss itself lives in ``algorithms.objective``
(``LossSpec.ce_weight``, ``kind="forward_kl"``). The teacher's scoring forward runs in
``optim.micro_batches`` row groups, so at long rows one group's activations are live at a time.
"""

from __future__ import annotations

import jax

from topd_jax.algorithms import opd
from topd_jax.algorithms.opd import Frozen, Pair, timed
from topd_jax.algorithms.scoring import forward_hidden
from topd_jax.rollout import GenerationResult
from topd_jax.config.schema import RunConfig


def prepare(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
            timings: dict[str, float]) -> tuple[dict, dict[str, Pair], GenerationResult]:
    w = cfg.warmup
    gen = timed(timings, "sampling", opd.sample_rollouts, cfg, frozen.teacher, prompts, key, frozen,
                temperature=w.temperature, top_p=w.top_p, top_k=None, max_new_tokens=w.max_new_tokens)
    rows = opd.main_rows(gen)
    # the teacher scores the rows in optim.micro_batches groups, as the student's update takes them
    rows["teacher_hidden"] = timed(timings, "scoring", forward_hidden, frozen.teacher, rows["ids"],
                                   rows["seq_mask"], row_groups=cfg.optim.micro_batches)
    return rows, opd.rollout_metrics(gen), gen
