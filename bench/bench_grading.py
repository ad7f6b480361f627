"""Grading throughput (items/s) on the MATH-500 gold answers.

    python bench/bench_grading.py [--data ../shared/data/math500.jsonl] [--repeats 3]

Each item is a completion ``"... so the answer is \\boxed{GOLD}."`` (right) or with a
perturbed gold (wrong), graded by ``topd_jax.rewards.math.grade`` on the main thread with the
default 5 s budget. "cold" clears the gold-parse memo first (first sample of a problem);
"warm" is every later sample of the same problem (the eval command grades n samples per
problem). Prints one line per mode; record the figures in BUILD_NOTES.md with `uptime`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topd_jax.data.jsonl import read_math_jsonl  # noqa: E402
from topd_jax.rewards import math as rm  # noqa: E402


def perturb(gold: str) -> str:
    m = re.search(r"\d", gold)
    if m is None:
        return "2" + gold
    return gold[: m.start()] + str((int(m.group()) + 1) % 10) + gold[m.end() :]


def run(items, *, wrong: bool, cold: bool) -> tuple[float, int]:
    if cold:
        rm._parse_gold.cache_clear()
    start = time.perf_counter()
    n_correct = 0
    for it in items:
        ans = perturb(it.answer) if wrong else it.answer
        n_correct += rm.grade(f"Reasoning... so the answer is \\boxed{{{ans}}}.", it.answer)
    return len(items) / (time.perf_counter() - start), n_correct


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500.jsonl"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    items = read_math_jsonl(args.data)
    print(f"{len(items)} items from {args.data}; load avg {os.getloadavg()}")
    for wrong in (False, True):
        for cold in (True, False):
            rates = []
            for _ in range(args.repeats):
                rate, n_correct = run(items, wrong=wrong, cold=cold)
                rates.append(rate)
            label = f"{'wrong' if wrong else 'right'}-{'cold' if cold else 'warm'}"
            median = sorted(rates)[len(rates) // 2]
            print(f"{label:12s} best {max(rates):7.1f} items/s  median {median:7.1f}"
                  f"  ({n_correct}/{len(items)} graded correct)")


if __name__ == "__main__":
    main()
