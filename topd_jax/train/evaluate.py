"""The periodic evaluation hook: accuracy of the student on held-out prompts.

Prompts are batched ``batch_size`` at a time at the fixed prompt length (a short last
batch is filled with copies of its last prompt, whose outputs are dropped), so generation
compiles once. Greedy when ``eval.temperature == 0``. The verifier (``text.verify``) and the
reflection markers are the task's (``topd_jax.data.tasks``).
"""

from __future__ import annotations

from typing import Sequence

import jax

from topd_jax.data.prompts import PromptExample, collate
from topd_jax.data.tasks import task_for
from topd_jax.rewards.reflection import ReflectionStats, reflection_stats
from topd_jax.rollout import generate
from topd_jax.sharding.hosts import fetch
from topd_jax.train.config import RunConfig
from topd_jax.train.setup import TextIO


def evaluate(cfg: RunConfig, model, examples: Sequence[PromptExample], text: TextIO, *, key: jax.Array,
             batch_size: int) -> float:
    """Mean verified accuracy over ``eval.num_prompts`` prompts x ``eval.samples_per_prompt``."""
    return evaluate_detailed(cfg, model, examples, text, key=key, batch_size=batch_size)[0]


def evaluate_detailed(cfg: RunConfig, model, examples: Sequence[PromptExample], text: TextIO, *,
                      key: jax.Array, batch_size: int) -> tuple[float, ReflectionStats]:
    """``(accuracy, reflection counts)``: the direct-solution and effective-reflection rates of
    the same completions (``topd_jax.rewards.reflection`` has the definitions)."""
    e = cfg.eval
    examples = list(examples)[: e.num_prompts] if e.num_prompts else list(examples)
    stats = ReflectionStats(0, 0, 0, 0)
    if not examples:
        return float("nan"), stats
    correct, total = 0, 0
    markers = task_for(cfg.data.source).reflection_markers
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        b = collate(chunk, cfg.data.max_prompt_len, text.pad_id)
        res = generate(model, b["prompt_ids"], b["prompt_mask"], key=jax.random.fold_in(key, start),
                       max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                       eos_ids=text.eos_ids, num_samples=e.samples_per_prompt, pad_id=text.pad_id)
        tokens, lengths = fetch(res.tokens), fetch(res.lengths)  # every process grades every row
        for i in range(real * e.samples_per_prompt):
            completion = text.decode(tokens[i, : lengths[i]].tolist())
            right = bool(text.verify(completion, chunk[i // e.samples_per_prompt].answer))
            correct += right
            total += 1
            stats = stats + reflection_stats([completion], [right], markers)
    return correct / total, stats
