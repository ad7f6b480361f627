"""The GRPO/TAPO demo on the synthetic task: TAPO's cold start, built and cached, and the report.

    student_dir = prepare_cold_start(cfg)                       # HF dir under demo.cache_dir
    result = train(cfg, plan=plan_run(cfg, student_dir))        # algorithm=grpo|tapo
    report = rl_report(cfg, result, student_dir=student_dir)    # stdout table + rl_report.json

**Cold start** (TAPO.md "Cold start", "On a synthetic task"): the student (``cfg.student``
sizes, vocabulary ``SyntheticTokenizer(construction_words=True)``) is trained by supervised
cross-entropy (``demos.sft.train_sft``) on a mix of
- solution examples: problem -> a solution in ``STUDENT_STYLE`` with a slip with probability
  ``demo.student_noise`` (a mediocre solver: RL needs groups with right *and* wrong rollouts);
- construction examples (``cold_start.construction_fraction`` of every batch, paper 15k of
  45k): ``synthetic_synthesis_prompt(problem, wrong, right)`` ->
  ``construction_target(problem, wrong)``, the wrong solution slipping at a random step.
Every batch has one shape: prompts left-padded to ``synthesis_prompt_len``, targets
right-padded to ``construction_len`` (positions count real tokens only, so the padding does
not move a solution example's positions).

Cached like ``demos.demo``'s models: ``<demo.cache_dir>/cold_start-<sha256[:12]>`` over the
fields that change the model (``cache_key``), written to a temporary sibling and renamed,
with ``demo_meta.json``: greedy accuracy on the held-out problems and the construction
parse / keep / correct rates on held-out problems (greedy).

**Reflection statistics** (definitions in ``topd_jax.rewards.reflection``): a completion is
*reflective* when it contains the correction word ``wait``; ``direct_solution_rate`` =
accuracy among the non-reflective completions, ``effective_reflection_rate`` = accuracy among
the reflective ones (None when there are none). The final ones are measured here with the
128-word tokenizer for both algorithms (the trainer's GRPO text I/O lacks the word ``wait``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from topd_jax.algorithms.tapo_construct import Failure, parse_construction, splice_text
from topd_jax.data import synthetic
from topd_jax.data.tasks import SYNTHETIC, task_for
from topd_jax.models import Qwen, init_model
from topd_jax.rewards import reflection
from topd_jax.demos import demo
from topd_jax.config.schema import RunConfig
from topd_jax.train.setup import RunSetupError
from topd_jax.demos.sft import train_sft

ROLE = "cold_start"
REPORT_JSON = "rl_report.json"
# Bump when the cold-start recipe changes in a way the hashed fields do not show.
RECIPE_VERSION = 1
CORRECTION_WORD = "wait"
TOKENIZER = synthetic.SyntheticTokenizer(construction_words=True)
Log = Callable[[str], None]
log_info: Log = logging.getLogger(__name__).info  # progress messages (the CLI shows them on stderr)


# ---------------------------------------------------------------- lengths (tokens)
def synthesis_prompt_len(cfg: RunConfig) -> int:
    """Columns of a synthesis prompt: bos, ``fix``, the problem, ``;``, two solutions
    separated by ``;`` (each at most ``demo.completion_len - 1`` words)."""
    return demo.prompt_len(cfg) + 2 * demo.completion_len(cfg) + 1


def trajectory_len(cfg: RunConfig) -> int:
    """A constructed trajectory with eos: the longest solution + ``wait`` + a corrected line."""
    return demo.completion_len(cfg) + 8


def construction_len(cfg: RunConfig) -> int:
    """A construction target with eos: the reconstruction + the analysis (5) + 2 tags."""
    return trajectory_len(cfg) + 7


# ---------------------------------------------------------------- cache
def cache_key(cfg: RunConfig) -> dict[str, Any]:
    """The config fields that determine the cold-start model."""
    d = cfg.demo
    return {"recipe": RECIPE_VERSION, "role": ROLE, "model": dataclasses.asdict(cfg.student),
            "task": dataclasses.asdict(cfg.data.synthetic), "cold_start": dataclasses.asdict(cfg.cold_start),
            "sft": {"batch_size": d.batch_size, "lr": d.lr, "slip_prob": d.student_noise}}


def cache_dir_for(cfg: RunConfig) -> Path:
    """``<demo.cache_dir>/cold_start-<first 12 hex of sha256(cache_key)>``."""
    blob = json.dumps(cache_key(cfg), sort_keys=True).encode()
    return Path(cfg.demo.cache_dir) / f"{ROLE}-{hashlib.sha256(blob).hexdigest()[:12]}"


# ---------------------------------------------------------------- data
def solution_example(problem: synthetic.Problem, rng: np.random.Generator, slip_prob: float) -> tuple[str, str]:
    """(prompt, target): the problem and a student-style solution, slipped w.p. ``slip_prob``."""
    return problem.prompt, synthetic.noisy_solution(problem, rng, slip_prob, synthetic.STUDENT_STYLE)[0]


def construction_example(problem: synthetic.Problem, rng: np.random.Generator) -> tuple[str, str, str]:
    """(synthesis prompt, construction target, wrong solution): the wrong solution slips at
    a random step; the right one and the target's new lines are in the student's style."""
    step = int(rng.integers(len(problem.steps)))
    style = synthetic.STUDENT_STYLE
    wrong = synthetic.render_solution(problem, synthetic.slipped_values(problem, step, rng), rng, style)
    right = synthetic.reference_solution(problem, rng, style)
    return (synthetic.synthetic_synthesis_prompt(problem, wrong, right),
            synthetic.construction_target(problem, wrong, rng, style), wrong)


def cold_start_batches(problems: Sequence[synthetic.Problem], batch_size: int, seed: int, *,
                       slip_prob: float, construction_fraction: float, prompt_len: int,
                       completion_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches (``supervised_arrays`` layout, ``[batch_size, prompt_len +
    completion_len]``): ``round(batch_size * construction_fraction)`` construction examples
    first, then solution examples, each on a random problem."""
    rng = np.random.default_rng(seed)
    n_con = round(batch_size * construction_fraction)
    while True:
        picked = [problems[i] for i in rng.integers(len(problems), size=batch_size)]
        pairs = [construction_example(p, rng)[:2] for p in picked[:n_con]]
        pairs += [solution_example(p, rng, slip_prob) for p in picked[n_con:]]
        yield synthetic.supervised_arrays(TOKENIZER, [a for a, _ in pairs], [b for _, b in pairs],
                                          prompt_len, completion_len)


# ---------------------------------------------------------------- measurement
def complete(model: Qwen, prompts: Sequence[str], *, prompt_len: int, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 256) -> list[str]:
    """``demo.complete`` with the 128-word tokenizer (the cold start knows the tags and ``wait``)."""
    return demo.complete(model, prompts, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, batch_size=batch_size, tokenizer=TOKENIZER)


def reflection_stats(completions: Sequence[str], correct: Sequence[bool]) -> dict[str, float | None]:
    """Accuracy and ``topd_jax.rewards.reflection``'s rates (marker ``wait``) as a JSON-ready
    dict; a rate over an empty set is None."""
    r = reflection.reflection_stats(completions, correct, SYNTHETIC.reflection_markers)

    def val(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"accuracy": r.correct / r.total if r.total else None, "reflective_fraction": val(r.reflection_rate),
            "direct_solution_rate": val(r.direct_solution_rate),
            "effective_reflection_rate": val(r.effective_reflection_rate), "num": r.total}


def solve_stats(model: Qwen, problems: Sequence[synthetic.Problem], *, max_new_tokens: int, prompt_len: int,
                temperature: float = 0.0, seed: int = 0) -> dict[str, float | None]:
    """``reflection_stats`` of the model's solutions to ``problems``."""
    texts = complete(model, [p.prompt for p in problems], prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed)
    return reflection_stats(texts, [SYNTHETIC.grade(t, p.answer) for t, p in zip(texts, problems)])


def construction_stats(model: Qwen, problems: Sequence[synthetic.Problem], *, prompt_len: int,
                       max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Rates of the model's replies to synthesis prompts for ``problems`` (a fresh slipped
    solution each), over all attempted: ``parse_rate`` (the tag format parses), ``kept_rate``
    (also splices onto the wrong solution's ids, ``tapo``'s default), ``correct_rate`` (kept
    and verified right), ``faithful_rate`` (correct, and the reconstruction repeats the wrong
    solution through its first wrong line, then ``wait``: a micro-reflection, not a fresh
    solution); ``prefix_match_len``: mean tokens shared with the wrong solution (kept ones)."""
    rng = np.random.default_rng(seed)
    examples = [construction_example(p, rng) for p in problems]
    replies = complete(model, [e[0] for e in examples], prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed)
    encode = lambda s: TOKENIZER.encode(s, add_bos=False)  # noqa: E731
    parsed = kept = correct = faithful = prefix = 0
    for p, (_, target, wrong), reply in zip(problems, examples, replies):
        got = parse_construction(reply)
        if isinstance(got, Failure):
            continue
        parsed += 1
        sp = splice_text(encode(wrong), got.reconstruction, decode=TOKENIZER.decode, encode=encode)
        if isinstance(sp, Failure):
            continue
        kept, prefix = kept + 1, prefix + sp.prefix_len
        right = SYNTHETIC.grade(TOKENIZER.decode(sp.ids), p.answer)
        ideal = parse_construction(target).reconstruction.split()
        head = ideal[: ideal.index(CORRECTION_WORD) + 1]  # the wrong prefix through its slip, + wait
        correct += right
        faithful += right and got.reconstruction.split()[: len(head)] == head
    n = max(len(problems), 1)
    return {"parse_rate": parsed / n, "kept_rate": kept / n, "correct_rate": correct / n,
            "faithful_rate": faithful / n, "prefix_match_len": prefix / kept if kept else None,
            "num": len(problems)}


# ---------------------------------------------------------------- preparation
def _check_positions(cfg: RunConfig) -> None:
    need = synthesis_prompt_len(cfg) + construction_len(cfg)
    have = cfg.student.max_position_embeddings
    if have is not None and have < need:
        raise RunSetupError(f"student.max_position_embeddings={have} < {need}: a cold-start construction "
                         f"example has {synthesis_prompt_len(cfg)} prompt + {construction_len(cfg)} target tokens")


def _train_cold_start(cfg: RunConfig, progress: bool) -> tuple[Qwen, dict[str, Any]]:
    s, d, c = cfg.data.synthetic, cfg.demo, cfg.cold_start
    train_problems, evals = demo.splits(cfg)
    model = init_model(demo.model_config(cfg.student), seed=s.seed + 1)
    batches = cold_start_batches(train_problems, d.batch_size, s.seed + 20, slip_prob=d.student_noise,
                                 construction_fraction=c.construction_fraction,
                                 prompt_len=synthesis_prompt_len(cfg), completion_len=construction_len(cfg))
    t0 = time.perf_counter()
    model, losses = train_sft(model, batches, steps=c.steps, optim=demo._sft_optim(cfg), desc="cold start",
                              progress=progress)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    solve, cons = {}, {}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):  # sampled: as the RL stage samples
        solve[name] = solve_stats(model, evals, max_new_tokens=trajectory_len(cfg), prompt_len=demo.prompt_len(cfg),
                                  temperature=temperature, seed=s.seed + 30)
        cons[name] = construction_stats(model, evals, prompt_len=synthesis_prompt_len(cfg),
                                        max_new_tokens=construction_len(cfg), temperature=temperature,
                                        seed=s.seed + 30)
    n_con = round(d.batch_size * c.construction_fraction)
    return model, {"role": ROLE, "greedy_accuracy": solve["greedy"]["accuracy"], "solve": solve, "construction": cons,
                   "num_eval": len(evals), "steps": c.steps, "solution_examples": c.steps * (d.batch_size - n_con),
                   "construction_examples": c.steps * n_con, "losses": losses,
                   "train_seconds": round(train_s, 2), "eval_seconds": round(time.perf_counter() - t0, 2),
                   "num_params": model.config.num_params(), "key": cache_key(cfg)}


def prepare_cold_start(cfg: RunConfig, *, progress: bool = True, log: Log = log_info) -> str:
    """The cold-start student's HF directory: ``student.path`` when set, else the cache entry
    (trained and saved first if missing)."""
    if task_for(cfg.data.source) is not SYNTHETIC:
        raise RunSetupError(f"the cold start needs data.source='synthetic', got {cfg.data.source!r}")
    if cfg.student.path is not None:
        return cfg.student.path
    _check_positions(cfg)
    out = cache_dir_for(cfg)
    if (meta := demo.read_meta(out)) is not None:
        log(f"rl demo: reusing cached cold start {out} (greedy accuracy {meta['greedy_accuracy']:.1%}, "
            f"constructions right {meta['construction']['greedy']['correct_rate']:.1%})")
        return str(out)
    log(f"rl demo: cold start ({cfg.cold_start.steps} supervised steps, solutions + constructions) -> {out}")
    model, meta = _train_cold_start(cfg, progress)
    demo.save_cached(model, meta, out)
    c = meta["construction"]["greedy"]
    log(f"rl demo: cold start accuracy {meta['greedy_accuracy']:.1%} greedy, "
        f"{meta['solve']['sampled']['accuracy']:.1%} sampled; constructions (greedy) parse {c['parse_rate']:.1%}, "
        f"kept {c['kept_rate']:.1%}, right {c['correct_rate']:.1%}, faithful {c['faithful_rate']:.1%} "
        f"({meta['train_seconds']:.0f} s training)")
    return str(out)


# ---------------------------------------------------------------- report
def _total(history: Sequence[Mapping[str, float]], name: str) -> float:
    return float(sum(r[name] for r in history if name in r and math.isfinite(r[name])))


def _mean(history: Sequence[Mapping[str, float]], name: str, weight: str | None = None) -> float | None:
    """Mean of a per-step metric over the steps that logged it (weighted by ``weight``)."""
    rows = [r for r in history if math.isfinite(r.get(name, math.nan))]
    w = [r.get(weight, 0.0) if weight else 1.0 for r in rows]
    return sum(r[name] * x for r, x in zip(rows, w)) / sum(w) if rows and sum(w) > 0 else None


def training_stats(history: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Reward and construction statistics over a run's history (TAPO metrics absent: None)."""
    attempted = _total(history, "constructions_attempted")
    kept = _total(history, "constructions_kept")
    tenth = max(1, len(history) // 10)
    rewards = [r["reward"] for r in history if "reward" in r]
    has = any("constructions_attempted" in r for r in history)
    per = (lambda x, n: x / n if n else None) if has else (lambda x, n: None)
    return {"reward_first": statistics.fmean(rewards[:tenth]) if rewards else None,
            "reward_last": statistics.fmean(rewards[-tenth:]) if rewards else None,
            "dcs_pass_fraction": _mean(history, "dcs_pass_fraction"),
            "constructions_attempted": attempted if has else None,
            "construction_parse_rate": per(_total(history, "constructions_parsed"), attempted),
            "construction_kept_rate": per(kept, attempted),
            "construction_correct_rate": per(_total(history, "constructions_correct"), kept),
            "prefix_match_len": _mean(history, "prefix_match_len", "constructions_kept"),
            "ots_weight": _mean(history, "ots_weight"),
            "ref_zero_variance_groups": _mean(history, "ref_zero_variance_groups")}


def final_stats(cfg: RunConfig, model: Qwen) -> dict[str, dict]:
    """Greedy and sampled (``rollout.temperature``) ``solve_stats`` on the held-out problems."""
    evals = demo.splits(cfg)[1][: cfg.eval.num_prompts or None]
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, prompt_len=cfg.data.max_prompt_len, seed=cfg.seed)
    return {"greedy": solve_stats(model, evals, **kw),
            "sampled": solve_stats(model, evals, temperature=cfg.rollout.temperature, **kw)}


def build_report(cfg: RunConfig, result, *, cold_start_meta: Mapping[str, Any] | None,
                 final: Mapping[str, dict] | None) -> dict[str, Any]:
    """The report dict: accuracy before/after (the trainer's greedy evals), training and
    construction statistics, the final reflection statistics, the cold start's meta."""
    ev = sorted((int(s), float(a)) for s, a in result.evals.items())
    before = ev[0][1] if ev and ev[0][0] == 0 else (cold_start_meta or {}).get("greedy_accuracy")
    after = ev[-1][1] if ev and ev[-1][0] > 0 else None
    times = [r["time_step"] for r in result.history if "time_step" in r]
    meta = dict(cold_start_meta or {})
    meta.pop("losses", None), meta.pop("key", None)
    return {"algorithm": cfg.algorithm, "seed": cfg.seed, "steps": result.final_step,
            "accuracy_before": before, "accuracy_after": after,
            "accuracy_gain": None if before is None or after is None else after - before,
            "eval_curve": [[s, a] for s, a in ev], "training": training_stats(result.history),
            "final": dict(final or {}), "cold_start": meta, "output_dir": str(result.output_dir),
            "median_step_seconds": statistics.median(times) if times else None}


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.3g}"


def format_table(report: Mapping[str, Any]) -> str:
    """A fixed-width text table of the report's headline numbers."""
    t, cs = report["training"], report["cold_start"].get("construction", {}).get("greedy", {})
    g, s = report["final"].get("greedy", {}), report["final"].get("sampled", {})
    rows = [("algorithm", report["algorithm"]),
            ("greedy accuracy before -> after",
             f"{_fmt(report['accuracy_before'])} -> {_fmt(report['accuracy_after'])}"),
            ("rollout reward (first -> last 10% of steps)", f"{_fmt(t['reward_first'])} -> {_fmt(t['reward_last'])}"),
            ("cold start: constructions parse / right / faithful",
             f"{_fmt(cs.get('parse_rate'))} / {_fmt(cs.get('correct_rate'))} / {_fmt(cs.get('faithful_rate'))}"),
            ("DCS pass fraction", _fmt(t["dcs_pass_fraction"])),
            ("constructions attempted", _fmt(t["constructions_attempted"], pct=False)),
            ("constructions parsed / kept", f"{_fmt(t['construction_parse_rate'])} / {_fmt(t['construction_kept_rate'])}"),
            ("kept constructions verified right", _fmt(t["construction_correct_rate"])),
            ("prefix match (tokens) / mean OTS weight",
             f"{_fmt(t['prefix_match_len'], False)} / {_fmt(t['ots_weight'], False)}"),
            ("final: reflective (greedy / sampled)",
             f"{_fmt(g.get('reflective_fraction'))} / {_fmt(s.get('reflective_fraction'))}"),
            ("final: direct-solution rate (greedy / sampled)",
             f"{_fmt(g.get('direct_solution_rate'))} / {_fmt(s.get('direct_solution_rate'))}"),
            ("final: effective-reflection rate (greedy / sampled)",
             f"{_fmt(g.get('effective_reflection_rate'))} / {_fmt(s.get('effective_reflection_rate'))}")]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return f"{line}\n" + "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows) + f"\n{line}"


def rl_report(cfg: RunConfig, result, *, student_dir: str | os.PathLike | None = None,
              log: Log = print) -> dict[str, Any]:
    """Build the report (final stats on ``result.model``), write ``<output_dir>/rl_report.json``,
    print the table; returns the report."""
    meta = demo.read_meta(student_dir) if student_dir is not None else None
    report = build_report(cfg, result, cold_start_meta=meta, final=final_stats(cfg, result.model))
    out = Path(result.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    log(format_table(report))
    log(f"rl demo report: {out / REPORT_JSON}")
    return report
