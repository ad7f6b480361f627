"""Models for the labelled task (``topd_jax.data.labelled``), built and cached, with the gates
of TOPD_REVIEW §4.3 measured into ``demo_meta.json``.

    student_dir, teacher_dir = prepare_labelled_models(cfg)

The recipe is the ``labelled`` config section (every field of it is in the cache key). The
teacher is trained on teacher-style solutions in which planted slips (``teacher_slip_rate``, 1 to
``teacher_max_slips`` per solution) are repaired by ``wait fix <line>`` (the slipped values are
not training targets), with the token after every result value (``wait`` or going on) weighted
``decision_weight`` in the loss. The slips are ``teacher_slip_kind``: ``unreduced`` (the result
without its ``mod p``, a value >= p the teacher can see is wrong) by default. With random wrong
residues the tiny teachers (3-5 layers, 800-2000 steps, decision weight 1-20) never learned to
compare the written value with the recomputed one: teacher-forced P(wait) was ~0.2-0.45 after
right and wrong values alike (slightly *higher* after right ones), recovery 0-36 %. The student
is trained on student-style solutions whose slips (random residues) are never repaired and whose
``+``/``*`` steps are written without their ``mod p`` with probability ``student_confusion`` (a
misconception: its accuracy plateaus well below the teacher's instead of reaching it once past
its warm-up jump; the teacher repairs exactly these). Sizes come from
``cfg.teacher``/``cfg.student``, with ``vocab_size`` raised to ``VOCAB_SIZE`` (the 130 words of
``LabelledTokenizer``).

The gates (recorded in ``demo_meta.json``; ``check_gates`` names the failing ones, callers
refuse ungated models with ``require_gates``): the teacher's greedy accuracy, its recovery rate
on planted slips (greedy from a prefix that ends in a wrong value: ``wait`` follows and the
completion ends correct), its spurious-``wait`` rate on its own greedy solutions; the student's
greedy accuracy (inside ``student_accuracy_range``, and on a plateau: its accuracy curve, measured
every ``curve_every`` steps, moved by at most ``plateau_tolerance`` over the last interval) and
its recovery rate (≈ 0).
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
from topd_jax.config.schema import OptimConfig, RunConfig
from topd_jax.demos.sft import train_sft

RECIPE_VERSION = 2
VOCAB_SIZE = 144
META_FILE = demo.META_FILE
TOK = labelled.LabelledTokenizer()


def completion_len(cfg: RunConfig) -> int:
    """Solution columns: 7 words for the first step, up to 10 (3-word connective) per later step,
    a repair (9) per planted slip (``labelled.teacher_max_slips``, at least one), ``; answer N``
    and eos."""
    repairs = min(max(cfg.labelled.teacher_max_slips, 1), cfg.data.synthetic.max_steps)
    return 7 + 10 * (cfg.data.synthetic.max_steps - 1) + 9 * repairs + 3 + 1


def decision_weights(solutions: Sequence[str], shape: tuple[int, int], prompt_len: int,
                     weight: float) -> np.ndarray:
    """Per-target loss weights ``[B, T]`` float32 (``supervised_arrays`` layout, aligned with
    ``loss_mask``): ``weight`` at the token right after every result value (``V`` of
    ``var = X op Y = V``: the column where ``wait`` repairs a wrong value), 1 elsewhere."""
    w = np.ones(shape, np.float32)
    for r, sol in enumerate(solutions):
        words = sol.split()
        cols = [prompt_len + j + 1 for j in range(3, len(words))
                if words[j - 1] == "=" and words[j - 3] in ("+", "-", "*")]
        w[r, cols] = weight
    return w


def batches(problems: Sequence[Problem], role: str, batch_size: int, seed: int, *, prompt_len: int,
            completion_len: int, teacher_slip_rate: float, teacher_max_slips: int,
            teacher_slip_kind: str, student_slip_rate: float, student_confusion: float,
            decision_weight: float) -> Iterator[dict[str, np.ndarray]]:
    """Endless supervised batches of the ``role``'s solutions (``supervised_arrays`` layout plus
    ``weights [B, T]``: ``decision_weights`` for the teacher, ones for the student)."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    rng = np.random.default_rng(seed)
    while True:
        picked = [problems[i] for i in rng.integers(len(problems), size=batch_size)]
        if role == "teacher":
            sols = [labelled.teacher_solution(p, rng, slip_rate=teacher_slip_rate,
                                              max_slips=teacher_max_slips,
                                              slip_kind=teacher_slip_kind) for p in picked]
        else:
            sols = [labelled.student_solution(p, rng, slip_rate=student_slip_rate,
                                              confusion=student_confusion) for p in picked]
        texts = [s for s, _ in sols]
        out = labelled.supervised_arrays_masked(TOK, [p.prompt for p in picked], texts,
                                                [m for _, m in sols], prompt_len, completion_len)
        out["weights"] = decision_weights(texts, out["input_ids"].shape, prompt_len,
                                          decision_weight if role == "teacher" else 1.0)
        yield out


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


def greedy_accuracy(model: Qwen, problems: Sequence[Problem], *, prompt_len: int,
                    completion_len: int) -> float:
    """Share of ``problems`` whose greedy completion ends in the right answer (label parser)."""
    outs = _greedy_words(model, [p.prompt for p in problems], completion_len, prompt_len)
    return float(np.mean([labelled.label_words(p, w).correct for p, w in zip(problems, outs)]))


def recovery_rate(model: Qwen, problems: Sequence[Problem], *, prompt_len: int, completion_len: int,
                  slip_kind: str, seed: int = 0) -> float:
    """Share of ``problems`` where, greedy from a prefix that ends in a planted wrong result
    (``slip_kind``, teacher style, a random step), ``wait`` follows and the completion ends
    correct. The prefix is encoded as one longer left-padded prompt (positions are
    ``cumsum(mask) - 1``, so the model sees what it saw in training)."""
    rng = np.random.default_rng(seed)
    prefixes, prefix_words = [], []
    for p in problems:
        words, trainable = labelled.render_words(p, rng, labelled.TEACHER_STYLE, slip_kind=slip_kind,
                                                 slip_step=int(rng.integers(len(p.steps))), recover=True)
        cut = trainable.index(False) + 1  # up to and including the wrong value
        prefixes.append(p.prompt + " " + " ".join(words[:cut]))
        prefix_words.append(words[:cut])
    conts = _greedy_words(model, prefixes, completion_len, prompt_len + completion_len)
    recovered = []
    for p, pre, cont in zip(problems, prefix_words, conts):
        lab = labelled.label_words(p, pre + cont)
        recovered.append(bool(cont) and cont[0] == "wait" and lab.correct)
    return float(np.mean(recovered))


def gates(model: Qwen, problems: Sequence[Problem], *, prompt_len: int, completion_len: int,
          slip_kind: str = "unreduced", seed: int = 0) -> dict[str, float]:
    """Greedy accuracy, spurious-``wait`` and ungrammatical rates from the prompts; the recovery
    rate on planted ``slip_kind`` slips (the gate) and on random-residue slips
    (``recovery_rate_random``, recorded: the harder kind, which needs the recomputed value)."""
    outs = _greedy_words(model, [p.prompt for p in problems], completion_len, prompt_len)
    labs = [labelled.label_words(p, w) for p, w in zip(problems, outs)]
    kw = dict(prompt_len=prompt_len, completion_len=completion_len, seed=seed)
    out = {"greedy_accuracy": float(np.mean([lab.correct for lab in labs])),
           "spurious_wait_rate": float(np.mean([lab.spurious.any() for lab in labs])),
           "recovery_rate": recovery_rate(model, problems, slip_kind=slip_kind, **kw),
           "ungrammatical_rate": float(np.mean([lab.ungrammatical.any() for lab in labs]))}
    if slip_kind != "random":
        out["recovery_rate_random"] = recovery_rate(model, problems, slip_kind="random", **kw)
    return out


_TEACHER_FIELDS = ("teacher_steps", "teacher_lr", "teacher_slip_rate", "teacher_max_slips",
                   "teacher_slip_kind", "decision_weight", "batch_size")
_STUDENT_FIELDS = ("student_steps", "student_lr", "student_slip_rate", "student_confusion",
                   "batch_size")


def cache_key(cfg: RunConfig, role: str) -> dict[str, Any]:
    """The config fields that determine the prepared ``role`` model: its sizes, the task and
    the ``labelled`` recipe fields of that role (gate thresholds and ``curve_every`` change no
    weights and are not in it)."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    spec = cfg.teacher if role == "teacher" else cfg.student
    fields = _TEACHER_FIELDS if role == "teacher" else _STUDENT_FIELDS
    section = dataclasses.asdict(cfg.labelled)
    recipe = {f: section[f] for f in fields}
    return {"recipe": RECIPE_VERSION, "role": role, "model": dataclasses.asdict(spec),
            "task": dataclasses.asdict(cfg.data.synthetic), "labelled": recipe}


def cache_dir_for(cfg: RunConfig, role: str) -> Path:
    """``<demo.cache_dir>/labelled-<role>-<first 12 hex of sha256(cache_key)>``."""
    blob = json.dumps(cache_key(cfg, role), sort_keys=True).encode()
    return Path(cfg.demo.cache_dir) / f"labelled-{role}-{hashlib.sha256(blob).hexdigest()[:12]}"


def check_gates(cfg: RunConfig, teacher_meta: dict[str, Any] | None,
                student_meta: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The failing gates of a teacher/student pair, as ``{"gate", "value", "target"}`` rows
    (empty: all pass). ``*_meta``: the models' ``demo_meta.json`` (``read_meta``); a missing
    meta or measurement fails its gates with value None. Thresholds: ``cfg.labelled``."""
    lc = cfg.labelled
    t = (teacher_meta or {}).get("gates", {})
    s = (student_meta or {}).get("gates", {})
    curve = [acc for _, acc in (student_meta or {}).get("curve", [])]
    lo, hi = lc.student_accuracy_range
    plateau = abs(curve[-1] - curve[-2]) if len(curve) >= 2 else None
    rows = [("teacher_greedy_accuracy", t.get("greedy_accuracy"), f">= {lc.min_teacher_accuracy}",
             lambda v: v >= lc.min_teacher_accuracy),
            ("teacher_recovery_rate", t.get("recovery_rate"), f">= {lc.min_teacher_recovery}",
             lambda v: v >= lc.min_teacher_recovery),
            ("teacher_spurious_wait_rate", t.get("spurious_wait_rate"), f"<= {lc.max_teacher_spurious}",
             lambda v: v <= lc.max_teacher_spurious),
            ("student_greedy_accuracy", s.get("greedy_accuracy"), f"in [{lo}, {hi}]",
             lambda v: lo <= v <= hi),
            ("student_recovery_rate", s.get("recovery_rate"), f"<= {lc.max_student_recovery}",
             lambda v: v <= lc.max_student_recovery),
            ("student_plateau", plateau, f"<= {lc.plateau_tolerance} (|last - previous| of the "
             f"accuracy curve)", lambda v: v <= lc.plateau_tolerance)]
    return [{"gate": name, "value": value, "target": target} for name, value, target, ok in rows
            if value is None or not ok(value)]


def require_gates(cfg: RunConfig, teacher_dir: str | Path, student_dir: str | Path) -> None:
    """Raise ValueError naming every failing gate (value and target) of the pair of model
    directories; return None when all pass."""
    failed = check_gates(cfg, demo.read_meta(teacher_dir), demo.read_meta(student_dir))
    if failed:
        raise ValueError(f"labelled models {teacher_dir} / {student_dir} fail their gates: " + "; ".join(
            f"{f['gate']}={f['value']} (target {f['target']})" for f in failed))


def prepare_role(cfg: RunConfig, role: str, *, progress: bool = True, log=print) -> Path:
    """The cached HF directory of the labelled-task ``role`` model (trained and gated if missing)."""
    out = cache_dir_for(cfg, role)
    if (meta := demo.read_meta(out)) is not None:
        log(f"labelled: reusing {role} {out}: {meta['gates']}")
        return out
    lc, s = cfg.labelled, cfg.data.synthetic
    teacher = role == "teacher"
    spec = dataclasses.replace(cfg.teacher if teacher else cfg.student, vocab_size=VOCAB_SIZE)
    train, evals = demo.splits(cfg)
    offset = 0 if teacher else 1
    model = init_model(demo.model_config(spec), seed=s.seed + offset)
    p_len, c_len = demo.prompt_len(cfg), completion_len(cfg)
    steps = lc.teacher_steps if teacher else lc.student_steps
    lr = lc.teacher_lr if teacher else lc.student_lr
    optim = OptimConfig(lr=lr, min_lr=lr, warmup_fraction=0.05, b1=0.9, b2=0.98,
                        weight_decay=0.0, clip_norm=1.0)  # as demo._sft_optim
    curve: list[tuple[int, float]] = []

    def measure(step: int, m: Qwen) -> None:
        curve.append((step, greedy_accuracy(m, evals, prompt_len=p_len, completion_len=c_len)))
        log(f"labelled: {role} step {step}: greedy accuracy {curve[-1][1]:.1%}")

    data = batches(train, role, lc.batch_size, s.seed + 20 + offset, prompt_len=p_len,
                   completion_len=c_len, teacher_slip_rate=lc.teacher_slip_rate,
                   teacher_max_slips=lc.teacher_max_slips,
                   teacher_slip_kind=lc.teacher_slip_kind, student_slip_rate=lc.student_slip_rate,
                   student_confusion=lc.student_confusion, decision_weight=lc.decision_weight)
    t0 = time.perf_counter()
    model, losses = train_sft(model, data, steps=steps, optim=optim, desc=f"labelled {role}",
                              progress=progress, hook=measure, hook_every=lc.curve_every)
    train_s = time.perf_counter() - t0  # includes the curve's evaluations
    t0 = time.perf_counter()
    g = gates(model, evals, prompt_len=p_len, completion_len=c_len, slip_kind=lc.teacher_slip_kind)
    if not curve or curve[-1][0] != steps:
        curve.append((steps, g["greedy_accuracy"]))
    meta = {"role": role, "steps": steps, "losses": losses, "train_seconds": round(train_s, 2),
            "gate_seconds": round(time.perf_counter() - t0, 2), "gates": g, "curve": curve,
            "num_eval": len(evals), "num_params": model.config.num_params(),
            "key": cache_key(cfg, role), "greedy_accuracy": g["greedy_accuracy"]}
    demo.save_cached(model, meta, out)
    log(f"labelled: {role} {out} after {train_s:.0f} s: {g}")
    return out


def prepare_labelled_models(cfg: RunConfig, *, progress: bool = True, log=print) -> tuple[str, str]:
    """``(student_dir, teacher_dir)`` of the labelled task (recipe: ``cfg.labelled``); a spec that
    names a ``path`` is used as it is. The gates are recorded, not enforced: ``check_gates`` /
    ``require_gates`` for callers that must refuse ungated models."""
    dirs = {}
    for role in ("teacher", "student"):
        spec = cfg.teacher if role == "teacher" else cfg.student
        dirs[role] = spec.path if spec.path is not None else str(prepare_role(cfg, role, progress=progress, log=log))
    t_meta, s_meta = demo.read_meta(dirs["teacher"]), demo.read_meta(dirs["student"])
    if t_meta is not None and s_meta is not None and (failed := check_gates(cfg, t_meta, s_meta)):
        log("labelled: gates FAIL: " + "; ".join(f"{f['gate']}={f['value']} (target {f['target']})"
                                              for f in failed))
    return dirs["student"], dirs["teacher"]
