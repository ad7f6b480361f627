"""Scoring near-future detectors against ground-truth token labels (TOPD_REVIEW §4.11).

    res = detector_roc(student, teacher, prompt_ids, prompt_mask, problems, labeller,
                       key=key, rollouts=4, max_new_tokens=28, ks=(4, 8),
                       ot_variants=[OtVariant("ot_embedding", "teacher", "sinkhorn", 0.05, "fresh")],
                       margin_samples=4, eos_id=tok.eos_id, pad_id=tok.pad_id)
    res["header"]["true_surface_share_candidates"], res["detectors"]["kl_window K=4"]["auroc_surf_vs_fork_rec"]

No training. ``student`` samples ``rollouts`` solutions per prompt; the teacher scores them
(ℓ_t, full-vocabulary reverse KL, token-indexed); the candidates are every position above the
rollout's ``candidate_quantile`` of ℓ (no cap); ``labeller`` gives every completion token a
ground-truth label (``topd_jax.data.labelled``: the task's ``Task.labeller``). Then, for each
detector × K, D_t at every candidate and (``evaluate``):

* the AUROC of −D for SURFACE vs FORK ∪ RECOVERY candidates (1: every surface candidate ranks
  below every fork; 0.5: no separation), and separately vs FORK and vs RECOVERY;
* the quantile rule's false alarms (D ≤ the batch's ``false_alarm_quantile``): precision (share
  of them that are SURFACE) and recall (share of SURFACE candidates caught); their share of
  candidates is q by definition;
* for the OT detectors, the teacher-null rule D(teacher, student) ≤ D(teacher, teacher′): its
  measured false-alarm share, precision and recall;
* the guided points' precision (TOPD's most divergent non-false-alarm candidate per rollout
  that lands on FORK or RECOVERY);
* candidates whose window is empty (D undefined) are excluded and counted.

Detectors: ``kl_window`` (mean ℓ over t+1..t+K of the rollout itself), one ``ot_embedding`` per
``OtVariant`` (embedding table, solver, ε, fresh student continuation or the rollout's own
suffix), ``margin_w1`` with N continuations per side. Continuations are sampled once at the
largest K and truncated for the smaller ones. ``bench/detector_roc.py`` is the command-line
front end; the demo report (``topd_jax.demos.demo_report``) calls it on the final student with
a small sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.algorithms.scoring import forward_hidden, score_tokens
from topd_jax.algorithms.topd import suffix_windows
from topd_jax.data.labelled import FORK, LABEL_NAMES, RECOVERY, SURFACE
from topd_jax.losses import (auroc, margin_w1, masked_quantile, near_future_count, near_future_window,
                             ot_distance, select_candidates, select_candidates_quantile, token_divergence)
from topd_jax.rollout import continue_from, generate

Labeller = Callable[[Sequence[str], np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class OtVariant:
    """One ``ot_embedding`` detector: ``name`` (row label), ``table`` (a key of the embedding
    tables: ``"student"``, ``"teacher"`` or one the caller adds), ``solver`` (``ot_distance``'s),
    ``epsilon``, ``future`` (``"fresh"``: a new student continuation from c_t; ``"suffix"``: the
    rollout's own y_t..y_{t+K-1})."""

    name: str
    table: str
    solver: Literal["sinkhorn", "sinkhorn_divergence", "exact"]
    epsilon: float
    future: Literal["fresh", "suffix"]
    max_iters: int = 2000


# ---------------------------------------------------------------- pieces
@jax.jit
def token_kl(s_hidden, s_head, t_hidden, t_head, loss_mask):
    """ℓ_t token-indexed ``[R, L]``: KL(p_s ‖ p_t) of the distributions predicting token t
    (column 0 is 0). Hidden ``[R, L, d]``, heads ``[d, V]``, ``loss_mask [R, L]``."""
    ls = jnp.einsum("btd,dv->btv", s_hidden, s_head)
    lt = jnp.einsum("btd,dv->btv", t_hidden, t_head)
    ell = token_divergence(ls[:, :-1], lt[:, :-1], loss_mask[:, 1:])
    return jnp.concatenate([jnp.zeros_like(ell[:, :1]), ell], axis=1)


def slots_of(cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``[R, L]`` bool -> ``pos [R, C]`` (C = the most in a row, at least 1) and
    ``valid [R, C]``; unused slots repeat the row's first candidate (or column 1)."""
    c = max(int(cand.sum(1).max()), 1) if cand.size else 1
    pos, valid = np.zeros((cand.shape[0], c), np.int32), np.zeros((cand.shape[0], c), bool)
    for r in range(cand.shape[0]):
        cols = np.flatnonzero(cand[r])
        pos[r, :len(cols)], valid[r, :len(cols)] = cols, True
        pos[r, len(cols):] = cols[0] if len(cols) else 1
    return pos, valid


def continuations(model, sequences, sequence_mask, pos, n, k, key, eos_id, pad_id, chunk=2048):
    """``n`` K-token continuations from every slot of ``pos [R, C]`` (rows ``(r*C + c)*n + j``),
    in row chunks: ``(tokens, mask) [R*C*n, K]`` and ``(sequences, sequence_mask,
    completion_mask) [R*C*n, L + K]``."""
    bt = np.repeat(pos, n, axis=1)  # branch at the candidate: y_t is regenerated
    seqs, smask = np.asarray(sequences), np.asarray(sequence_mask)
    per = max(chunk // bt.shape[1], 1)
    toks, masks, full, full_mask, comp = [], [], [], [], []
    for start in range(0, bt.shape[0], per):
        res = continue_from(model, seqs[start:start + per], smask[start:start + per], bt[start:start + per],
                            key=jax.random.fold_in(key, start), num_tokens=k, temperature=1.0,
                            eos_ids=(eos_id,), pad_id=pad_id)
        toks.append(np.asarray(res.tokens)), masks.append(np.asarray(res.mask))
        full.append(np.asarray(res.sequences)), full_mask.append(np.asarray(res.sequence_mask))
        comp.append(np.asarray(res.completion_mask))
    cat = np.concatenate
    return cat(toks), cat(masks), cat(full), cat(full_mask), cat(comp)


def suffix(ids, loss_mask, pos, k):
    """The rollout's own ``y_t .. y_{t+K-1}`` per slot of ``pos [R, C]``: ``[R*C, K]`` tokens
    and mask (False past the row's end or outside ``loss_mask``), as NumPy: the trainer's
    ``algorithms.topd.suffix_windows``."""
    tokens, mask = suffix_windows(jnp.asarray(ids), jnp.asarray(loss_mask), jnp.asarray(pos), k)
    return np.asarray(tokens), np.asarray(mask)


def roc_points(scores, pos, neg, num=21):
    """(FPR, TPR) at ``num`` thresholds over the pooled scores (higher score = positive)."""
    s = np.concatenate([scores[pos], scores[neg]])
    out = []
    for thr in np.quantile(s, np.linspace(0, 1, num)) if len(s) else []:
        out.append((float((scores[neg] >= thr).mean()) if neg.any() else math.nan,
                    float((scores[pos] >= thr).mean()) if pos.any() else math.nan))
    return out


def guided_precision(d: np.ndarray, eligible: np.ndarray, lab: np.ndarray, slots_per_row: int) -> float:
    """TOPD's guided point per rollout: the most divergent candidate that is not a false alarm;
    the share of them at FORK or RECOVERY positions (NaN if none is guided). Arrays ``[R*C]``."""
    d2, ok = d.reshape(-1, slots_per_row), eligible.reshape(-1, slots_per_row)
    best = np.argmax(np.where(ok, d2, -np.inf), axis=1)
    guided = ok.any(1)
    picked = lab.reshape(-1, slots_per_row)[np.arange(len(best)), best][guided]
    return float(np.isin(picked, (FORK, RECOVERY)).mean()) if guided.any() else math.nan


def evaluate(d: np.ndarray, valid: np.ndarray, defined: np.ndarray, lab: np.ndarray, null: np.ndarray | None,
             q: float, slots_per_row: int) -> dict[str, Any]:
    """One detector's row: AUROCs, the quantile rule, the teacher-null rule. Arrays ``[S]``
    over the candidate slots (``valid``: a real candidate; ``lab``: its label); ``defined``
    (within ``valid``) excludes empty windows, which are counted as ``undefined``."""
    surf, fork, rec = (lab == SURFACE) & defined, (lab == FORK) & defined, (lab == RECOVERY) & defined
    score = -d
    row = {"auroc_surf_vs_fork_rec": float(auroc(score, surf, fork | rec)),
           "auroc_surf_vs_fork": float(auroc(score, surf, fork)),
           "auroc_surf_vs_rec": float(auroc(score, surf, rec)),
           "undefined": int((valid & ~defined).sum()), "classified": int(defined.sum())}
    thr = float(masked_quantile(d, defined, q, axis=None)) if defined.any() else math.inf
    fa = defined & (d <= thr)
    row.update(quantile_share=fa.sum() / max(defined.sum(), 1),
               quantile_precision=(fa & (lab == SURFACE)).sum() / max(fa.sum(), 1),
               quantile_recall=(fa & surf).sum() / max(surf.sum(), 1))
    row["guided_fork_precision"] = guided_precision(d, defined & ~fa, lab, slots_per_row)
    if null is not None:
        fa = defined & (d <= null)
        row.update(null_share=fa.sum() / max(defined.sum(), 1),
                   null_precision=(fa & (lab == SURFACE)).sum() / max(fa.sum(), 1),
                   null_recall=(fa & surf).sum() / max(surf.sum(), 1),
                   null_guided_fork_precision=guided_precision(d, defined & ~fa, lab, slots_per_row))
    row["roc"] = roc_points(score, surf, fork | rec)
    return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in row.items()}


def _ot_fn(solver: str, epsilon: float, max_iters: int):
    return jax.jit(lambda a, b, am, bm: ot_distance(a, b, am, bm, epsilon=epsilon, solver=solver,
                                                    max_iters=max_iters))


# ---------------------------------------------------------------- the whole measurement
def detector_roc(student, teacher, prompt_ids: np.ndarray, prompt_mask: np.ndarray, problems: Sequence[str],
                 labeller: Labeller, *, key: jax.Array, rollouts: int, max_new_tokens: int, ks: Sequence[int],
                 ot_variants: Sequence[OtVariant], margin_samples: int | None, eos_id: int, pad_id: int,
                 candidate_quantile: float = 0.8, false_alarm_quantile: float = 0.3,
                 num_candidates: int = 2, min_separation: int = 4,
                 tables: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Score every detector × K against the labels of ``student``'s own rollouts.

    Args:
      student, teacher: ``topd_jax.models.Qwen`` sharing a tokenizer.
      prompt_ids, prompt_mask: ``[P, Lp]`` prompts (any padding side).
      problems: ``[P]`` the prompts' untemplated texts (what ``labeller`` parses).
      labeller: ``(problems [R], ids [R, L], completion_mask [R, L]) -> {"labels": [R, L], "correct":
        [R], "ungrammatical": [R, L], ...}`` (``Task.labeller``).
      key: PRNG key (rollouts, teacher and student continuations are split from it).
      rollouts: samples per prompt (R = P * rollouts rows, temperature 1).
      ks: window lengths K.
      ot_variants: the ``ot_embedding`` rows (may be empty).
      margin_samples: N of ``margin_w1`` (None: no margin_w1 rows).
      candidate_quantile: candidates are the positions above this quantile of ℓ per rollout.
      false_alarm_quantile: q of the quantile false-alarm rule.
      num_candidates, min_separation: TOPD's top-C selection, for the header's label shares.
      tables: extra embedding tables ``[V, d]`` by name, next to ``"student"`` and ``"teacher"``
        (the models' own), e.g. ``{"student_initial": ...}``.

    Returns:
      ``{"header": {...}, "detectors": {"<name> K=<k>": row}, "wall_s": float}``; each row is
      ``evaluate``'s dict plus ``"detector"`` (the name) and ``"K"``.
    """
    t0 = time.perf_counter()
    ks = sorted(int(k) for k in ks)
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive window lengths, got {list(ks)}")
    if len(problems) != prompt_ids.shape[0]:
        raise ValueError(f"problems has {len(problems)} texts, prompt_ids {prompt_ids.shape} rows")
    k_roll, k_t, k_s = jax.random.split(key, 3)

    # 1. rollouts, ℓ_t, labels, candidates
    gen = generate(student, prompt_ids, prompt_mask, key=k_roll, max_new_tokens=max_new_tokens,
                   temperature=1.0, eos_ids=(eos_id,), num_samples=rollouts, pad_id=pad_id)
    seqs, smask, cmask = (np.asarray(a) for a in (gen.sequences, gen.sequence_mask, gen.completion_mask))
    cmask = cmask.astype(bool)
    row_problems = [p for p in problems for _ in range(rollouts)]  # row b*n + j <- prompt b
    hs, ht = forward_hidden(student, seqs, smask), forward_hidden(teacher, seqs, smask)
    ell = np.asarray(token_kl(hs, student.lm_head_weight(), ht, teacher.lm_head_weight(), jnp.asarray(cmask)))
    lab_all = labeller(row_problems, seqs, cmask)
    labels = np.asarray(lab_all["labels"])
    cand = np.asarray(select_candidates_quantile(ell, cmask, quantile=candidate_quantile)).astype(bool)
    pos, valid = slots_of(cand)
    R, C = pos.shape
    lab_slot = np.take_along_axis(labels, pos, 1).reshape(-1)
    valid_f = valid.reshape(-1)

    def share(mask_tok, kind):
        return float(((labels == kind) & mask_tok).sum() / max(mask_tok.sum(), 1))

    names = LABEL_NAMES
    composition = {n: share(cand, i) for i, n in enumerate(names)}
    top_c = np.asarray(select_candidates(ell, cmask, num=num_candidates, min_separation=min_separation)).astype(bool)
    header = {
        "rows": R, "tokens": int(cmask.sum()), "candidates": int(cand.sum()),
        "candidate_quantile": candidate_quantile, "false_alarm_quantile": false_alarm_quantile,
        "student_sampled_accuracy": float(np.mean(lab_all["correct"])),
        "ungrammatical_rows": int(np.asarray(lab_all["ungrammatical"]).any(1).sum()),
        "label_share_all_tokens": {n: share(cmask, i) for i, n in enumerate(names)},
        "label_share_candidates": composition,
        "true_surface_share_candidates": composition["surface"],
        "top_c": {"num": num_candidates, "min_separation": min_separation,
                  "label_share": {n: share(top_c, i) for i, n in enumerate(names)}},
        "loss_surface_share": float(ell[(labels == SURFACE) & cmask].sum() / max(ell[cmask].sum(), 1e-9)),
        "mean_loss_by_label": {n: float(ell[(labels == i) & cmask].mean()) if ((labels == i) & cmask).any()
                               else None for i, n in enumerate(names)},
    }

    # 2. continuations at the largest K: teacher x max(2, N), student x max(1, N)
    kmax = ks[-1]
    fresh = any(v.future == "fresh" for v in ot_variants)
    n_side = max(2, margin_samples or 1)
    n_student = max(1, margin_samples or 0) if (fresh or margin_samples) else 0
    need_teacher = bool(ot_variants) or bool(margin_samples)
    if need_teacher:
        t_tok, t_m, t_full, t_fmask, t_comp = continuations(teacher, seqs, smask, pos, n_side, kmax, k_t,
                                                            eos_id, pad_id)
    if n_student:
        s_tok, s_m, s_full, s_fmask, s_comp = continuations(student, seqs, smask, pos, n_student, kmax, k_s,
                                                            eos_id, pad_id)
    margins = {}
    if margin_samples:  # per-token margins log p_T - log p_S of every continuation token
        for side, (full, fmask, comp) in {"t": (t_full, t_fmask, t_comp), "s": (s_full, s_fmask, s_comp)}.items():
            lp_t = np.asarray(score_tokens(teacher, full, fmask, comp))
            lp_s = np.asarray(score_tokens(student, full, fmask, comp))
            margins[side] = (lp_t - lp_s)[:, -kmax:]  # the continuation's K columns
    if need_teacher:
        t_tok, t_m = t_tok.reshape(R * C, n_side, kmax), t_m.reshape(R * C, n_side, kmax).astype(bool)
    if n_student:
        s_tok, s_m = s_tok.reshape(R * C, n_student, kmax), s_m.reshape(R * C, n_student, kmax).astype(bool)
    all_tables = {"student": np.asarray(student.embedding_table(), np.float32),
                  "teacher": np.asarray(teacher.embedding_table(), np.float32)}
    all_tables.update({n: np.asarray(t, np.float32) for n, t in (tables or {}).items()})
    for v in ot_variants:
        if v.table not in all_tables:
            raise ValueError(f"OtVariant {v.name!r}: table {v.table!r} is not one of {sorted(all_tables)}")

    results = {}

    def put(name, k, row):
        results[f"{name} K={k}"] = {"detector": name, "K": k, **row}

    ot_fns = {}
    for k in ks:
        win = np.asarray(near_future_window(ell, cmask, k))
        cnt = np.asarray(near_future_count(cmask, k))
        d = np.take_along_axis(win, pos, 1).reshape(-1)
        defined = valid_f & (np.take_along_axis(cnt, pos, 1).reshape(-1) > 0)
        put("kl_window", k, evaluate(d, valid_f, defined, lab_slot, None, false_alarm_quantile, C))
        if ot_variants:
            sx_tok, sx_m = suffix(seqs, cmask, pos, k)
            tw, tm = t_tok[:, :, :k], t_m[:, :, :k]
        for v in ot_variants:
            emb = all_tables[v.table]
            sw, sm = (s_tok[:, 0, :k], s_m[:, 0, :k]) if v.future == "fresh" else (sx_tok, sx_m)
            run = ot_fns.setdefault((v.solver, v.epsilon, v.max_iters), _ot_fn(v.solver, v.epsilon, v.max_iters))
            d = np.asarray(run(emb[tw[:, 0]], emb[sw], tm[:, 0], sm))
            null = np.asarray(run(emb[tw[:, 0]], emb[tw[:, 1]], tm[:, 0], tm[:, 1]))
            defined = valid_f & tm[:, 0].any(1) & sm.any(1) & tm[:, 1].any(1)
            put(v.name, k, evaluate(d, valid_f, defined, lab_slot, null, false_alarm_quantile, C))
        if margin_samples:  # N continuations per side, margin = mean over its first K tokens
            n = margin_samples
            mt = margins["t"].reshape(R * C, n_side, kmax)[:, :n, :k]
            ms = margins["s"].reshape(R * C, n_student, kmax)[:, :n, :k]
            okt, oks = t_m[:, :n, :k], s_m[:, :n, :k]
            m_t = (mt * okt).sum(-1) / np.maximum(okt.sum(-1), 1)
            m_s = (ms * oks).sum(-1) / np.maximum(oks.sum(-1), 1)
            d = np.asarray(margin_w1(m_t, m_s, okt.any(-1), oks.any(-1)))
            defined = valid_f & okt.any(-1).any(-1) & oks.any(-1).any(-1)
            put(f"margin_w1 N={n}", k, evaluate(d, valid_f, defined, lab_slot, None, false_alarm_quantile, C))
    return {"header": header, "detectors": results, "wall_s": time.perf_counter() - t0}
