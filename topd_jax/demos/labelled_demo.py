"""Models for the labelled task (``topd_jax.data.labelled``), built and cached, with the gates
of TOPD_REVIEW §4.3 measured into ``demo_meta.json``.

    student_dir, teacher_dir = prepare_labelled_models(cfg)

The teacher is trained on teacher-style solutions in which a planted slip is repaired by
``wait fix <line>`` (the slipped value is not a training target); the student on student-style
solutions whose slips are never repaired. Sizes come from ``cfg.teacher``/``cfg.student`` (the
demo's), with ``vocab_size`` raised to ``VOCAB_SIZE`` (the 130 words of ``LabelledTokenizer``).
The gates (not enforced here, recorded): the teacher's greedy accuracy, its recovery rate on
planted slips (greedy from a prefix that ends in a wrong value: ``wait`` follows and the
completion ends correct), its spurious-``wait`` rate on its own greedy solutions, and the
student's greedy accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from topd_jax.data import labelled
from topd_jax.data.synthetic import Problem
from topd_jax.models import Qwen, init_model
from topd_jax.eval.generation import generate_in_batches
from topd_jax.demos import demo
from topd_jax.config.schema import RunConfig
from topd_jax.demos.sft import train_sft

RECIPE_VERSION = 1
VOCAB_SIZE = 144
META_FILE = demo.META_FILE
TOK = labelled.LabelledTokenizer()


def completion_len(cfg: RunConfig) -> int:
    """Solution columns: 7 words for the first step, up to 10 (3-word connective) per later step,
    one repair (9), ``; answer N`` and eos."""
    return 7 + 10 * (cfg.data.synthetic.max_steps - 1) + 9 + 3 + 1


def batches(problems: Sequence[Problem], role: str, batch_size: int, seed: int, *, prompt_len: int,
            completion_len: int, teacher_slip_rate: float = 0.3,
            student_slip_rate: float = 0.5) -> Iterator[dict[str, np.ndarray]]:
    """Endless supervised batches of the ``role``'s solutions (``supervised_arrays`` layout)."""
    rng = np.random.default_rng(seed)
    while True:
        picked = [problems[i] for i in rng.integers(len(problems), size=batch_size)]
        if role == "teacher":
            sols = [labelled.teacher_solution(p, rng, slip_rate=teacher_slip_rate) for p in picked]
        else:
            sols = [labelled.student_solution(p, rng, slip_rate=student_slip_rate) for p in picked]
        yield labelled.supervised_arrays_masked(TOK, [p.prompt for p in picked], [s for s, _ in sols],
                                                [m for _, m in sols], prompt_len, completion_len)


def _greedy_words(model: Qwen, texts: Sequence[str], max_new_tokens: int, length: int) -> list[list[str]]:
    """Greedy completions (words, ``<eos>`` kept) of ``texts`` (prompt + prefix) at ``length``
    prompt columns, through the one generation loop (``eval.generation.generate_in_batches``)."""
    vocab, out = TOK.vocab, []
    for batch in generate_in_batches(model, [TOK.encode(t) for t in texts], batch_size=len(texts),
                                     key_for=lambda start, index: jax.random.key(0),
                                     max_new_tokens=max_new_tokens, eos_ids=(TOK.eos_id,), pad_id=TOK.pad_id,
                                     length=length):
        out += [[labelled.EOS if t == TOK.eos_id else (vocab[t] if t < len(vocab) else "<unk>")
                 for t in np.asarray(row)[:n]] for row, n in zip(batch.tokens, batch.lengths)]
    return out


def gates(model: Qwen, problems: Sequence[Problem], *, prompt_len: int, completion_len: int,
          seed: int = 0) -> dict[str, float]:
    """Greedy accuracy and spurious-``wait`` rate from the prompts; recovery rate from prefixes
    that end in a planted wrong result (teacher style, a random step)."""
    rng = np.random.default_rng(seed)
    outs = _greedy_words(model, [p.prompt for p in problems], completion_len, prompt_len)
    labs = [labelled.label_words(p, w) for p, w in zip(problems, outs)]
    prefixes, prefix_words = [], []
    for p in problems:
        words, trainable = labelled.render_words(p, rng, labelled.TEACHER_STYLE,
                                                 slip_step=int(rng.integers(len(p.steps))), recover=True)
        cut = trainable.index(False) + 1  # up to and including the wrong value
        prefixes.append(p.prompt + " " + " ".join(words[:cut]))
        prefix_words.append(words[:cut])
    conts = _greedy_words(model, prefixes, completion_len, prompt_len + completion_len)
    recovered = []
    for p, pre, cont in zip(problems, prefix_words, conts):
        lab = labelled.label_words(p, pre + cont)
        recovered.append(bool(cont) and cont[0] == "wait" and lab.correct)
    return {"greedy_accuracy": float(np.mean([lab.correct for lab in labs])),
            "spurious_wait_rate": float(np.mean([lab.spurious.any() for lab in labs])),
            "recovery_rate": float(np.mean(recovered)),
            "ungrammatical_rate": float(np.mean([lab.ungrammatical.any() for lab in labs]))}


def cache_key(cfg: RunConfig, role: str, steps: int) -> dict[str, Any]:
    spec = cfg.teacher if role == "teacher" else cfg.student
    return {"recipe": RECIPE_VERSION, "role": role, "model": dataclasses.asdict(spec), "steps": steps,
            "task": dataclasses.asdict(cfg.data.synthetic), "lr": cfg.demo.lr, "batch": cfg.demo.batch_size}


def prepare_role(cfg: RunConfig, role: str, steps: int, *, progress: bool = True, log=print) -> Path:
    """The cached HF directory of the labelled-task ``role`` model (trained and gated if missing)."""
    blob = json.dumps(cache_key(cfg, role, steps), sort_keys=True).encode()
    out = Path(cfg.demo.cache_dir) / f"labelled-{role}-{hashlib.sha256(blob).hexdigest()[:12]}"
    if (meta := demo.read_meta(out)) is not None:
        log(f"labelled: reusing {role} {out}: {meta['gates']}")
        return out
    spec = dataclasses.replace(cfg.teacher if role == "teacher" else cfg.student, vocab_size=VOCAB_SIZE)
    s = cfg.data.synthetic
    train, evals = demo.splits(cfg)
    offset = 0 if role == "teacher" else 1
    model = init_model(demo.model_config(spec), seed=s.seed + offset)
    p_len, c_len = demo.prompt_len(cfg), completion_len(cfg)
    t0 = time.perf_counter()
    model, losses = train_sft(model, batches(train, role, cfg.demo.batch_size, s.seed + 20 + offset,
                                             prompt_len=p_len, completion_len=c_len),
                              steps=steps, optim=demo._sft_optim(cfg), desc=f"labelled {role}", progress=progress)
    train_s = time.perf_counter() - t0
    meta = {"role": role, "steps": steps, "losses": losses, "train_seconds": round(train_s, 2),
            "gates": gates(model, evals, prompt_len=p_len, completion_len=c_len),
            "num_eval": len(evals), "key": cache_key(cfg, role, steps)}
    meta["greedy_accuracy"] = meta["gates"]["greedy_accuracy"]
    demo.save_cached(model, meta, out)
    log(f"labelled: {role} {out} after {train_s:.0f} s: {meta['gates']}")
    return out


def prepare_labelled_models(cfg: RunConfig, *, teacher_steps: int | None = None, student_steps: int | None = None,
                            progress: bool = True, log=print) -> tuple[str, str]:
    """``(student_dir, teacher_dir)`` of the labelled task (default steps: the demo's)."""
    t = prepare_role(cfg, "teacher", teacher_steps or cfg.demo.teacher_steps, progress=progress, log=log)
    s = prepare_role(cfg, "student", student_steps or cfg.demo.student_steps, progress=progress, log=log)
    return str(s), str(t)
