"""The embedded demo's own stages: a tiny teacher and a mediocre student, built and cached.

    student_dir, teacher_dir = prepare_demo_models(cfg)   # HF dirs under cfg.demo.cache_dir
    result = topd_jax.train.loop.train(cfg, student_path=student_dir, teacher_path=teacher_dir)
    demo_report(cfg, result)                               # stdout table + PNG + JSON

The teacher (``cfg.teacher`` sizes) is trained by supervised cross-entropy on reference
solutions of the synthetic task (``topd_jax.data.synthetic``, teacher style, no slips) until
it solves the held-out problems; the smaller student (``cfg.student``) is warmed up on
*noisy* solutions in its own surface style: a random slip with probability
``demo.student_noise``, and a systematic sign confusion (each ``-`` step written as ``+`` with
probability ``demo.student_confusion``). Random slips alone never level off: the right value
stays the most likely token, so a greedy student climbs to ~95 % once it can copy, and where it
stands after N steps depends on when its phase transition happened. The confusion gives a
plateau instead (greedy accuracy ≈ the share of problems without ``-``), so the student knows
the format, is past its jump, and makes a mistake on-policy distillation can fix.

Each model is cached in ``<cache_dir>/<role>-<hash>`` where the hash covers exactly the
config fields that change it (its sizes, the task, the recipe); a later run with the same
fields reuses the directory. Each directory holds the HF checkpoint plus ``demo_meta.json``
(accuracy on the held-out problems, training losses, wall time, the hashed fields).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from topd_jax.checkpoints import save_hf
from topd_jax.data import synthetic
from topd_jax.data.tasks import SYNTHETIC, task_for
from topd_jax.eval.generation import generate_in_batches, pad_batch
from topd_jax.models import ModelConfig, Qwen, init_model
from topd_jax.config.schema import ModelSpec, OptimConfig, RunConfig
from topd_jax.demos.sft import train_sft

META_FILE = "demo_meta.json"
# Bump when the preparation recipe changes in a way the hashed fields do not show.
RECIPE_VERSION = 3
Log = Callable[[str], None]
log_info: Log = logging.getLogger(__name__).info  # progress messages (the CLI shows them on stderr)


# ---------------------------------------------------------------- config -> models
def model_config(spec: ModelSpec) -> ModelConfig:
    """The ``ModelConfig`` a spec with explicit sizes or a preset describes."""
    if spec.path is not None:
        raise ValueError(f"model_config needs sizes or a preset, got path={spec.path!r}")
    kw = dict(spec.arch_overrides(), dtype=spec.dtype, param_dtype=spec.param_dtype,
              remat=spec.remat, attention=spec.attention)
    return ModelConfig.preset(spec.preset, **kw) if spec.preset else ModelConfig(**kw)


def prompt_len(cfg: RunConfig) -> int:
    """Prompt columns: bos + 4 tokens for ``a = N ;`` + 6 per step + ``? x`` (see synthetic)."""
    return 1 + 4 + 6 * cfg.data.synthetic.max_steps + 2


def completion_len(cfg: RunConfig) -> int:
    """Solution columns: 8 tokens per step (7 for the first), ``; answer N``, eos."""
    return 8 * cfg.data.synthetic.max_steps - 1 + 3 + 1


def cache_key(cfg: RunConfig, role: str) -> dict[str, Any]:
    """The config fields that determine the prepared ``role`` model ("teacher"/"student")."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    spec = cfg.teacher if role == "teacher" else cfg.student
    demo = dataclasses.asdict(cfg.demo)
    demo.pop("cache_dir")
    if role == "teacher":  # the student's recipe never changes the teacher
        demo.pop("student_steps"), demo.pop("student_noise"), demo.pop("student_confusion")
    else:
        demo.pop("teacher_steps")
    return {"recipe": RECIPE_VERSION, "role": role, "model": dataclasses.asdict(spec),
            "task": dataclasses.asdict(cfg.data.synthetic), "demo": demo}


def cache_dir_for(cfg: RunConfig, role: str) -> Path:
    """``<cache_dir>/<role>-<first 12 hex of sha256(cache_key)>``."""
    blob = json.dumps(cache_key(cfg, role), sort_keys=True).encode()
    return Path(cfg.demo.cache_dir) / f"{role}-{hashlib.sha256(blob).hexdigest()[:12]}"


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``demo_meta.json`` of a prepared model directory, or None if it has none."""
    f = Path(model_dir) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else None


# ---------------------------------------------------------------- data
def splits(cfg: RunConfig) -> tuple[list[synthetic.Problem], list[synthetic.Problem]]:
    """Train and held-out eval problems of the configured task."""
    s = cfg.data.synthetic
    return synthetic.make_splits(s.num_train, s.num_eval, s.seed, min_steps=s.min_steps,
                                 max_steps=s.max_steps, modulus=s.modulus)


def sft_batches(problems: Sequence[synthetic.Problem], batch_size: int, seed: int, *,
                style: synthetic.Style, slip_prob: float, prompt_len: int,
                completion_len: int, confusion: float = 0.0) -> Iterator[dict[str, np.ndarray]]:
    """Endless supervised batches: random problems, a fresh solution each time (surface form
    drawn from ``style``; a slip with probability ``slip_prob``, else each ``-`` step written as
    ``+`` with probability ``confusion``: ``synthetic.noisy_solution``), ``supervised_arrays`` layout."""
    tok, rng = synthetic.SyntheticTokenizer(), np.random.default_rng(seed)
    while True:
        picked = [problems[i] for i in rng.integers(len(problems), size=batch_size)]
        sols = [synthetic.noisy_solution(p, rng, slip_prob, style, confusion)[0] for p in picked]
        yield synthetic.supervised_arrays(tok, [p.prompt for p in picked], sols,
                                          prompt_len, completion_len)


def prompt_arrays(prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids [N, length] int32 and mask [N, length] bool (bos first)."""
    tok = synthetic.SyntheticTokenizer()
    return pad_batch([tok.encode(p) for p in prompts], pad_id=tok.pad_id, length=length)


def complete(model: Qwen, prompts: Sequence[str], *, prompt_len: int, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 256,
             tokenizer: synthetic.SyntheticTokenizer = synthetic.SyntheticTokenizer()) -> list[str]:
    """The model's completion text per prompt (greedy at temperature 0), from
    ``eval.generation.generate_in_batches`` at ``prompt_len`` columns: batches of
    ``min(batch_size, len(prompts))`` rows (one compile), the batch starting at prompt
    ``start`` sampled with ``key(seed + start)``."""
    rows = [tokenizer.encode(p) for p in prompts]
    out: list[str] = []
    for batch in generate_in_batches(
        model, rows, batch_size=min(batch_size, len(prompts)),
        key_for=lambda start, index: jax.random.key(seed + start), max_new_tokens=max_new_tokens,
        eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id, temperature=temperature,
        length=prompt_len,
    ):
        out += [tokenizer.decode(t) for t in batch.tokens]
    return out


def accuracy(model: Qwen, problems: Sequence[synthetic.Problem], *, max_new_tokens: int,
             prompt_len: int, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 256) -> float:
    """Fraction of ``problems`` whose ``complete`` text passes the synthetic task's verifier
    (greedy when ``temperature`` is 0)."""
    texts = complete(model, [p.prompt for p in problems], prompt_len=prompt_len,
                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     batch_size=batch_size)
    return sum(SYNTHETIC.grade(t, p.answer) for t, p in zip(texts, problems)) / len(problems)


# ---------------------------------------------------------------- preparation
def _sft_optim(cfg: RunConfig) -> OptimConfig:
    # 5 % warm-up, then a constant lr (min_lr = lr), clipping against early spikes. The
    # tiny models learn the task in a late, sudden jump (copying operands from the prompt);
    # a cosine decay to lr/10 often stalled them before it (16 % vs 85 % teacher accuracy
    # after 1000 steps, same seed; BUILD_NOTES "Demo and benchmarks").
    return OptimConfig(lr=cfg.demo.lr, min_lr=cfg.demo.lr, warmup_fraction=0.05,
                       b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0)


def _train_role(cfg: RunConfig, role: str, progress: bool) -> tuple[Qwen, dict[str, Any]]:
    """Build and train the ``role`` model; returns (model, meta)."""
    s = cfg.data.synthetic
    train, evals = splits(cfg)
    teacher = role == "teacher"
    spec = cfg.teacher if teacher else cfg.student
    seed_offset = 0 if teacher else 1
    model = init_model(model_config(spec), seed=s.seed + seed_offset)
    batches = sft_batches(train, cfg.demo.batch_size, s.seed + 10 + seed_offset,
                          style=synthetic.TEACHER_STYLE if teacher else synthetic.STUDENT_STYLE,
                          slip_prob=0.0 if teacher else cfg.demo.student_noise,
                          confusion=0.0 if teacher else cfg.demo.student_confusion,
                          prompt_len=prompt_len(cfg), completion_len=completion_len(cfg))
    steps = cfg.demo.teacher_steps if teacher else cfg.demo.student_steps
    t0 = time.perf_counter()
    model, losses = train_sft(model, batches, steps=steps, optim=_sft_optim(cfg),
                              desc=f"demo {role}", progress=progress)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = accuracy(model, evals, max_new_tokens=completion_len(cfg), prompt_len=prompt_len(cfg))
    return model, {"role": role, "greedy_accuracy": acc, "num_eval": len(evals),
                   "steps": steps, "losses": losses, "train_seconds": round(train_s, 2),
                   "eval_seconds": round(time.perf_counter() - t0, 2),
                   "num_params": model.config.num_params(), "key": cache_key(cfg, role)}


def save_cached(model: Qwen, meta: dict[str, Any], out: Path) -> None:
    """Save ``model`` as an HF directory at ``out`` with ``meta`` in ``META_FILE``, the cache entry
    every demo reads back with ``read_meta``. Written into a temporary sibling and renamed, so a
    killed run never leaves a half-written directory that a later run would take for a finished
    one; a leftover without meta (interrupted by hand) is replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_hf(model, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def prepare_role(cfg: RunConfig, role: str, *, progress: bool = True,
                 log: Log = log_info) -> Path:
    """The cached HF directory of the ``role`` model, trained and saved first if missing."""
    out = cache_dir_for(cfg, role)
    if (meta := read_meta(out)) is not None:
        log(f"demo: reusing cached {role} {out} (greedy accuracy {meta['greedy_accuracy']:.1%})")
        return out
    log(f"demo: training the {role} ({cfg.demo.teacher_steps if role == 'teacher' else cfg.demo.student_steps}"
        f" supervised steps) -> {out}")
    model, meta = _train_role(cfg, role, progress)
    save_cached(model, meta, out)
    log(f"demo: {role} greedy accuracy {meta['greedy_accuracy']:.1%} on {meta['num_eval']} "
        f"held-out problems ({meta['train_seconds']:.0f} s training)")
    return out


def prepare_demo_models(cfg: RunConfig, *, progress: bool = True,
                        log: Log = log_info) -> tuple[str, str]:
    """``(student_dir, teacher_dir)``: HF directories of the demo's student and teacher.

    A spec that already names a ``path`` is used as it is; otherwise the model is trained
    (teacher: reference solutions; student: noisy ones) or taken from the cache.
    """
    if task_for(cfg.data.source) is not SYNTHETIC:
        raise ValueError(f"the demo models need data.source='synthetic', got {cfg.data.source!r}")
    dirs = {}
    for role in ("teacher", "student"):
        spec = cfg.teacher if role == "teacher" else cfg.student
        dirs[role] = spec.path if spec.path is not None else str(prepare_role(cfg, role, progress=progress, log=log))
    return dirs["student"], dirs["teacher"]


# ---------------------------------------------------------------- report
def final_detector_roc(cfg: RunConfig, student, *, student_dir: str | os.PathLike,
                       teacher_dir: str | os.PathLike, prompts: int, rollouts: int,
                       ks: Sequence[int]) -> dict[str, Any] | None:
    """``eval.detector_roc.detector_roc`` of the final ``student`` on the first ``prompts``
    held-out problems (``rollouts`` each, temperature 1): ``kl_window``, ``ot_embedding`` as the
    run configures it (table ``topd.ot_embedding``, ``topd.ot_solver``, ε, iterations, fresh
    continuation or the rollout's suffix) and ``margin_w1`` (``topd.margin_samples``), each at
    every K of ``ks``; candidates above ``topd.candidate_quantile`` of ℓ per rollout. Returns
    ``demo_report.compact_roc`` of it, or None when the task has no labeller or ``prompts`` is 0."""
    from topd_jax.data.tasks import run_task
    from topd_jax.demos.demo_report import compact_roc
    from topd_jax.eval.detector_roc import OtVariant, detector_roc
    from topd_jax.models import load_pretrained

    task = run_task(cfg)
    if task.labeller is None or prompts == 0:
        return None
    t = cfg.topd
    tables = {}
    if t.ot_embedding == "student_initial":
        tables["student_initial"] = load_pretrained(student_dir).embedding_table()
    variant = OtVariant("ot_embedding", t.ot_embedding, t.ot_solver, t.sinkhorn_epsilon,
                        "suffix" if t.reuse_student_suffix else "fresh", max_iters=t.sinkhorn_iters)
    problems = [p.prompt for p in splits(cfg)[1][:prompts]]
    ids, mask = prompt_arrays(problems, prompt_len(cfg))
    res = detector_roc(student, load_pretrained(teacher_dir), ids, mask, problems, task.labeller,
                       key=jax.random.key(cfg.seed), rollouts=rollouts, max_new_tokens=cfg.rollout.max_new_tokens,
                       ks=ks, ot_variants=[variant], margin_samples=t.margin_samples,
                       eos_id=task.labeller.eos_id, pad_id=synthetic.SyntheticTokenizer().pad_id,
                       candidate_quantile=t.candidate_quantile, false_alarm_quantile=t.false_alarm_quantile,
                       num_candidates=t.num_candidates, min_separation=t.min_separation, tables=tables)
    return compact_roc(res, prompts=len(problems), rollouts=rollouts)


def demo_report(cfg: RunConfig, result, *, student_dir: str | os.PathLike | None = None,
                teacher_dir: str | os.PathLike | None = None, log: Log = print,
                roc_prompts: int | None = None) -> dict[str, Any]:
    """Write ``demo_report.json``, ``demo_report.png`` and (with labels) ``demo_rollout.png`` to
    ``result.output_dir``, print the tables, and return the report dict.

    ``result`` is the trainer's ``TrainResult`` (``history``, ``evals``, ``output_dir``,
    ``final_step``, ``model``, ``extras``). Teacher accuracy and the student's accuracy when
    prepared come from the models' ``demo_meta.json`` (default directories: this config's cache
    entries). On a task with labels the report adds the detector ROC of the final student
    (``final_detector_roc`` on ``roc_prompts`` held-out problems, default
    ``demo_report.ROC_PROMPTS``; 0 skips it) and the rollout picture of
    ``result.extras["label_example"]``.
    """
    from topd_jax.demos import demo_report as dr

    teacher_dir = Path(teacher_dir) if teacher_dir else cache_dir_for(cfg, "teacher")
    student_dir = Path(student_dir) if student_dir else cache_dir_for(cfg, "student")
    times = [row["time_step"] for row in result.history if "time_step" in row]
    extra = {"steps": result.final_step, "output_dir": str(result.output_dir),
             "teacher_dir": str(teacher_dir), "student_dir": str(student_dir),
             "eval_temperature": cfg.eval.temperature,
             "eval_prompts": cfg.eval.num_prompts or cfg.data.synthetic.num_eval,
             "median_step_seconds": float(np.median(times)) if times else None}
    label = f"opd+{cfg.suppression}" if cfg.algorithm == "opd" and cfg.uses_detector else cfg.algorithm
    roc = final_detector_roc(cfg, result.model, student_dir=student_dir, teacher_dir=teacher_dir,
                             prompts=dr.ROC_PROMPTS if roc_prompts is None else roc_prompts,
                             rollouts=dr.ROC_ROLLOUTS, ks=dr.ROC_KS)
    report = dr.build_report(label, result.history, result.evals,
                             teacher_meta=read_meta(teacher_dir), student_meta=read_meta(student_dir),
                             false_alarm_rule=cfg.topd.false_alarm_rule if cfg.uses_detector else None,
                             false_alarm_quantile=cfg.topd.false_alarm_quantile,
                             ot_table=cfg.topd.ot_embedding if cfg.topd.detector == "ot_embedding" else None,
                             detector_roc=roc, label_example=result.extras.get("label_example"),
                             extra=extra)
    paths = dr.write_report(report, result.history, result.output_dir)
    log(dr.format_table(report))
    log("demo report: " + ", ".join(str(p) for p in paths.values()))
    return report
