"""The evaluation loop, independent of how text is generated.

``run_eval`` formats every problem with the template, asks ``generate`` for ``samples``
rounds of completions (round j = one completion per prompt), grades them, and writes

    OUT/samples.jsonl   one SampleRecord per line, written round by round
    OUT/summary.json    {"config": ..., "datasets": {name: summary}, "average": ...,
                         "timing": {generate_s, generated_tokens, tokens_per_s, ...}}
    OUT/summary.txt     the table printed by the command

and returns the summary dict. ``generate(prompts, round_index) -> [Generation]`` owns the
model, batching and randomness; the eval command builds it from the model and the sampler
and puts its seed rule in ``config`` so the run records it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from topd_jax.data.jsonl import MathItem
from topd_jax.data.templates import PromptTemplate
from topd_jax.eval.scoring import format_table, grade_sample, macro_average, summarize
from topd_jax.rewards.math import DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Generation:
    """One completion: its text (stop token removed), generated tokens (stop token
    included), and whether it hit the token limit without a stop token."""

    text: str
    num_tokens: int
    truncated: bool


GenerateFn = Callable[[Sequence[str], int], Sequence[Generation]]


def run_eval(
    datasets: Mapping[str, Sequence[MathItem]],
    *,
    template: PromptTemplate,
    generate: GenerateFn,
    samples: int,
    out_dir: str | os.PathLike,
    config: Mapping | None = None,
    ks: Sequence[int] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> dict:
    """Generate, grade and summarise; see the module docstring. ``config`` (JSON-able) is
    stored in summary.json next to the template record."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not datasets:
        raise ValueError("run_eval: no datasets")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = [(name, item) for name, items in datasets.items() for item in items]
    prompts = [template.format(item.problem) for _, item in flat]

    from tqdm.auto import tqdm  # progress bar on stderr; disabled in tests

    bar = tqdm(total=samples * len(flat), desc="eval", unit="sample", disable=not progress)
    records = {name: [] for name in datasets}
    grade_s = 0.0
    round_s: list[float] = []  # generation wall time of each round
    round_tokens: list[int] = []
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for j in range(samples):
            t0 = time.perf_counter()
            gens = list(generate(prompts, j))
            t1 = time.perf_counter()
            round_s.append(t1 - t0)
            round_tokens.append(sum(g.num_tokens for g in gens))
            if len(gens) != len(prompts):
                raise ValueError(
                    f"generate returned {len(gens)} completions for {len(prompts)} prompts"
                )
            for (name, item), gen in zip(flat, gens):
                rec = grade_sample(dataset=name, id=item.id, sample=j, completion=gen.text,
                                   gold=item.answer, length=gen.num_tokens,
                                   truncated=gen.truncated, timeout_s=timeout_s)
                records[name].append(rec)
                f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
                bar.update(1)
            f.flush()
            grade_s += time.perf_counter() - t1
            if progress:
                done = [r for rs in records.values() for r in rs]
                bar.set_postfix(acc=f"{sum(r.correct for r in done) / len(done):.3f}")
    bar.close()

    tokens, generate_s = sum(round_tokens), sum(round_s)
    per_dataset = {
        name: summarize(recs, ks=ks, timeout_s=timeout_s) for name, recs in records.items()
    }
    summary = {
        "config": {**dict(config or {}), "samples": samples, "template": template.to_dict()},
        "datasets": per_dataset,
        "average": macro_average(per_dataset),
        "timing": {
            # generate_s includes compilation (first batch of each prompt-length bucket);
            # the rate after round 0 is closer to the steady state (None for one round).
            "generate_s": generate_s,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / generate_s if generate_s > 0 else None,
            "tokens_per_s_after_round0": (
                sum(round_tokens[1:]) / sum(round_s[1:]) if sum(round_s[1:]) > 0 else None
            ),
            "grade_s": grade_s,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    table = dict(per_dataset)
    if len(per_dataset) > 1:
        table["avg"] = summary["average"]
    (out / "summary.txt").write_text(format_table(table) + "\n")
    return summary
