"""``python -m topd_jax.eval``: sample, grade and summarise math answers.

    python -m topd_jax.eval --model PATH --data ../shared/data/aime24.jsonl,DIR_OF_JSONL \\
        --samples 16 --temperature 0.6 --max-new-tokens 16384 --template qwen-chat --out runs/eval1

PATH: a local HF directory (config.json + safetensors + tokenizer files) or one of our
checkpoints (``--tokenizer DIR`` then names the tokenizer). Writes OUT/samples.jsonl,
OUT/summary.json (config, seed rule, template, per-dataset and average metrics, timing) and
OUT/summary.txt, and prints the table.

Exit status (``topd_jax.cli_common``): 0 done; 2 a bad flag or input (a missing or malformed
data file, model or tokenizer directory: one ``error:`` line, nothing written); 1 a failure
while sampling or grading.

Randomness: sample j of problem i (i counts over all datasets in --data order) is drawn with
row key ``fold_in(fold_in(key(seed), i), j)``, so each sample is reproducible whatever the
batch size.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from topd_jax.cli_common import UsageError, add_log_level, run_command, setup_logging
from topd_jax.data.templates import TEMPLATE_NAMES, PromptTemplate, stop_token_ids

SEED_RULE = "row key of (problem i, sample j) = fold_in(fold_in(jax.random.key(seed), i), j)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m topd_jax.eval", allow_abbrev=False,
        description="Math reasoning evaluation with verified answers (math-verify). Exit status: "
                    "0 done, 2 bad flag or input (nothing written), 1 failure while sampling.",
    )
    p.add_argument("--model", required=True, help="local HF model directory or our checkpoint")
    p.add_argument("--data", required=True, help="JSONL file(s) or directories,"
                   " comma-separated (fields id, problem, answer)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--max-new-tokens", type=int, default=16384)
    p.add_argument("--template", choices=TEMPLATE_NAMES, default="qwen-chat")
    p.add_argument("--thinking", choices=("on", "off"), default="on",
                   help="qwen-chat: off appends Qwen3's empty <think></think> block")
    p.add_argument("--system", default=None, help="qwen-chat: system message (default none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each file")
    p.add_argument("--ks", default=None,
                   help="comma-separated k for pass@k / maj@k (default: powers of 2 and n)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="grading budget per item")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_log_level(p)
    return p


def _template(args) -> PromptTemplate:
    if args.template == "paper":
        if args.thinking != "on" or args.system is not None:
            raise UsageError("--thinking/--system apply to --template qwen-chat only")
        return PromptTemplate("paper")
    return PromptTemplate("qwen-chat", thinking=args.thinking == "on", system=args.system)


def _validate(args) -> None:
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if not 0.0 <= args.top_p <= 1.0 or args.temperature < 0 or args.top_k < 0:
        raise UsageError(
            f"need temperature >= 0, 0 <= top-p <= 1, top-k >= 0; got {args.temperature},"
            f" {args.top_p}, {args.top_k}"
        )


def _ks(args) -> list[int] | None:
    if args.ks is None:
        return None
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise UsageError(f"--ks takes comma-separated integers, got {args.ks!r}") from None
    if any(not 1 <= k <= args.samples for k in ks):
        raise UsageError(f"--ks values must be in 1..--samples={args.samples}, got {ks}")
    return ks


def main(argv: Sequence[str] | None = None) -> int:
    """The command: exit status 0, 2 (bad flag or input) or 1 (see the module docstring)."""
    def body(args: list[str]) -> int:
        evaluate(args)
        return 0
    return run_command(body, argv)


def evaluate(argv: Sequence[str]) -> dict:
    """Run the evaluation that the command line ``argv`` describes; returns the summary that
    is also written to OUT/summary.json. Bad input raises ``UsageError`` (argparse's own
    errors: ``SystemExit(2)``)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    _validate(args)
    template = _template(args)
    ks = _ks(args)

    # math-verify warns once that its own (signal) timeouts are off: ours replace them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    from topd_jax.data.jsonl import read_math_jsonl, resolve_data_files
    from topd_jax.data.tokenizer import load_tokenizer
    from topd_jax.eval.generation import make_generate_fn
    from topd_jax.eval.runner import run_eval
    from topd_jax.models import load_pretrained

    try:  # inputs: a missing or malformed file or directory is bad input (exit 2)
        datasets = {}
        for path in resolve_data_files(args.data):
            if path.stem in datasets:
                raise UsageError(f"two data files are named {path.stem!r}; rename one")
            items = read_math_jsonl(path)
            datasets[path.stem] = items[: args.limit] if args.limit else items
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        model = load_pretrained(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(e) from None
    generate = make_generate_fn(
        model, tokenizer, seed=args.seed, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, eos_ids=stop_token_ids(tokenizer, template),
    )
    config = {
        "model": str(args.model),
        "tokenizer": str(args.tokenizer or args.model),
        "data": [str(p) for p in resolve_data_files(args.data)],
        "limit": args.limit,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "seed_rule": SEED_RULE,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "eos_ids": stop_token_ids(tokenizer, template),
        "grading_timeout_s": args.timeout_s,
        "argv": list(argv),
    }
    summary = run_eval(
        datasets, template=template, generate=generate, samples=args.samples,
        out_dir=args.out, config=config, ks=ks, timeout_s=args.timeout_s,
        progress=not args.no_progress,
    )
    table = Path(args.out, "summary.txt").read_text()
    print(table, end="")
    t = summary["timing"]

    def rate(v):
        return "-" if v is None else f"{v:.1f}"

    print(f"generated {t['generated_tokens']} tokens in {t['generate_s']:.1f} s:"
          f" {rate(t['tokens_per_s'])} tokens/s with compilation,"
          f" {rate(t['tokens_per_s_after_round0'])} after round 0;"
          f" graded in {t['grade_s']:.1f} s; wrote {args.out}")
    return summary
