"""``python -m topd_jax.eval.pass_filter``: the offline pass-rate filter for RL prompts
(TAPO.md "Cold start": keep the prompts a model solves 1/8 ... 7/8 of the time).

Two stages, each a command: sample and grade with the eval command, then filter::

    python -m topd_jax.eval --model MODEL --data train.jsonl --samples 8 --temperature 1.0 \\
        --max-new-tokens 8192 --out runs/passrate
    python -m topd_jax.eval.pass_filter --samples runs/passrate/samples.jsonl \\
        --data train.jsonl --min-pass 1/8 --max-pass 7/8 --out train_filtered.jsonl

The output keeps each kept record's ``id``, ``problem`` and ``answer`` and adds
``pass_rate``; the summary line counts kept, too easy, too hard and unsampled prompts.
Problems of ``--data`` without samples are an error unless ``--allow-missing`` (then they
are dropped and counted). Works with JSONL and (verl) parquet prompt files.

Exit status (``topd_jax.cli_common``): 0 written; 2 a bad flag or input (a missing or
malformed file, a bad rate, unsampled problems without ``--allow-missing``; nothing written).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

from topd_jax.cli_common import UsageError, add_log_level, run_command, setup_logging
from topd_jax.data.prompts import read_records


def parse_rate(text: str) -> float:
    """``"1/8"`` or ``"0.125"`` -> 0.125; must lie in [0, 1]."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a rate: {text!r} (use a fraction like 1/8 or a decimal)") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"rate {text!r} = {value} is outside [0, 1]")
    return value


def pass_rates(sample_lines: Iterable[str], *, where: str = "samples") -> dict[tuple[str, str], tuple[int, int]]:
    """``{(dataset, id): (right, samples)}`` from ``samples.jsonl`` lines (eval command)."""
    counts: dict[tuple[str, str], list[int]] = {}
    for n, line in enumerate(sample_lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, right = (str(rec["dataset"]), str(rec["id"])), bool(rec["correct"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}:{n}: not an eval sample record ({e})") from None
        c = counts.setdefault(key, [0, 0])
        c[0] += right
        c[1] += 1
    return {k: (r, s) for k, (r, s) in counts.items()}


def filter_file(data: str | Path, rates: dict[tuple[str, str], tuple[int, int]], *, lo: float, hi: float,
                allow_missing: bool = False) -> tuple[list[dict], Counter]:
    """Records of ``data`` whose pass rate is within [lo, hi]; counts by outcome. The dataset
    name is the file's stem, as the eval command names it."""
    data = Path(data)
    kept, counts = [], Counter()
    missing = []
    for item in read_records(data):
        rate = rates.get((data.stem, item.id))
        if rate is None:
            missing.append(item.id)
            continue
        p = rate[0] / rate[1]
        outcome = "kept" if lo <= p <= hi else ("too_easy" if p > hi else "too_hard")
        counts[outcome] += 1
        if outcome == "kept":
            answer = list(item.answer) if isinstance(item.answer, tuple) else item.answer
            kept.append({"id": item.id, "problem": item.problem, "answer": answer, "pass_rate": p})
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} problems of {str(data)!r} have no samples (first: id {missing[0]!r}); "
                         f"sample them with the eval command, or pass --allow-missing to drop them")
    counts["unsampled"] = len(missing)
    return kept, counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m topd_jax.eval.pass_filter", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="samples.jsonl written by python -m topd_jax.eval")
    p.add_argument("--data", required=True, help="the prompt file that was sampled (JSONL or parquet)")
    p.add_argument("--min-pass", default="1/8", help="lowest pass rate kept (default 1/8)")
    p.add_argument("--max-pass", default="7/8", help="highest pass rate kept (default 7/8)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--allow-missing", action="store_true", help="drop problems without samples")
    add_log_level(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        lo, hi = parse_rate(args.min_pass), parse_rate(args.max_pass)
        if lo > hi:
            raise ValueError(f"--min-pass {args.min_pass} > --max-pass {args.max_pass}")
        samples = Path(args.samples)
        if not samples.is_file():
            raise FileNotFoundError(f"--samples {str(samples)!r} does not exist")
        with samples.open() as f:
            rates = pass_rates(f, where=str(samples))
        kept, counts = filter_file(args.data, rates, lo=lo, hi=hi, allow_missing=args.allow_missing)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(e) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # no half-written output on interrupt
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(out)
    print(f"kept {counts['kept']} prompts with pass rate in [{lo:g}, {hi:g}]; too easy {counts['too_easy']}, "
          f"too hard {counts['too_hard']}, unsampled {counts['unsampled']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
