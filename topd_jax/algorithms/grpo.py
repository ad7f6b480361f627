"""GRPO (TAPO.md steps 1-2): ``rollout.n`` samples per prompt from the current policy, a
binary reward per sample from the verifier, advantages normalised within each prompt's
group, a PPO-clipped token surrogate (``rl_objective``). No teacher: ``frozen.teacher`` is
the frozen reference policy when ``grpo.kl_coef > 0`` and None otherwise.

Old log-probs come from one teacher-forced pass of the policy before the update (not from
the sampler's decode-time numbers), so that at the first update ρ = 1 exactly.

Metrics (``(sum, count)`` pairs): ``reward`` (mean verified reward = pass@1 of the
rollouts), ``solved_fraction`` (prompts with at least one right rollout),
``zero_variance_groups`` (prompts whose rollouts are all right or all wrong: no gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.algorithms import opd
from topd_jax.algorithms.opd import Frozen, Pair, timed
from topd_jax.algorithms.scoring import score_tokens
from topd_jax.losses import group_advantages
from topd_jax.rollout import GenerationResult
from topd_jax.sharding.hosts import fetch
from topd_jax.config.schema import RunConfig


def completions(gen: GenerationResult) -> list[list[int]]:
    """Completion token ids per row, the stop token included when the row finished."""
    tokens, lengths = fetch(gen.tokens), fetch(gen.lengths)
    return [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]


def grade(frozen: Frozen, completion_ids: list[list[int]], answers: list, n: int) -> np.ndarray:
    """``[P, n]`` bool: row ``p * n + j`` verified against ``answers[p]``."""
    text = frozen.text
    right = [bool(text.verify(text.decode(ids), answers[i // n])) for i, ids in enumerate(completion_ids)]
    return np.asarray(right, bool).reshape(len(answers), n)


def advantages(cfg: RunConfig, rewards: np.ndarray, group_mask: np.ndarray | None = None) -> np.ndarray:
    """Group-normalised advantages ``[P, G]`` (losses.group_advantages with the config's options)."""
    g = cfg.grpo
    return np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32),
                                       None if group_mask is None else jnp.asarray(group_mask),
                                       eps=g.advantage_eps, scale=g.advantage_scale))


def reward_metrics(right: np.ndarray) -> dict[str, Pair]:
    """right ``[P, G]`` bool -> reward, solved fraction, zero-variance groups."""
    p = right.shape[0]
    return {"reward": (float(right.sum()), right.size),
            "solved_fraction": (float(right.any(axis=1).sum()), p),
            "zero_variance_groups": (float((right.all(axis=1) | ~right.any(axis=1)).sum()), p)}


def policy_rows(cfg: RunConfig, student, frozen: Frozen, rows: dict) -> dict:
    """Add ``old_logp`` (and ``ref_logp`` with a KL term): teacher-forced, no gradient."""
    chunk = cfg.loss.vocab_chunk
    out = {"old_logp": score_tokens(student, rows["ids"], rows["seq_mask"], rows["loss_mask"], chunk=chunk)}
    if cfg.uses_reference:
        out["ref_logp"] = score_tokens(frozen.teacher, rows["ids"], rows["seq_mask"], rows["loss_mask"],
                                       chunk=chunk)
    return out


def sample_and_grade(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
                     timings: dict[str, float]) -> tuple[GenerationResult, list[list[int]], np.ndarray]:
    """The rollouts, their completion ids and ``right [P, n]``."""
    r = cfg.rollout
    gen = timed(timings, "sampling", opd.sample_rollouts, cfg, student, prompts, key, frozen,
                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens)
    ids = completions(gen)
    right = timed(timings, "scoring", grade, frozen, ids, list(prompts["answers"]), r.n)
    return gen, ids, right


def prepare(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
            timings: dict[str, float]) -> tuple[dict, dict[str, Pair], GenerationResult]:
    """Sample, grade, score; return ``(batch, metrics, rollouts)`` (``rl_objective`` rows)."""
    gen, _, right = sample_and_grade(cfg, student, prompts, key, frozen, timings)
    rows = opd.main_rows(gen)
    rows["advantages"] = jnp.asarray(advantages(cfg, right).reshape(-1))
    rows["term"] = jnp.zeros((rows["ids"].shape[0],), jnp.int32)
    rows.update(timed(timings, "scoring", policy_rows, cfg, student, frozen, rows))
    metrics = opd.rollout_metrics(gen)
    metrics.update(reward_metrics(right))
    return rows, metrics, gen
