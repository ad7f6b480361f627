"""TOPD (TOPD.md §2-4): high-loss candidates, a near-future detector, suppression of false
alarms, and multi-token guidance at divergent states. Also OPD + suppression (guidance off)
and the high-divergence ablation, by config.

One step, after the OPD rollouts and teacher scoring (opd.py):
1. ℓ_t (no gradient) -> C candidate slots per rollout (``[R, C]`` positions + valid mask;
   fixed shapes, so everything compiles once);
2. D_t per slot: ``kl_window`` (no generation), ``ot_embedding`` (K-token continuations of
   teacher and student from c_t = (x, y_<t), embedded with the student's table, entropic
   OT), ``margin_w1`` (N continuations per side, margins of log p_T - log p_θ, W1) or
   ``oracle`` (the task's ground-truth labels, ``oracle_detection``: the upper bound of a
   perfect detector);
3. over the whole batch: false alarms (``losses.false_alarms``; the step's ``losses.topd_loss``
   turns them into suppression weights) and guided points (most divergent first);
4. guidance rows c_t + a (teacher continuation) with the teacher's hidden states at the K
   predicting positions, for ``L_traj`` in the step (its first ``topd.guidance_window``
   tokens: ``guidance_tokens``).

With ``topd.fused_main_pass`` ℓ_t comes from the OPD term's own forward pass (``jax.vjp``); the
batch carries ℓ_t and the gradient pulled back through its residuals (``PrecomputedGrad``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from topd_jax.algorithms import opd
from topd_jax.algorithms.objective import LossSpec, main_term_cotangent
from topd_jax.algorithms.opd import Frozen, Pair, timed
from topd_jax.algorithms.prepared import PrecomputedGrad, PreparedBatch
from topd_jax.algorithms.scoring import forward_hidden, hidden_states, score_tokens, token_divergences
from topd_jax.data import labelled
from topd_jax.data.tasks import run_task
from topd_jax.losses import (
    false_alarms,
    margin_w1,
    near_future_count,
    near_future_window,
    ot_distance,
    select_candidates,
    select_candidates_quantile,
    teacher_null_false_alarms,
)
from topd_jax.rollout import GenerationResult, continue_from
from topd_jax.rollout.engine import left_align
from topd_jax.sharding.hosts import fetch
from topd_jax.config.schema import RunConfig


# ---- ℓ_t and candidates ---------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0, static_argnames=("kind", "beta", "temperature", "chunk"))
def _token_loss_jit(graphdef, params, ids, seq_mask, loss_mask, teacher_hidden, teacher_head, **kw):
    model = nnx.merge(graphdef, params)
    return token_divergences(hidden_states(model, ids, seq_mask), model.lm_head_weight(), teacher_hidden,
                             teacher_head, loss_mask, **kw)


# Positions per chunk of the no-gradient ℓ_t pass when ``loss.vocab_chunk`` is None. Without a
# gradient chunking costs no recompute, and on CPU (W2, [8, 165, 151936]) 16 positions took
# 2.65 s against 4.05 s for whole logits, same values to the bit (cache-sized working set).
DETECTOR_CHUNK = 16


def main_pass_vjp(cfg: RunConfig, graphdef, params, rows: dict, teacher_hidden, teacher_head):
    """``(ℓ [R, L], vjp_fn)``: ℓ_t from the OPD term's own forward pass (the update's: same
    chunking, ``loss.vocab_chunk``), its residuals kept so that ``vjp_fn(∂L/∂ℓ)`` gives the
    OPD gradient without a second forward (``topd.fused_main_pass``; ``--plan`` compiles it)."""
    kw = dict(kind=cfg.loss.divergence, beta=cfg.loss.jsd_beta, temperature=cfg.loss.kd_temperature,
              chunk=cfg.loss.vocab_chunk)
    return jax.vjp(lambda p: _token_loss_jit(graphdef, p, rows["ids"], rows["seq_mask"], rows["loss_mask"],
                                             teacher_hidden, teacher_head, **kw), params)


def token_loss_with_vjp(cfg: RunConfig, student, rows: dict, teacher_hidden, teacher_head):
    """``main_pass_vjp`` of the student model."""
    graphdef, params = nnx.split(student)
    return main_pass_vjp(cfg, graphdef, params, rows, teacher_hidden, teacher_head)


@functools.partial(jax.jit, static_argnums=0)
def _cotangent_jit(spec: LossSpec, token_loss, batch):
    return main_term_cotangent(spec, token_loss, batch)


def token_loss(cfg: RunConfig, student, rows: dict, teacher_hidden, teacher_head) -> jax.Array:
    """ℓ_t ``[R, L]`` token-indexed, no gradient: the configured per-token divergence."""
    graphdef, params = nnx.split(student)
    chunk = cfg.loss.vocab_chunk if cfg.loss.vocab_chunk is not None else DETECTOR_CHUNK
    return _token_loss_jit(graphdef, params, rows["ids"], rows["seq_mask"], rows["loss_mask"], teacher_hidden,
                           teacher_head, kind=cfg.loss.divergence, beta=cfg.loss.jsd_beta,
                           temperature=cfg.loss.kd_temperature, chunk=chunk)


def quantile_slot_count(length: int, quantile: float) -> int:
    """The most positions of a ``length``-token row strictly above its ``quantile`` (linear
    interpolation over n <= length valid values: at most n - 1 - floor(q (n - 1))), at least 1."""
    return max(length - 1 - math.floor(quantile * (length - 1)), 1)


@functools.partial(jax.jit, static_argnames=("mode", "num", "min_separation", "quantile", "rollback"))
def candidate_slots(loss, loss_mask, *, mode: str, num: int, min_separation: int, quantile: float,
                    rollback: int):
    """High-loss candidates as fixed slots.

    loss, loss_mask ``[R, L]`` -> ``cand [R, L]`` bool, ``pos [R, C]`` token columns (highest
    loss first), ``valid [R, C]``, ``branch_at [R, C]`` = the branch column (``pos - rollback
    + 1``, at least the first completion column). Invalid slots point at the first completion
    column so that every slot is a legal branch point; their results are masked.
    ``top_c`` mode: C = ``num`` slots. ``quantile`` mode: every position above the row's
    q-quantile (TOPD.md §2; ``num`` is ignored), C = ``quantile_slot_count(L, q)`` slots.
    """
    valid_tok = loss_mask.astype(bool)
    if mode == "top_c":
        cand = select_candidates(loss, valid_tok, num=num, min_separation=max(min_separation, 1))
    else:
        cand = select_candidates_quantile(loss, valid_tok, quantile=quantile)
        num = quantile_slot_count(loss.shape[1], quantile)
    _, pos = lax.top_k(jnp.where(cand, loss, -jnp.inf), num)
    valid = jnp.take_along_axis(cand, pos, axis=1)
    first = jnp.argmax(valid_tok, axis=1)[:, None]  # [R, 1] first completion column
    pos = jnp.where(valid, pos, first).astype(jnp.int32)
    branch_at = jnp.maximum(pos - (rollback - 1), first).astype(jnp.int32)
    return cand, pos, valid, branch_at


def scatter_slots(values: jax.Array, pos: jax.Array, valid: jax.Array, length: int) -> jax.Array:
    """``[R, C]`` slot values -> token-indexed ``[R, L]`` (0 off the valid slots)."""
    rows = jnp.arange(pos.shape[0])[:, None]
    return jnp.zeros((pos.shape[0], length), jnp.float32).at[rows, pos].add(jnp.where(valid, values, 0.0))


# ---- detectors -------------------------------------------------------------------------------
def suffix_windows(ids: jax.Array, loss_mask: jax.Array, start: jax.Array, k: int):
    """The rollout's own tokens ``y_t .. y_{t+K-1}`` from each ``start [R, C]``:
    ``tokens, mask [R * C, K]`` (mask: completion tokens inside the row)."""
    length = ids.shape[1]
    cols = start[..., None] + jnp.arange(k)  # [R, C, K]
    inside = cols < length
    cols = jnp.minimum(cols, length - 1)
    rows = jnp.arange(ids.shape[0])[:, None, None]
    tokens, mask = ids[rows, cols], loss_mask.astype(bool)[rows, cols] & inside
    return tokens.reshape(-1, k), mask.reshape(-1, k)


def pad_windows_with_eos(tokens: jax.Array, mask: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """``topd.ot_window_end=pad_eos``: every window ``[..., K]`` becomes K tokens, the ended
    part filled with ``eos_id``; a window that stopped early then differs from a full one by
    its eos tokens (with uniform mass over the valid tokens instead, one mismatch in a short
    window weighs more than in a long one: TOPD_REVIEW D12)."""
    return jnp.where(mask.astype(bool), tokens, eos_id), jnp.ones(mask.shape, bool)


@functools.partial(jax.jit, static_argnames=("epsilon", "iters", "solver", "pad_eos"))
def _ot_jit(embed, t_tokens, t_mask, s_tokens, s_mask, *, epsilon, iters, solver="sinkhorn", pad_eos=None):
    """D per window pair and the Sinkhorn marginal error, both ``[rows]``."""
    if pad_eos is not None:
        (t_tokens, t_mask), (s_tokens, s_mask) = (pad_windows_with_eos(t_tokens, t_mask, pad_eos),
                                                  pad_windows_with_eos(s_tokens, s_mask, pad_eos))
    # The cost normalises the embeddings itself (1 - cosine); float32 for Sinkhorn.
    x, y = embed[t_tokens].astype(jnp.float32), embed[s_tokens].astype(jnp.float32)
    return ot_distance(x, y, t_mask, s_mask, epsilon=epsilon, max_iters=iters, solver=solver, with_error=True)


def frozen_ot_table(cfg: RunConfig, student, teacher) -> jax.Array | None:
    """The OT embedding table ``[V, d]`` of ``topd.ot_embedding``: a copy of the initial
    student's (call before training starts) or the teacher's; None for ``student`` (the
    current student's table, read at every step)."""
    source = cfg.topd.ot_embedding
    if source == "student":
        return None
    table = student.embedding_table() if source == "student_initial" else teacher.embedding_table()
    return jnp.array(table, copy=True)


def _continuations(cfg, model, rows, branch_at, key, frozen, per_slot: int, cache=None) -> GenerationResult:
    """``per_slot`` K-token continuations from every slot: rows ``(r * C + c) * per_slot + j``.
    ``cache``: a KV cache already holding ``rows`` (the student's rollout cache): no prefill."""
    bt = np.repeat(fetch(branch_at), per_slot, axis=1)  # fetch: the rows may span several hosts
    return continue_from(model, rows["ids"], rows["seq_mask"], bt, key=key, num_tokens=cfg.topd.window,
                         temperature=cfg.topd.continuation_temperature, eos_ids=frozen.eos_ids,
                         pad_id=frozen.pad_id, cache=cache)


def _margins(student, teacher, cont: GenerationResult, shape) -> tuple[jax.Array, jax.Array]:
    """Per continuation: mean over its tokens of log p_T - log p_θ, and whether it has tokens."""
    t_lp = score_tokens(teacher, cont.sequences, cont.sequence_mask, cont.completion_mask)
    s_lp = score_tokens(student, cont.sequences, cont.sequence_mask, cont.completion_mask)
    count = cont.completion_mask.sum(axis=1)
    margin = (t_lp - s_lp).sum(axis=1) / jnp.maximum(count, 1)
    return margin.reshape(shape), (count > 0).reshape(shape)


def needs_student_continuations(cfg: RunConfig) -> bool:
    """Whether ``detect`` samples student continuations (then the rollout keeps its KV cache)."""
    t = cfg.topd
    return t.detector == "margin_w1" or (t.detector == "ot_embedding" and not t.reuse_student_suffix)


class Detection(NamedTuple):
    """What ``detect`` measured, per slot ``[R, C]``."""
    d: jax.Array                 # D_t (0 where undefined)
    conts: Any                   # (teacher continuations, per_slot) or None
    defined: jax.Array           # bool: D_t is defined (kl_window: t+1..t+K holds a token)
    null: jax.Array | None       # D(teacher, teacher') (topd.false_alarm_rule=teacher_null)
    ot_error: jax.Array | None   # [rows] Sinkhorn marginal L1 error of every OT solve


def detect(cfg: RunConfig, student, rows, loss, slots, key, frozen: Frozen, timings,
           student_cache=None) -> Detection:
    """D per slot ``[R, C]``, where it is defined, and the teacher continuations if any.
    ``student_cache``: the rollout's KV cache (``generate(..., return_cache=True)``), so the
    student's continuations skip re-prefilling the rollouts."""
    _, pos, valid, branch_at = slots
    t = cfg.topd
    r, c = pos.shape
    if t.detector == "kl_window":
        d_tok = near_future_window(loss, rows["loss_mask"], t.window)
        # An empty window (the last completion token) has no D: excluded, not "D = 0" (D6).
        defined = jnp.take_along_axis(near_future_count(rows["loss_mask"], t.window), pos, axis=1) > 0
        return Detection(jnp.take_along_axis(d_tok, pos, axis=1), None, defined, None, None)
    k_t, k_s = jax.random.split(key)
    if t.detector == "ot_embedding":
        n = t.continuations_per_side
        t_cont = timed(timings, "sampling", _continuations, cfg, frozen.teacher, rows, branch_at, k_t, frozen, n)
        if t.reuse_student_suffix:
            s_tok, s_mask = suffix_windows(rows["ids"], rows["loss_mask"], branch_at, t.window)
            s_tok, s_mask = jnp.repeat(s_tok, n, axis=0), jnp.repeat(s_mask, n, axis=0)
        else:
            s_cont = timed(timings, "sampling", _continuations, cfg, student, rows, branch_at, k_s, frozen, n,
                           student_cache)
            s_tok, s_mask = s_cont.tokens, s_cont.mask
        table = frozen.ot_table if frozen.ot_table is not None else student.embedding_table()
        ot = functools.partial(_ot_jit, table, epsilon=t.sinkhorn_epsilon, iters=t.sinkhorn_iters,
                               solver=t.ot_solver, pad_eos=frozen.eos_ids[0] if t.ot_window_end == "pad_eos" else None)
        d, err = timed(timings, "scoring", ot, t_cont.tokens, t_cont.mask, s_tok, s_mask)
        defined = (t_cont.mask.any(axis=1) & s_mask.any(axis=1)).reshape(r, c, n).all(axis=2)
        null = None
        if t.false_alarm_rule == "teacher_null":  # teacher j against teacher j + 1 of the same slot
            nxt = (jnp.arange(r * c * n) // n) * n + (jnp.arange(r * c * n) + 1) % n
            d_null, err_null = timed(timings, "scoring", ot, t_cont.tokens, t_cont.mask, t_cont.tokens[nxt],
                                     t_cont.mask[nxt])
            null, err = d_null.reshape(r, c, n).mean(axis=2), jnp.concatenate([err, err_null])
        return Detection(d.reshape(r, c, n).mean(axis=2), (t_cont, n), defined, null, err)
    n = t.margin_samples  # margin_w1
    t_cont = timed(timings, "sampling", _continuations, cfg, frozen.teacher, rows, branch_at, k_t, frozen, n)
    s_cont = timed(timings, "sampling", _continuations, cfg, student, rows, branch_at, k_s, frozen, n, student_cache)
    m_t, ok_t = timed(timings, "scoring", _margins, student, frozen.teacher, t_cont, (r, c, n))
    m_s, ok_s = timed(timings, "scoring", _margins, student, frozen.teacher, s_cont, (r, c, n))
    defined = ok_t.any(axis=2) & ok_s.any(axis=2)
    return Detection(margin_w1(m_t, m_s, ok_t, ok_s), (t_cont, n), defined, None, None)


# ---- oracle ----------------------------------------------------------------------------------
ORACLE_FORK, ORACLE_OTHER, ORACLE_SURFACE = 1.0, 0.5, 0.0  # D of the oracle per label kind


def oracle_labels(cfg: RunConfig, prompts: dict, rows: dict) -> dict[str, np.ndarray]:
    """The task labeller's output for the rollouts ``rows`` (``labels [R, L]``: ``labelled.SURFACE``,
    ``FORK``, ...; ``correct [R]``; ...); rollout row ``b * n + j`` belongs to prompt b.
    Raises ValueError when the task has none (``topd.detector=oracle`` needs one)."""
    task = run_task(cfg)
    if task.labeller is None:
        raise ValueError(f"topd.detector=oracle needs ground-truth labels, but the task of "
                         f"data.source={cfg.data.source!r} ({task.name}) has no labeller; use "
                         f"data.source=synthetic or labelled, or another topd.detector")
    problems = [p for p in prompts["problems"] for _ in range(cfg.rollout.n)]
    return task.labeller(problems, fetch(rows["ids"]), fetch(rows["loss_mask"]))


def oracle_detection(labels, pos: jax.Array, valid: jax.Array) -> Detection:
    """``topd.detector=oracle``: D per slot ``[R, C]`` from the labels ``[R, L]`` instead of a
    detector: ``ORACLE_FORK`` (1) at FORK/RECOVERY, ``ORACLE_SURFACE`` (0) at SURFACE,
    ``ORACLE_OTHER`` (0.5) elsewhere; defined at every valid slot. ``classify(...,
    oracle=True)`` then marks exactly the SURFACE candidates as false alarms and guides only
    FORK/RECOVERY ones (the guidance snippet still comes from the teacher at that point)."""
    lab = jnp.take_along_axis(jnp.asarray(labels, jnp.int32), pos, axis=1)
    fork = (lab == labelled.FORK) | (lab == labelled.RECOVERY)
    d = jnp.where(fork, ORACLE_FORK, jnp.where(lab == labelled.SURFACE, ORACLE_SURFACE, ORACLE_OTHER))
    return Detection(d.astype(jnp.float32), None, valid.astype(bool), None, None)


# ---- guidance --------------------------------------------------------------------------------
def guidance_tokens(cfg: RunConfig) -> int:
    """Tokens of a guidance row that L_traj reads: ``topd.guidance_window`` (None: the whole
    K-token window, ``topd.window``)."""
    t = cfg.topd
    return t.window if t.guidance_window is None else t.guidance_window


def guided_slots(cand, false_alarm, d_tok, d_slot, valid, pos, *, max_per_row: int | None):
    """Up to m = min(max_per_row, C) guided slots per rollout among the candidates that are not
    false alarms (``[R, L]`` bool each), most divergent first: ``idx [R, m]`` slot indices and
    ``g_valid [R, m]``."""
    c = pos.shape[1]
    m = c if max_per_row is None else min(max_per_row, c)
    divergent = cand & ~false_alarm
    guided_tok = divergent if max_per_row is None else select_candidates(d_tok, divergent, num=max_per_row,
                                                                         min_separation=1)
    g = jnp.take_along_axis(guided_tok, pos, axis=1) & valid  # [R, C]
    _, idx = lax.top_k(jnp.where(g, d_slot, -jnp.inf), m)
    return idx, jnp.take_along_axis(g, idx, axis=1)


def _take_rows(cont: GenerationResult, rows: jax.Array) -> dict:
    return {"g_ids": cont.sequences[rows], "g_mask": cont.sequence_mask[rows], "g_targets": cont.tokens[rows],
            "g_window": cont.mask[rows]}


def student_suffix_rows(rows: dict, start: jax.Array, k: int, pad_id: int) -> dict:
    """Guidance rows built from the rollout itself: c_t then ``y_t .. y_{t+K-1}`` (layout of
    ``continue_from``: left-aligned prefix in L columns, then K columns)."""
    ids, seq_mask = rows["ids"], rows["seq_mask"].astype(bool)
    m = start.shape[1]
    cols = jnp.arange(ids.shape[1])
    prefix = (seq_mask[:, None, :] & (cols < start[..., None])).reshape(-1, ids.shape[1])
    p_ids, p_mask = left_align(jnp.repeat(ids, m, axis=0), prefix)
    s_tok, s_mask = suffix_windows(ids, rows["loss_mask"], start, k)
    return {"g_ids": jnp.concatenate([jnp.where(p_mask, p_ids, pad_id), jnp.where(s_mask, s_tok, pad_id)], 1),
            "g_mask": jnp.concatenate([p_mask, s_mask], 1), "g_targets": s_tok, "g_window": s_mask}


def guidance_batch(cfg: RunConfig, rows, slots, idx, g_valid, conts, key, frozen: Frozen, timings) -> dict:
    """The ``g_*`` arrays of the step (see ``algorithms.objective``)."""
    _, pos, _, branch_at = slots
    r, c = pos.shape
    m = idx.shape[1]
    start = jnp.take_along_axis(branch_at, idx, axis=1)  # [R, m]
    t = cfg.topd
    if t.guidance_target == "student_positions":
        g = student_suffix_rows(rows, start, t.window, frozen.pad_id)
    elif conts is not None:  # reuse the detector's first teacher continuation of the slot
        cont, n = conts
        g = _take_rows(cont, ((jnp.arange(r)[:, None] * c + idx) * n).reshape(-1))
    else:
        cont = timed(timings, "sampling", continue_from, frozen.teacher, rows["ids"], rows["seq_mask"],
                     fetch(start), key=key, num_tokens=t.window, temperature=t.continuation_temperature,
                     eos_ids=frozen.eos_ids, pad_id=frozen.pad_id)
        g = _take_rows(cont, jnp.arange(r * m))
    # topd.guidance_window: only the first guidance_tokens of the K columns are targets.
    g["g_window"] = g["g_window"] & g_valid.reshape(-1, 1) & (jnp.arange(t.window) < guidance_tokens(cfg))
    length = rows["ids"].shape[1]
    hidden = timed(timings, "scoring", forward_hidden, frozen.teacher, g["g_ids"], g["g_mask"])
    g["g_teacher_hidden"] = hidden[:, length - 1:length - 1 + t.window]
    return g


# ---- the whole preparation ------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("quantile", "regime", "suppress", "guidance", "max_per_row",
                                             "oracle"))
def classify(cand, pos, valid, d_slot, loss, loss_mask, defined, null_slot, *, quantile: float, regime: str,
             suppress: bool, guidance: bool, max_per_row: int | None, oracle: bool = False):
    """Over the whole batch (before any micro-batching, as in the paper): D token-indexed, the
    false alarms of the suppressed regime, guided slots and the detector metrics' sums, in one
    compiled call. Candidates whose D is not ``defined`` (``[R, C]``) are left out: never
    suppressed, never guided, counted in ``sums["undefined"]``. ``null_slot`` ``[R, C]`` (or
    None): the teacher-null rule, a false alarm when D <= D(teacher, teacher'); else the
    batch-quantile rule. ``oracle``: ``d_slot`` is ``oracle_detection``'s; the false alarms are the
    candidates with D = 0 (SURFACE), the high-divergence regime suppresses those with D = 1
    (FORK/RECOVERY), and only D = 1 candidates are guided.

    Returns ``(candidates [R, L] (those classified), divergence [R, L], false_alarm [R, L],
    idx [R, m] | None, g_valid [R, m] | None, sums)``.
    """
    length = loss.shape[1]
    classified = valid & defined
    d_slot = jnp.where(classified, d_slot, 0.0)
    d_tok = scatter_slots(d_slot, pos, classified, length)
    cand = cand & (scatter_slots(jnp.ones(pos.shape), pos, classified, length) > 0)  # D defined
    unguided = None  # candidates guidance skips besides the false alarms
    if oracle:
        low = cand & (d_tok <= ORACLE_SURFACE)
        suppressed = low if regime == "low_divergence" else cand & (d_tok >= ORACLE_FORK)
        unguided = cand & (d_tok < ORACLE_FORK)
    elif null_slot is not None:
        low = teacher_null_false_alarms(cand, d_tok, scatter_slots(null_slot, pos, classified, length))
        suppressed = low  # teacher_null with regime high_divergence: a config error
    else:
        suppressed = false_alarms(cand, d_tok, quantile=quantile, regime=regime)
        low = false_alarms(cand, d_tok, quantile=quantile, regime="low_divergence")
    m = loss_mask.astype(jnp.float32)
    sums = {"loss": jnp.sum(loss * m), "tokens": jnp.sum(m), "cand": jnp.sum(valid), "classified": jnp.sum(cand),
            "undefined": jnp.sum(valid & ~defined), "low": jnp.sum(low),
            "suppressed": jnp.sum(suppressed) if suppress else jnp.float32(0.0), "div": jnp.sum(d_slot)}
    idx = g_valid = None
    if guidance:
        idx, g_valid = guided_slots(cand, low if unguided is None else low | unguided, d_tok, d_slot, valid, pos,
                                    max_per_row=max_per_row)
        sums["guided"] = jnp.sum(g_valid)
    return cand, d_tok, suppressed, idx, g_valid, sums


def guided_mask(pos: jax.Array, idx: jax.Array, g_valid: jax.Array, length: int) -> jax.Array:
    """The guided candidate positions ``[R, L]`` bool from ``guided_slots``' ``idx, g_valid [R, m]``
    and the slots' ``pos [R, C]`` (logging: ``PreparedBatch.diagnostics``)."""
    at = jnp.take_along_axis(pos, idx, axis=1)
    return scatter_slots(jnp.ones(at.shape, jnp.float32), at, g_valid, length) > 0


def prepare(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
            timings: dict[str, float]) -> tuple[PreparedBatch, dict[str, Pair], GenerationResult]:
    """OPD's batch plus the detector's classification and (TOPD) guidance rows; see the module doc."""
    # Paired RNG (TOPD_REVIEW D9): the rollouts use the step key itself, as in opd.prepare, so
    # OPD and TOPD arms with the same seed draw the same step-0 rollouts; detector and guidance
    # keys are folded off it.
    k_roll, k_det, k_guide = key, jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    # The student branches from its own rollout cache (no second prefill of the rollouts).
    keep_cache = needs_student_continuations(cfg)
    batch, metrics, gen = opd.prepare(cfg, student, prompts, k_roll, frozen, timings, return_cache=keep_cache)
    t_hidden = batch.get("teacher_hidden")
    if t_hidden is None:  # sampled-token estimator: ℓ_t still needs the teacher's hidden states
        t_hidden = timed(timings, "scoring", forward_hidden, frozen.teacher, batch["ids"], batch["seq_mask"])
    t = cfg.topd
    if cfg.fuses_main_pass:
        loss, vjp_fn = timed(timings, "scoring", token_loss_with_vjp, cfg, student, batch, t_hidden,
                             frozen.teacher_head)
    else:
        loss = timed(timings, "scoring", token_loss, cfg, student, batch, t_hidden, frozen.teacher_head)
    del t_hidden
    slots = candidate_slots(loss, batch["loss_mask"], mode=t.candidate_mode, num=t.num_candidates,
                            min_separation=t.min_separation, quantile=t.candidate_quantile, rollback=t.rollback)
    cand, pos, valid, _ = slots
    truth = None
    if t.detector == "oracle":  # the labels instead of a detector (no continuations)
        truth = oracle_labels(cfg, prompts, batch)
        det = oracle_detection(truth["labels"], pos, valid)
    else:
        det = detect(cfg, student, batch, loss, slots, k_det, frozen, timings, gen.cache)
    conts = det.conts
    gen = gen.replace(cache=None)  # not part of what prepare returns (memory)
    mode = cfg.suppression
    del batch["weights"]  # the step's topd_loss weighs the tokens from the classification
    batch["candidates"], batch["divergence"], batch["false_alarm"], idx, g_valid, sums = classify(
        cand, pos, valid, det.d, loss, batch["loss_mask"], det.defined, det.null, quantile=t.false_alarm_quantile,
        regime="high_divergence" if mode == "high_divergence" else "low_divergence", suppress=mode != "none",
        guidance=cfg.uses_guidance, max_per_row=t.max_guided_points, oracle=t.detector == "oracle")
    precomputed = None
    if cfg.fuses_main_pass:  # ∂L/∂ℓ pulled back through the kept residuals (no second forward)
        spec = LossSpec.from_config(cfg, batch["ids"].shape[1])
        ct = _cotangent_jit(spec, loss, {k: batch[k] for k in ("loss_mask", "candidates", "divergence",
                                                                "false_alarm")})
        (grads,) = timed(timings, "scoring", vjp_fn, ct)
        del vjp_fn  # frees the residuals
        del batch["teacher_hidden"]  # the step reads ℓ_t instead
        batch["token_loss"] = loss
        precomputed = PrecomputedGrad(grads, through=("token_loss",))
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    rows_n = pos.shape[0]
    metrics.update({
        "detector_token_loss": (sums["loss"], sums["tokens"]),
        "candidates_per_rollout": (sums["cand"], rows_n),
        # quantile rule: q of the classified candidates by definition (not a measurement); teacher_null: measured
        "false_alarm_fraction": (sums["low"], sums["classified"]),
        "suppressed_fraction": (sums["suppressed"], sums["classified"]),
        "divergence": (sums["div"], sums["classified"]),  # mean D_t over candidates with a defined D
        "undefined_divergence_fraction": (sums["undefined"], sums["cand"]),  # empty windows (D6)
    })
    if det.ot_error is not None and t.ot_solver != "exact":
        err = np.asarray(fetch(det.ot_error))
        metrics["ot_marginal_error"] = (float(err.sum()), float(err.size))  # Sinkhorn row-marginal L1
    if t.detector == "ot_embedding":
        metrics["local_ot"] = metrics["divergence"]
    if cfg.uses_guidance:
        batch.update(guidance_batch(cfg, batch, slots, idx, g_valid, conts, k_guide, frozen, timings))
        metrics["guided_points_per_rollout"] = (sums["guided"], rows_n)
    diagnostics = {"token_loss": loss}  # for the trainer's label metrics (train.labels), not the step
    if truth is not None:  # the oracle's labels: the label metrics do not parse the rollouts again
        diagnostics["labels"], diagnostics["correct"] = truth["labels"], truth["correct"]
    if cfg.uses_guidance:
        diagnostics["guided"] = guided_mask(pos, idx, g_valid, loss.shape[1])
    return PreparedBatch(batch, precomputed, diagnostics), metrics, gen
