"""Detector ROC at step 0 (TOPD_REVIEW §4.11): is the false-alarm share measured or defined,
and does any near-future detector separate surface-form mismatches from real forks?

    python bench/detector_roc.py                               # the demo's cached models
    python bench/detector_roc.py --prompts 32 --ks 4,8         # quicker
    python bench/detector_roc.py --student DIR --teacher DIR   # any pair on the synthetic task

No training. The initial student samples ``--rollouts`` solutions for ``--prompts`` held-out
problems; the teacher scores them (ℓ_t, full-vocabulary reverse KL); the candidates are the
top 20 % of ℓ in each rollout (``--candidate-quantile``, every position above it: no cap);
every completion token gets a ground-truth label from ``topd_jax.data.labelled``. Then, for
each detector × K, D_t at every candidate and:

* the AUROC of −D for SURFACE vs FORK ∪ RECOVERY candidates (1 = the detector ranks every
  surface candidate below every fork; 0.5 = no separation), and separately vs FORK and vs
  RECOVERY;
* the quantile rule's false alarms (D ≤ the batch's 0.3-quantile): precision (share of
  them that are SURFACE) and recall (share of SURFACE candidates caught); their share of
  candidates is 0.3 by definition;
* for the OT detectors, the teacher-null rule D(teacher, student) ≤ D(teacher, teacher′):
  its false-alarm share (measured), precision and recall;
* candidates whose window is empty (D undefined: ``kl_window`` at the last token) are
  excluded and counted.

Detectors: ``kl_window`` (mean ℓ over t+1..t+K); ``ot_embedding`` with a fresh student
continuation, the student's table, Sinkhorn ε = 0.05 (TOPD's default) and one change each:
the rollout's own suffix instead of a fresh continuation, the teacher's table, ε = 0.01,
the debiased Sinkhorn divergence, the exact solver; ``margin_w1`` with N = 4 per side.
Continuations are sampled once at the largest K and truncated for the smaller ones.

What it measures on the demo models: the demo task (``topd_jax.data.synthetic``) has one-word
connectives and operand order as its surface forms, and neither model has ever seen a
repair, so RECOVERY positions are only "the token after an unrepaired slip". ``--task
labelled`` uses the labelled task of ``topd_jax.data.labelled`` (multi-token connectives, a
teacher that repairs planted slips) and its models (``demos.labelled_demo``: trained and
cached on first use, their gates in ``demo_meta.json``), or ``--student``/``--teacher``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from topd_jax.algorithms.scoring import forward_hidden, score_tokens  # noqa: E402
from topd_jax.data import labelled, synthetic  # noqa: E402
from topd_jax.losses import (auroc, margin_w1, masked_quantile, near_future_count,  # noqa: E402
                             near_future_window, ot_distance, select_candidates, select_candidates_quantile,
                             token_divergence)
from topd_jax.models import load_pretrained  # noqa: E402
from topd_jax.rollout import continue_from, generate  # noqa: E402
from topd_jax.demos import demo, labelled_demo  # noqa: E402
from topd_jax.config.loader import load_config  # noqa: E402

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SURFACE, FORK, RECOVERY = labelled.SURFACE, labelled.FORK, labelled.RECOVERY
# (name, table, solver, epsilon, student future)
OT_VARIANTS = [
    ("ot sinkhorn eps=.05 (default)", "student", "sinkhorn", 0.05, "fresh"),
    ("ot + rollout suffix", "student", "sinkhorn", 0.05, "suffix"),
    ("ot + teacher table", "teacher", "sinkhorn", 0.05, "fresh"),
    ("ot eps=.01", "student", "sinkhorn", 0.01, "fresh"),
    ("ot sinkhorn divergence", "student", "sinkhorn_divergence", 0.05, "fresh"),
    ("ot exact", "student", "exact", 0.05, "fresh"),
]


# ---------------------------------------------------------------- pieces
@jax.jit
def _token_kl(s_hidden, s_head, t_hidden, t_head, loss_mask):
    """ℓ_t token-indexed ``[R, L]``: KL(p_s ‖ p_t) of the distributions predicting token t."""
    ls = jnp.einsum("btd,dv->btv", s_hidden, s_head)
    lt = jnp.einsum("btd,dv->btv", t_hidden, t_head)
    ell = token_divergence(ls[:, :-1], lt[:, :-1], loss_mask[:, 1:])
    return jnp.concatenate([jnp.zeros_like(ell[:, :1]), ell], axis=1)


def slots_of(cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``[R, L]`` -> ``pos [R, C]`` (C = the most in a row) and ``valid [R, C]``."""
    c = max(int(cand.sum(1).max()), 1)
    pos, valid = np.zeros((cand.shape[0], c), np.int32), np.zeros((cand.shape[0], c), bool)
    for r in range(cand.shape[0]):
        cols = np.flatnonzero(cand[r])
        pos[r, :len(cols)], valid[r, :len(cols)] = cols, True
        pos[r, len(cols):] = cols[0] if len(cols) else 1
    return pos, valid


def continuations(model, gen, pos, n, k, key, eos_id, pad_id, chunk=2048):
    """``n`` K-token continuations from every slot (rows ``(r*C + c)*n + j``), in row chunks."""
    bt = np.repeat(pos, n, axis=1)  # branch at the candidate: y_t is regenerated
    seqs, smask = np.asarray(gen.sequences), np.asarray(gen.sequence_mask)
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
    """The rollout's own ``y_t .. y_{t+K-1}`` per slot: ``[R*C, K]`` tokens and mask."""
    cols = pos[..., None] + np.arange(k)
    inside = cols < ids.shape[1]
    cols = np.minimum(cols, ids.shape[1] - 1)
    rows = np.arange(ids.shape[0])[:, None, None]
    return ids[rows, cols].reshape(-1, k), (loss_mask[rows, cols] & inside).reshape(-1, k)


def roc_points(scores, pos, neg, num=21):
    """(FPR, TPR) at ``num`` thresholds over the pooled scores (higher score = positive)."""
    s = np.concatenate([scores[pos], scores[neg]])
    out = []
    for thr in np.quantile(s, np.linspace(0, 1, num)) if len(s) else []:
        out.append((float((scores[neg] >= thr).mean()), float((scores[pos] >= thr).mean())))
    return out


def guided_precision(d: np.ndarray, eligible: np.ndarray, lab: np.ndarray, slots_per_row: int) -> float:
    """TOPD's guided point per rollout: the most divergent candidate that is not a false alarm;
    the share of them at FORK or RECOVERY positions (NaN if none is guided)."""
    d2, ok = d.reshape(-1, slots_per_row), eligible.reshape(-1, slots_per_row)
    best = np.argmax(np.where(ok, d2, -np.inf), axis=1)
    guided = ok.any(1)
    picked = lab.reshape(-1, slots_per_row)[np.arange(len(best)), best][guided]
    return float(np.isin(picked, (FORK, RECOVERY)).mean()) if guided.any() else float("nan")


def evaluate(d: np.ndarray, valid: np.ndarray, defined: np.ndarray, lab: np.ndarray, null: np.ndarray | None,
             q: float, slots_per_row: int) -> dict:
    """One detector's row: AUROCs, the quantile rule, the teacher-null rule. Arrays ``[S]``
    over the candidate slots (``valid``: a real candidate); ``defined`` (within ``valid``)
    excludes empty windows, which are counted."""
    surf, fork, rec = (lab == SURFACE) & defined, (lab == FORK) & defined, (lab == RECOVERY) & defined
    score = -d
    row = {"auroc_surf_vs_fork_rec": float(auroc(score, surf, fork | rec)),
           "auroc_surf_vs_fork": float(auroc(score, surf, fork)),
           "auroc_surf_vs_rec": float(auroc(score, surf, rec)),
           "undefined": int((valid & ~defined).sum()), "classified": int(defined.sum())}
    thr = float(masked_quantile(d, defined, q, axis=None))
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


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--ks", default="4,8,12,20")
    ap.add_argument("--candidate-quantile", type=float, default=0.8)
    ap.add_argument("--false-alarm-quantile", type=float, default=0.3)
    ap.add_argument("--margin-samples", type=int, default=4)
    ap.add_argument("--student"), ap.add_argument("--teacher")
    ap.add_argument("--task", choices=("demo", "labelled"), default="demo",
                    help="demo: one-word connectives (the demo models); labelled: data.labelled.PHRASES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/detector_roc")
    ap.add_argument("overrides", nargs="*", help="config overrides of configs/demo.yaml")
    args = ap.parse_args(argv)
    ks = sorted(int(k) for k in args.ks.split(","))
    t_start = time.perf_counter()
    cfg = load_config(DEMO_YAML, args.overrides)
    if args.student and args.teacher:
        student_dir, teacher_dir = args.student, args.teacher
    elif args.task == "labelled":
        student_dir, teacher_dir = labelled_demo.prepare_labelled_models(cfg)
    else:
        student_dir, teacher_dir = demo.prepare_demo_models(cfg)
    student, teacher = load_pretrained(student_dir), load_pretrained(teacher_dir)
    tok = labelled.LabelledTokenizer() if args.task == "labelled" else synthetic.SyntheticTokenizer()
    phrases = labelled.PHRASES if args.task == "labelled" else labelled.PLAIN_PHRASES
    problems = demo.splits(cfg)[1][:args.prompts]
    ids, pmask = demo.prompt_arrays([p.prompt for p in problems], demo.prompt_len(cfg))
    key = jax.random.key(args.seed)
    k_roll, k_t, k_s = jax.random.split(key, 3)

    # 1. rollouts of the initial student, ℓ_t, labels, candidates
    new_tokens = labelled_demo.completion_len(cfg) if args.task == "labelled" else demo.completion_len(cfg) + 8
    gen = generate(student, ids, pmask, key=k_roll, max_new_tokens=new_tokens,
                   temperature=1.0, eos_ids=(tok.eos_id,), num_samples=args.rollouts, pad_id=tok.pad_id)
    seqs, smask, cmask = (np.asarray(a) for a in (gen.sequences, gen.sequence_mask, gen.completion_mask))
    rows_problems = [p for p in problems for _ in range(args.rollouts)]  # row b*n + j <- prompt b
    hs, ht = forward_hidden(student, seqs, smask), forward_hidden(teacher, seqs, smask)
    ell = np.asarray(_token_kl(hs, student.lm_head_weight(), ht, teacher.lm_head_weight(), jnp.asarray(cmask)))
    lab_all = labelled.label_rollouts(rows_problems, seqs, cmask, tok.vocab, eos_id=tok.eos_id, phrases=phrases)
    labels = lab_all["labels"]
    cand = np.asarray(select_candidates_quantile(ell, cmask, quantile=args.candidate_quantile))
    pos, valid = slots_of(cand)
    R, C = pos.shape
    lab_slot = np.take_along_axis(labels, pos, 1).reshape(-1)
    valid_f = valid.reshape(-1)

    def share(mask_tok, kind):
        return float(((labels == kind) & mask_tok).sum() / max(mask_tok.sum(), 1))

    composition = {name: share(cand, i) for i, name in enumerate(labelled.LABEL_NAMES)}
    top_c = np.asarray(select_candidates(ell, cmask, num=cfg.topd.num_candidates,
                                         min_separation=cfg.topd.min_separation))
    header = {
        "rows": R, "tokens": int(cmask.sum()), "candidates": int(cand.sum()),
        "student_sampled_accuracy": float(lab_all["correct"].mean()),
        "ungrammatical_rows": int(lab_all["ungrammatical"].any(1).sum()),
        "label_share_all_tokens": {n: share(cmask, i) for i, n in enumerate(labelled.LABEL_NAMES)},
        "label_share_candidates": composition,
        "true_surface_share_candidates": composition["surface"],
        f"label_share_top_{cfg.topd.num_candidates}": {n: share(top_c, i) for i, n in enumerate(labelled.LABEL_NAMES)},
        "loss_surface_share": float(ell[labels == SURFACE].sum() / max(ell[cmask].sum(), 1e-9)),
        "mean_loss_by_label": {n: float(ell[(labels == i) & cmask].mean()) if ((labels == i) & cmask).any()
                               else None for i, n in enumerate(labelled.LABEL_NAMES)},
    }

    # 2. continuations at the largest K: teacher x max(2, N), student x max(1, N)
    kmax, n_side = ks[-1], max(2, args.margin_samples)
    t_tok, t_m, t_full, t_fmask, t_comp = continuations(teacher, gen, pos, n_side, kmax, k_t, tok.eos_id, tok.pad_id)
    s_tok, s_m, s_full, s_fmask, s_comp = continuations(student, gen, pos, n_side, kmax, k_s, tok.eos_id, tok.pad_id)
    # per-token margins log p_T - log p_S of every continuation token (for margin_w1)
    margins = {}
    for side, (full, fmask, comp) in {"t": (t_full, t_fmask, t_comp), "s": (s_full, s_fmask, s_comp)}.items():
        lp_t = np.asarray(score_tokens(teacher, full, fmask, comp))
        lp_s = np.asarray(score_tokens(student, full, fmask, comp))
        margins[side] = (lp_t - lp_s)[:, -kmax:]  # the continuation's K columns
    t_tok, t_m = t_tok.reshape(R * C, n_side, kmax), t_m.reshape(R * C, n_side, kmax)
    s_tok, s_m = s_tok.reshape(R * C, n_side, kmax), s_m.reshape(R * C, n_side, kmax)
    tables = {"student": np.asarray(student.embedding_table(), np.float32),
              "teacher": np.asarray(teacher.embedding_table(), np.float32)}

    results = {}
    for k in ks:
        # kl_window over the rollout's own ℓ
        win = np.asarray(near_future_window(ell, cmask, k))
        cnt = np.asarray(near_future_count(cmask, k))
        d = np.take_along_axis(win, pos, 1).reshape(-1)
        defined = valid_f & (np.take_along_axis(cnt, pos, 1).reshape(-1) > 0)
        results[f"kl_window K={k}"] = evaluate(d, valid_f, defined, lab_slot, None, args.false_alarm_quantile, C)
        # OT variants
        sx_tok, sx_m = suffix(seqs, cmask, pos, k)
        tw, tm = t_tok[:, :, :k], t_m[:, :, :k]
        for name, table, solver, eps, future in OT_VARIANTS:
            emb = tables[table]
            sw, sm = (s_tok[:, 0, :k], s_m[:, 0, :k]) if future == "fresh" else (sx_tok, sx_m)
            run = jax.jit(lambda a, b, am, bm: ot_distance(a, b, am, bm, epsilon=eps, solver=solver,
                                                           max_iters=2000))
            d = np.asarray(run(emb[tw[:, 0]], emb[sw], tm[:, 0], sm))
            null = np.asarray(run(emb[tw[:, 0]], emb[tw[:, 1]], tm[:, 0], tm[:, 1]))
            defined = valid_f & tm[:, 0].any(1) & sm.any(1) & tm[:, 1].any(1)
            results[f"{name} K={k}"] = evaluate(d, valid_f, defined, lab_slot, null, args.false_alarm_quantile, C)
        # margin_w1: N continuations per side, margin = mean over its first K tokens
        n = args.margin_samples
        mt = margins["t"].reshape(R * C, n_side, kmax)[:, :n, :k]
        ms = margins["s"].reshape(R * C, n_side, kmax)[:, :n, :k]
        okt, oks = t_m[:, :n, :k], s_m[:, :n, :k]
        m_t = (mt * okt).sum(-1) / np.maximum(okt.sum(-1), 1)
        m_s = (ms * oks).sum(-1) / np.maximum(oks.sum(-1), 1)
        d = np.asarray(margin_w1(m_t, m_s, okt.any(-1), oks.any(-1)))
        defined = valid_f & okt.any(-1).any(-1) & oks.any(-1).any(-1)
        results[f"margin_w1 N={n} K={k}"] = evaluate(d, valid_f, defined, lab_slot, None, args.false_alarm_quantile, C)

    wall = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"header": header, "detectors": results, "wall_s": wall, "student": str(student_dir),
              "teacher": str(teacher_dir), "task": args.task, "args": vars(args)}
    (out / "detector_roc.json").write_text(json.dumps(report, indent=1))

    print(f"# Detector ROC at step 0 ({args.task} task; {R} rollouts, {int(cmask.sum())} tokens, "
          f"{int(cand.sum())} candidates = top {1 - args.candidate_quantile:.0%} of ℓ per rollout)")
    print(f"student sampled accuracy {header['student_sampled_accuracy']:.1%}; "
          f"candidate labels: " + ", ".join(f"{n} {v:.1%}" for n, v in composition.items() if v > 0))
    tc = header[f"label_share_top_{cfg.topd.num_candidates}"]
    print(f"top-{cfg.topd.num_candidates} candidates (min separation {cfg.topd.min_separation}): surface "
          f"{tc['surface']:.1%}, fork {tc['fork']:.1%}, recovery {tc['recovery']:.1%}")
    print(f"TRUE surface share of candidates {composition['surface']:.1%} (the quantile rule's "
          f"'suppressed share' is {args.false_alarm_quantile:.0%} by definition); loss surface share "
          f"{header['loss_surface_share']:.1%}")
    print("mean ℓ by label: " + ", ".join(f"{n} {v:.3f}" for n, v in header["mean_loss_by_label"].items()
                                          if v is not None))
    print()
    print("| detector | AUROC surf vs fork+rec | vs fork | vs rec | q-rule FA prec | q-rule FA recall "
          "| guided fork prec | null FA share | null prec | null recall | null guided fork prec | undefined |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v: "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for name, r in results.items():
        print(f"| {name} | {f(r['auroc_surf_vs_fork_rec'])} | {f(r['auroc_surf_vs_fork'])} | "
              f"{f(r['auroc_surf_vs_rec'])} | {f(r['quantile_precision'])} | {f(r['quantile_recall'])} | "
              f"{f(r['guided_fork_precision'])} | {f(r.get('null_share'))} | {f(r.get('null_precision'))} | "
              f"{f(r.get('null_recall'))} | {f(r.get('null_guided_fork_precision'))} | {r['undefined']} |")
    print(f"\nwall {wall:.0f} s; JSON (with ROC points): {out / 'detector_roc.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
