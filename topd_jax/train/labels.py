"""Per-step label metrics (issue 13 §2): the run's high-loss candidates and its detector's verdicts
against the ground-truth token labels of the task (``Task.labeller``; synthetic and labelled).

    metrics, example = label_metrics(cfg, labeller, prompts, batch, student, frozen)

After ``prepare_batch`` the rollouts are labelled (rollout row ``b * n + j`` belongs to prompt
``b``) and compared, over the whole step, with what the prepared batch already holds: the
candidates (with a detector: those it classified, D defined), D (``divergence``), the false
alarms (``false_alarm``: the set the run's rule suppresses; the high-divergence set under
``topd.suppression=high_divergence``) and the guided points and ℓ_t of
``PreparedBatch.diagnostics``. Under plain OPD (no detector) ℓ_t is computed with the
algorithm's own ``topd.token_loss`` and the candidates with ``topd.candidate_slots`` (i.e.
``losses.candidates`` at the run's ``topd.candidate_*`` settings), so the true surface share of
high-loss tokens is measured under OPD too. SURFACE = labels SURFACE, fork = FORK ∪ RECOVERY.

Metrics (``(sum, count)`` pairs, means over the step; ``losses.detection.detector_label_metrics``):

====================================  ==========================================================
``label_true_surface_share``          |cand ∩ SURFACE| / |cand|: the measured share of high-loss
                                      tokens that are surface-form choices (paper: 29.23 %)
``label_fork_share``                  |cand ∩ fork| / |cand|
``label_loss_surface_share``          Σ_SURFACE ℓ / Σ ℓ over completion tokens
``label_rollout_accuracy``            rollouts whose answer is right (and parses)
``label_suppressed_share``            |FA| / |cand| (q under the quantile rule, by definition)
``label_false_alarm_precision``       |FA ∩ SURFACE| / |FA|
``label_false_alarm_recall``          |FA ∩ SURFACE| / |cand ∩ SURFACE|
``label_fork_suppressed``             |FA ∩ fork| / |cand ∩ fork|: real forks the rule suppresses
``label_auroc``                       AUROC of −D, SURFACE vs fork candidates (one value per step,
                                      logged as (AUROC, 1); (0, 0) when a class is empty)
``label_guided_fork_precision``       |guided ∩ fork| / |guided| (TOPD with guidance)
====================================  ==========================================================

The first four exist under every opd/topd run; the detector rows only with a detector (OPD +
suppression, TOPD), the last only with guidance. ``example`` is one rollout of the step, the
one that shows the most kinds of verdict (``example_row``): ``words``, ``labels`` (names),
``token_loss``, ``candidate``, ``false_alarm``, ``guided`` (lists over its completion tokens),
``correct`` and ``problem``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.algorithms import topd
from topd_jax.algorithms.prepared import PreparedBatch
from topd_jax.algorithms.scoring import forward_hidden
from topd_jax.config.schema import RunConfig
from topd_jax.data import labelled
from topd_jax.losses import auroc, detector_label_metrics
from topd_jax.sharding.hosts import fetch

Pair = tuple[float, float]
DETECTOR_KEYS = ("suppressed_share", "false_alarm_precision", "false_alarm_recall", "fork_suppressed")


def enabled(cfg: RunConfig, labeller: Callable | None) -> bool:
    """Whether a step computes label metrics: ``logging.label_metrics``, a task with a labeller,
    and a distillation algorithm with high-loss candidates (opd, topd)."""
    return cfg.logging.label_metrics and labeller is not None and cfg.algorithm in ("opd", "topd")


def rollout_problems(problems: Sequence[str], n: int) -> list[str]:
    """The problem of every rollout row: ``problems [B]`` -> ``[B * n]`` (row ``b * n + j``)."""
    return [p for p in problems for _ in range(n)]


@functools.partial(jax.jit, static_argnames=("detector",))
def _metric_sums(cand, false_alarm, divergence, surface, fork, token_loss, mask, guided, *, detector: bool):
    """``detector_label_metrics`` (+ ``auroc`` of −D with a detector), all ``[R, L]`` inputs."""
    out = detector_label_metrics(cand, false_alarm, surface, fork, token_loss=token_loss, mask=mask,
                                 guided=guided)
    if detector:
        cand = cand.astype(bool)
        out["auroc"] = auroc(-divergence, cand & surface, cand & fork)
    return out


def opd_candidates(cfg: RunConfig, student, arrays: dict, frozen) -> tuple[jax.Array, jax.Array]:
    """Plain OPD: ``(ℓ_t [R, L], candidates [R, L])`` as TOPD would take them (its ``token_loss``
    and ``candidate_slots`` at the run's ``topd.candidate_*`` settings)."""
    t_hidden = arrays.get("teacher_hidden")
    if t_hidden is None:  # sampled-token estimator: ℓ_t needs the teacher's hidden states
        t_hidden = forward_hidden(frozen.teacher, arrays["ids"], arrays["seq_mask"])
    loss = topd.token_loss(cfg, student, arrays, t_hidden, frozen.teacher_head)
    t = cfg.topd
    cand = topd.candidate_slots(loss, arrays["loss_mask"], mode=t.candidate_mode, num=t.num_candidates,
                                min_separation=t.min_separation, quantile=t.candidate_quantile,
                                rollback=t.rollback)[0]
    return loss, cand


def label_metrics(cfg: RunConfig, labeller: Callable, prompts: dict, batch: PreparedBatch, student,
                  frozen) -> tuple[dict[str, Pair], dict[str, Any]]:
    """``(metrics, example)`` of one step (module doc). ``student``: the params that sampled the
    rollouts (before the update); ``frozen``: ``algorithms.Frozen`` (teacher, ids, text)."""
    arrays = batch.arrays
    ids, mask = fetch(arrays["ids"]), fetch(arrays["loss_mask"]).astype(bool)
    problems = rollout_problems(prompts["problems"], cfg.rollout.n)
    diag = batch.diagnostics or {}
    if "labels" in diag:  # topd.detector=oracle already labelled these rollouts
        lab = {"labels": np.asarray(diag["labels"]), "correct": np.asarray(diag["correct"])}
    else:
        lab = labeller(problems, ids, mask)
    labels = lab["labels"]
    surface = labels == labelled.SURFACE
    fork = (labels == labelled.FORK) | (labels == labelled.RECOVERY)
    detector = cfg.uses_detector
    if detector:
        if "token_loss" not in diag:
            raise ValueError(f"label metrics with a detector need PreparedBatch.diagnostics['token_loss'], "
                             f"got {sorted(diag)}")
        loss, cand = fetch(diag["token_loss"]), fetch(arrays["candidates"]).astype(bool)
        false_alarm, divergence = fetch(arrays["false_alarm"]).astype(bool), fetch(arrays["divergence"])
        guided = fetch(diag["guided"]).astype(bool) if "guided" in diag else None
    else:
        loss, cand = (fetch(x) for x in opd_candidates(cfg, student, arrays, frozen))
        cand = cand.astype(bool)
        false_alarm, divergence, guided = np.zeros_like(cand), np.zeros(cand.shape, np.float32), None
    sums = jax.device_get(_metric_sums(cand, false_alarm, divergence, surface, fork, loss, mask, guided,
                                       detector=detector))
    out: dict[str, Pair] = {}
    for name, value in sums.items():
        if name == "auroc":
            a = float(value)
            out["label_auroc"] = (a, 1.0) if np.isfinite(a) else (0.0, 0.0)
        elif detector or name not in DETECTOR_KEYS:
            out[f"label_{name}"] = (float(value[0]), float(value[1]))
    out["label_rollout_accuracy"] = (float(lab["correct"].sum()), float(lab["correct"].size))
    example = rollout_example(ids, mask, labels, loss, cand, false_alarm, guided, lab["correct"], problems,
                              frozen.text.decode, frozen.eos_ids, surface | fork)
    return out, example


def example_row(cand, false_alarm, guided, labels, labelled_mask) -> int:
    """The rollout that shows the most kinds of verdict: ranked by (a false alarm among its
    candidates, a SURFACE candidate, a guided point, the number of labelled candidates); the
    first such row wins ties. Every array ``[R, L]``."""
    c = cand & labelled_mask
    has_guided = np.zeros(cand.shape[0], bool) if guided is None else guided.any(axis=1)
    key = np.stack([(c & false_alarm).any(axis=1), (cand & (labels == labelled.SURFACE)).any(axis=1),
                    has_guided, c.sum(axis=1)], axis=1).astype(np.int64)
    return min(range(len(key)), key=lambda r: (tuple(-key[r]), r))


def rollout_example(ids, mask, labels, loss, cand, false_alarm, guided, correct, problems, decode, eos_ids,
                    labelled_mask) -> dict[str, Any]:
    """One rollout as lists over its completion tokens (module doc); every array ``[R, L]``."""
    row = example_row(cand, false_alarm, guided, labels, labelled_mask)
    cols = np.flatnonzero(mask[row])
    guided_row = np.zeros(mask.shape[1], bool) if guided is None else guided[row]
    return {
        "words": [labelled.EOS if t in eos_ids else decode([t]) for t in ids[row, cols].tolist()],
        "labels": [labelled.LABEL_NAMES[x] for x in labels[row, cols].tolist()],
        "token_loss": [float(x) for x in np.asarray(loss, np.float32)[row, cols]],
        "candidate": [bool(x) for x in cand[row, cols]],
        "false_alarm": [bool(x) for x in false_alarm[row, cols]],
        "guided": [bool(x) for x in guided_row[cols]],
        "correct": bool(correct[row]),
        "problem": problems[row],
    }
