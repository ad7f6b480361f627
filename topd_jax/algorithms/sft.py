"""Supervised fine-tuning on fixed responses (``algorithm=sft``): TAPO's cold start (solution
and construction examples written by a stronger model), or any prompt -> response data.

The rows are the templated prompt (left-padded, as for sampling) followed by the response's
tokens and the stop token, right-padded to ``rollout.max_new_tokens``; the loss is the
token-mean cross-entropy of the response tokens (``objective``, ``LossSpec.kind="ce"``).
Responses longer than the budget are cut (no stop token then) and counted in the
``truncated_responses`` metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.algorithms.opd import Frozen, Pair, timed
from topd_jax.sharding.hosts import fetch
from topd_jax.config.schema import RunConfig


@dataclass(frozen=True)
class Targets:
    """What the loop reads of a "rollout" here: the target lengths ``[rows]``."""
    lengths: np.ndarray


def rows(cfg: RunConfig, frozen: Frozen, prompts: dict) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """``(rows, target lengths [B], number truncated)`` for a batch of supervised examples."""
    text, budget = frozen.text, cfg.rollout.max_new_tokens
    encode = text.encode_completion or text.encode
    prompt_ids, prompt_mask = fetch(prompts["prompt_ids"]), fetch(prompts["prompt_mask"])  # may span hosts
    b, plen = prompt_ids.shape
    ids = np.concatenate([prompt_ids, np.full((b, budget), frozen.pad_id, np.int32)], axis=1)
    seq_mask = np.concatenate([prompt_mask, np.zeros((b, budget), bool)], axis=1)
    loss_mask = np.zeros_like(seq_mask)
    lengths, truncated = np.zeros(b, np.int32), 0
    for i, response in enumerate(prompts["responses"]):
        target = list(encode(response)) + [frozen.eos_ids[0]]
        truncated += len(target) > budget
        target = target[:budget]
        ids[i, plen:plen + len(target)] = target
        seq_mask[i, plen:plen + len(target)] = loss_mask[i, plen:plen + len(target)] = True
        lengths[i] = len(target)
    return ({"ids": ids, "seq_mask": seq_mask, "loss_mask": loss_mask,
             "weights": np.ones(ids.shape, np.float32)}, lengths, truncated)


def prepare(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
            timings: dict[str, float]) -> tuple[dict, dict[str, Pair], Targets]:
    """The supervised rows (no sampling, no teacher); ``student`` and ``key`` are unused."""
    batch, lengths, truncated = timed(timings, "scoring", rows, cfg, frozen, prompts)
    metrics = {"response_len": (float(lengths.sum()), lengths.size),
               "truncated_responses": (float(truncated), lengths.size)}
    return {k: jnp.asarray(v) for k, v in batch.items()}, metrics, Targets(lengths)
