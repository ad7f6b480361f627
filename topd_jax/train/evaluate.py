"""The periodic evaluation hook: accuracy of the student on held-out prompts.

Prompts are batched ``batch_size`` at a time at the fixed prompt length
(``eval.generation.generate_in_batches``: a short last batch is filled with copies of its
last prompt, whose outputs are dropped; batch starting at prompt ``start`` samples with
``fold_in(key, start)``), so generation compiles once. Greedy when ``eval.temperature == 0``. The verifier (``text.verify``) and the
reflection markers are the task's (``topd_jax.data.tasks``).
"""

from __future__ import annotations

from typing import Sequence

import jax

from topd_jax.data.prompts import PromptExample
from topd_jax.data.tasks import task_for
from topd_jax.eval.generation import generate_in_batches
from topd_jax.rewards.reflection import ReflectionStats, reflection_stats
from topd_jax.config.schema import RunConfig
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
    for batch in generate_in_batches(
        model, [ex.ids for ex in examples], batch_size=batch_size,
        key_for=lambda start, index: jax.random.fold_in(key, start),
        max_new_tokens=e.max_new_tokens, eos_ids=text.eos_ids, pad_id=text.pad_id,
        temperature=e.temperature, num_samples=e.samples_per_prompt, length=cfg.data.max_prompt_len,
    ):
        for row, (tokens, n) in enumerate(zip(batch.tokens, batch.lengths)):
            completion = text.decode(tokens[:n].tolist())
            right = bool(text.verify(completion, examples[batch.index[row // e.samples_per_prompt]].answer))
            correct += right
            total += 1
            stats = stats + reflection_stats([completion], [right], markers)
    return correct / total, stats
