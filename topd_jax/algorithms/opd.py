"""OPD (TOPD.md §1): the student samples n rollouts per prompt, the frozen teacher scores
every completion token, the step minimises the per-token divergence on the student's own
prefixes (full-vocabulary reverse KL by default; sampled-token estimator as an option).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.algorithms.scoring import forward_hidden, score_tokens
from topd_jax.rollout import GenerationResult, generate
from topd_jax.sharding.hosts import fetch
from topd_jax.config.schema import RunConfig

Pair = tuple[Any, Any]


@dataclass(frozen=True)
class Frozen:
    """What every step needs besides the train state: the teacher (for GRPO/TAPO: the frozen
    reference policy, or None), token ids, and the text side (decode, verifier, template)."""
    teacher: Any            # topd_jax.models.Qwen, never optimised
    teacher_head: jax.Array  # [d_t, V_t]
    eos_ids: tuple[int, ...]
    pad_id: int
    text: Any = None         # train.setup.TextIO: decode + verify (GRPO/TAPO rewards)
    format_prompt: Any = None  # problem text -> model input text (the data template; TAPO)
    ot_table: Any = None     # [V, d] frozen OT table (topd.ot_embedding; train.loop passes topd.frozen_ot_table); None: the current student's


def timed(timings: dict[str, float], name: str, fn, *args, **kwargs):
    """Run ``fn`` to completion (block on its arrays) and add the seconds to ``timings[name]``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return out


def sample_rollouts(cfg: RunConfig, model, prompts: dict, key: jax.Array, frozen: Frozen, *,
                    temperature: float, top_p: float, top_k: int | None, max_new_tokens: int,
                    return_cache: bool = False) -> GenerationResult:
    """``rollout.n`` samples per prompt: rows ``b * n + j`` belong to prompt ``b``."""
    return generate(model, prompts["prompt_ids"], prompts["prompt_mask"], key=key,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k or 0, eos_ids=frozen.eos_ids, num_samples=cfg.rollout.n,
                    pad_id=frozen.pad_id, return_cache=return_cache)


def main_rows(gen: GenerationResult) -> dict[str, jax.Array]:
    """The rollout as teacher-forcing rows; the loss mask is the completion (token-indexed)."""
    return {"ids": gen.sequences, "seq_mask": gen.sequence_mask, "loss_mask": gen.completion_mask,
            "weights": jnp.ones(gen.sequences.shape, jnp.float32)}


def teacher_inputs(cfg: RunConfig, frozen: Frozen, rows: dict, *, need_hidden: bool = False) -> dict:
    """Teacher scoring of the main rows: hidden states (full-vocab; or when a detector needs
    ℓ_t) and/or log p_T(y_t) (sampled-token estimator)."""
    out = {}
    if cfg.loss.estimator == "sampled_token":
        out["teacher_logp"] = score_tokens(frozen.teacher, rows["ids"], rows["seq_mask"], rows["loss_mask"],
                                           temperature=cfg.loss.kd_temperature, chunk=cfg.loss.vocab_chunk)
    if cfg.loss.estimator == "full_vocab" or need_hidden:
        out["teacher_hidden"] = forward_hidden(frozen.teacher, rows["ids"], rows["seq_mask"])
    return out


def rollout_metrics(gen: GenerationResult) -> dict[str, Pair]:
    lengths = fetch(gen.lengths).astype(np.float64)  # fetch: the rows may span several hosts
    return {"rollout_len": (lengths.sum(), lengths.size),
            "rollout_finished": (float(fetch(gen.finished).sum()), lengths.size)}


def prepare(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
            timings: dict[str, float], *,
            return_cache: bool = False) -> tuple[dict, dict[str, Pair], GenerationResult]:
    """Sample, score, and return ``(batch, metrics, rollouts)`` for the update step.
    ``return_cache``: keep the rollouts' KV cache in ``rollouts.cache`` (TOPD branches from it)."""
    r = cfg.rollout
    gen = timed(timings, "sampling", sample_rollouts, cfg, student, prompts, key, frozen,
                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                return_cache=return_cache)
    rows = main_rows(gen)
    rows.update(timed(timings, "scoring", teacher_inputs, cfg, frozen, rows))
    return rows, rollout_metrics(gen), gen
