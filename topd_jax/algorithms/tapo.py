"""TAPO (TAPO.md): GRPO on the rollouts, plus corrected versions of wrong rollouts written
by the policy itself, trained as their own group.

One step, on top of ``grpo.prepare``:
1. DCS (``tapo_construct.select_pairs``): prompts with >= n_pos right and >= n_neg wrong
   rollouts; up to m_max wrong rollouts each, paired with a random right one.
2. The policy answers a synthesis prompt (problem, wrong, right) with
   ``<analysis>…</analysis><reconstruction>…</reconstruction>``; failures to parse are
   dropped and counted.
3. The reconstruction becomes a trajectory after the *plain* prompt: by default the wrong
   rollout's own token ids up to the longest prefix the reconstruction reproduces, then the
   re-tokenized rest (``tapo.construction_mode=splice``), or the re-typed text as is
   (``text``), then the stop token. Longer than ``rollout.max_new_tokens``: dropped.
4. The verifier scores them (r_ref); G_ref's advantages are normalised within G_ref only
   (decoupled: G_orig's are unchanged): all constructions of the batch as one group
   (``tapo.ref_group=batch``) or per prompt.
5. One teacher-forced pass of the policy gives old log-probs and entropies of the
   constructed rows; OTS weights w_t = clip(exp(log p + H), lo, hi) multiply their surrogate.

Shapes are static: the synthesis batch and the constructed rows always have
``prompts_per_step * m_max`` rows (empty slots are padding with ``term = -1``), laid out
prompt-major after each prompt's own rollouts, so the step compiles once.

Metrics (``(sum, count)`` pairs, besides GRPO's): ``dcs_pass_fraction``,
``constructions_attempted`` / ``_parsed`` / ``_kept`` / ``_correct`` (per step),
``construction_parse_rate``, ``construction_correct_rate`` (r_ref over kept ones),
``prefix_match_len`` (tokens shared with the wrong rollout), ``ref_zero_variance_groups``,
``ots_weight`` (mean w_t on constructed tokens), and ``construction_drop_<reason>``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.algorithms import grpo, opd
from topd_jax.algorithms.opd import Frozen, Pair, timed
from topd_jax.algorithms.scoring import score_tokens, score_tokens_entropy
from topd_jax.algorithms.tapo_construct import Failure, parse_construction, select_pairs, splice, splice_text
from topd_jax.losses import ots_weights
from topd_jax.rollout import GenerationResult, generate
from topd_jax.sharding.hosts import fetch
from topd_jax.config.schema import RunConfig
from topd_jax.data.tasks import task_for


@dataclass
class Construction:
    """A kept constructed trajectory: completion ids (stop token included)."""
    prompt: int
    ids: list[int]
    prefix_len: int
    right: bool = False


def construction_limits(cfg: RunConfig) -> tuple[int, int]:
    """``(synthesis prompt length, construction new tokens)`` with the config's defaults."""
    new = cfg.rollout.max_new_tokens
    prompt_len = cfg.tapo.max_synthesis_prompt_len or cfg.data.max_prompt_len + 2 * new + 64
    return prompt_len, cfg.tapo.max_new_tokens or 2 * new + 64


def synthesis_text(cfg: RunConfig, problem: str, wrong: str, right: str) -> str:
    return task_for(cfg.data.source).synthesis_prompt(problem, wrong, right)


def _strip_stop(ids: list[int], eos_ids) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def generate_constructions(cfg: RunConfig, student, frozen: Frozen, prompts: dict, pairs, ids, key,
                           slots: int) -> tuple[list[str | None], Counter]:
    """The policy's reply to each pair's synthesis prompt (None: the prompt was too long).
    One ``generate`` call over ``slots`` rows (padding rows repeat the first prompt)."""
    text, drops = frozen.text, Counter()
    prompt_len, new_tokens = construction_limits(cfg)
    fmt = frozen.format_prompt or (lambda s: s)
    encoded: list[list[int] | None] = []
    for pr in pairs:
        n = cfg.rollout.n
        wrong = text.decode(_strip_stop(ids[pr.prompt * n + pr.wrong], frozen.eos_ids))
        right = text.decode(_strip_stop(ids[pr.prompt * n + pr.right], frozen.eos_ids))
        tok = text.encode(fmt(synthesis_text(cfg, prompts["problems"][pr.prompt], wrong, right)))
        encoded.append(tok if len(tok) <= prompt_len else None)
        drops["synthesis_prompt_too_long"] += len(tok) > prompt_len
    real = [e for e in encoded if e is not None]
    if not real:
        return [None] * len(pairs), drops
    batch_ids = np.full((slots, prompt_len), frozen.pad_id, np.int32)
    batch_mask = np.zeros((slots, prompt_len), bool)
    for i, tok in enumerate(real + [real[0]] * (slots - len(real))):
        batch_ids[i, prompt_len - len(tok):], batch_mask[i, prompt_len - len(tok):] = tok, True
    gen = generate(student, batch_ids, batch_mask, key=key, max_new_tokens=new_tokens,
                   temperature=cfg.tapo.temperature or cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                   top_k=cfg.rollout.top_k or 0, eos_ids=frozen.eos_ids, num_samples=1, pad_id=frozen.pad_id)
    replies = iter(text.decode(_strip_stop(c, frozen.eos_ids)) for c in grpo.completions(gen))
    return [next(replies) if e is not None else None for e in encoded], drops


def build_constructions(cfg: RunConfig, frozen: Frozen, pairs, ids, replies, answers) -> tuple[list[Construction], Counter]:
    """Parse, splice, length-check and verify each reply."""
    text, t = frozen.text, cfg.tapo
    encode = text.encode_completion or text.encode
    out, counts = [], Counter()
    for pr, reply in zip(pairs, replies):
        if reply is None:
            continue
        parsed = parse_construction(reply)
        if isinstance(parsed, Failure):
            counts[parsed.reason] += 1
            continue
        counts["parsed"] += 1
        wrong = _strip_stop(ids[pr.prompt * cfg.rollout.n + pr.wrong], frozen.eos_ids)
        if t.construction_mode == "splice":
            sp = splice_text(wrong, parsed.reconstruction, decode=text.decode, encode=encode, min_prefix=t.min_prefix)
        else:
            sp = splice(wrong, encode(parsed.reconstruction), mode="text")
        if isinstance(sp, Failure):
            counts[sp.reason] += 1
            continue
        traj = list(sp.ids) + [frozen.eos_ids[0]]
        if len(traj) > cfg.rollout.max_new_tokens:
            counts["too_long"] += 1
            continue
        right = bool(text.verify(text.decode(list(sp.ids)), answers[pr.prompt]))
        out.append(Construction(pr.prompt, traj, sp.prefix_len, right))
    return out, counts


def ref_advantages(cfg: RunConfig, kept: list[Construction], num_prompts: int) -> tuple[np.ndarray, float, int]:
    """G_ref advantages per kept construction, the fraction and count of zero-variance groups."""
    if not kept:
        return np.zeros(0, np.float32), 0.0, 0
    r = np.asarray([c.right for c in kept], np.float32)
    if cfg.tapo.ref_group == "batch":
        adv = grpo.advantages(cfg, r[None, :])[0]
        return adv, float(r.min() == r.max()), 1
    groups = [[i for i, c in enumerate(kept) if c.prompt == p] for p in range(num_prompts)]
    groups = [g for g in groups if g]
    width = max(len(g) for g in groups)
    rewards, mask = np.zeros((len(groups), width), np.float32), np.zeros((len(groups), width), bool)
    for k, g in enumerate(groups):
        rewards[k, : len(g)], mask[k, : len(g)] = r[g], True
    a = grpo.advantages(cfg, rewards, mask)
    adv = np.zeros(len(kept), np.float32)
    for k, g in enumerate(groups):
        adv[g] = a[k, : len(g)]
    zero = [float(r[g].min() == r[g].max()) for g in groups]
    return adv, float(np.mean(zero)), len(groups)


def construction_rows(cfg: RunConfig, frozen: Frozen, prompts: dict, kept: list[Construction],
                      adv: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """``[P * m_max, L]`` rows prompt-major (slot ``p * m_max + k``); empty slots are padding."""
    p_count, m = len(prompts["answers"]), cfg.tapo.m_max
    plen = cfg.data.max_prompt_len
    prompt_ids, prompt_mask = fetch(prompts["prompt_ids"]), fetch(prompts["prompt_mask"])  # may span hosts
    rows = p_count * m
    ids = np.full((rows, seq_len), frozen.pad_id, np.int32)
    seq_mask, loss_mask = np.zeros((rows, seq_len), bool), np.zeros((rows, seq_len), bool)
    advantages, term = np.zeros(rows, np.float32), np.full(rows, -1, np.int32)
    used = Counter()
    for c, a in zip(kept, adv):
        slot = c.prompt * m + used[c.prompt]
        used[c.prompt] += 1
        ids[slot, :plen], seq_mask[slot, :plen] = prompt_ids[c.prompt], prompt_mask[c.prompt]
        ids[slot, plen:plen + len(c.ids)] = c.ids
        seq_mask[slot, plen:plen + len(c.ids)] = True
        start = plen + (c.prefix_len if cfg.tapo.mask_error_prefix else 0)
        loss_mask[slot, start:plen + len(c.ids)] = True
        advantages[slot], term[slot] = a, 1
    return {"ids": ids, "seq_mask": seq_mask, "loss_mask": loss_mask, "advantages": advantages, "term": term}


def interleave(main: dict, extra: dict, num_prompts: int) -> dict:
    """Rows prompt-major: prompt p's n rollouts, then its m_max construction slots (so that
    ``grpo.updates_per_batch`` mini-batches split by prompt)."""
    def one(a, b):
        a, b = jnp.asarray(a), jnp.asarray(b)
        a = a.reshape(num_prompts, -1, *a.shape[1:])
        b = b.reshape(num_prompts, -1, *b.shape[1:])
        both = jnp.concatenate([a, b], axis=1)
        return both.reshape(-1, *both.shape[2:])
    return {k: one(main[k], extra[k]) for k in main}


def prepare(cfg: RunConfig, student, prompts: dict, key: jax.Array, frozen: Frozen,
            timings: dict[str, float]) -> tuple[dict, dict[str, Pair], GenerationResult]:
    """GRPO's batch plus G_ref (see the module docstring)."""
    t = cfg.tapo
    sample_key, select_seed, construct_key = jax.random.split(key, 3)
    gen, ids, right = grpo.sample_and_grade(cfg, student, prompts, sample_key, frozen, timings)
    rows = opd.main_rows(gen)
    rows["advantages"] = jnp.asarray(grpo.advantages(cfg, right).reshape(-1))
    rows["term"] = jnp.zeros((rows["ids"].shape[0],), jnp.int32)

    rng = np.random.default_rng(np.asarray(jax.random.key_data(select_seed)).ravel().tolist())
    sel = select_pairs(right, rng, n_pos=t.n_pos, n_neg=t.n_neg, m_max=t.m_max)
    num_prompts = right.shape[0]
    replies, drops = ([], Counter())
    if len(sel):
        replies, drops = timed(timings, "construction", generate_constructions, cfg, student, frozen, prompts,
                               sel.pairs, ids, construct_key, num_prompts * t.m_max)
    kept, counts = build_constructions(cfg, frozen, sel.pairs, ids, replies, prompts["answers"])
    adv, zero_var, _ = ref_advantages(cfg, kept, num_prompts)
    extra = construction_rows(cfg, frozen, prompts, kept, adv, rows["ids"].shape[1])
    extra["weights"] = np.ones(extra["ids"].shape, np.float32)

    # Old-policy pass over both groups: log-probs for the ratio, entropies for OTS.
    batch = interleave({k: rows[k] for k in ("ids", "seq_mask", "loss_mask", "weights", "advantages", "term")},
                       extra, num_prompts)
    old_logp, entropy = timed(timings, "scoring", score_tokens_entropy, student, batch["ids"], batch["seq_mask"],
                              batch["loss_mask"], chunk=cfg.loss.vocab_chunk)
    batch["old_logp"] = old_logp
    constructed = batch["loss_mask"] & (batch["term"] == 1)[:, None]
    if t.ots:
        w = ots_weights(old_logp, entropy, constructed, lo=t.ots_low, hi=t.ots_high)
        batch["weights"] = jnp.where(constructed, w, batch["weights"])
    if cfg.uses_reference:
        batch["ref_logp"] = score_tokens(frozen.teacher, batch["ids"], batch["seq_mask"], batch["loss_mask"],
                                         chunk=cfg.loss.vocab_chunk)

    metrics = opd.rollout_metrics(gen)
    metrics.update(grpo.reward_metrics(right))
    attempted, parsed = len(sel), counts["parsed"]
    n_kept, n_right = len(kept), sum(c.right for c in kept)
    cm = fetch(constructed).astype(np.float32)
    metrics.update({
        "dcs_pass_fraction": (float(sel.gate_passed.sum()), num_prompts),
        "constructions_attempted": (float(attempted), 1), "constructions_parsed": (float(parsed), 1),
        "constructions_kept": (float(n_kept), 1), "constructions_correct": (float(n_right), 1),
    })
    # Ratios only where defined (a step without constructions would log NaN).
    if attempted:
        metrics["construction_parse_rate"] = (float(parsed), attempted)
    if n_kept:
        metrics.update({"construction_correct_rate": (float(n_right), n_kept),
                        "prefix_match_len": (float(sum(c.prefix_len for c in kept)), n_kept),
                        "ref_zero_variance_groups": (zero_var, 1),
                        "ots_weight": (float((fetch(batch["weights"]) * cm).sum()), float(cm.sum()))})
    for reason, k in (counts + drops).items():
        if reason != "parsed":
            metrics[f"construction_drop_{reason}"] = (float(k), 1)
    return batch, metrics, gen
