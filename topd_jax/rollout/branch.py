"""TOPD branching (TOPD.md §3): from the prefixes c_t = (x, y_<t) of whole sequences, generate
K tokens with any model, every candidate of every row in one batched call.

    out = continue_from(teacher, res.sequences, res.sequence_mask, branch_at,   # branch_at [b, c]
                        key=key, num_tokens=50)
    out.tokens [b * c, K]; out.sequences = c_t followed by the continuation, ready to teacher-force

How the prefix is reused. The b whole sequences are prefilled ONCE (or not at all when the
caller passes a cache that already holds them, e.g. `generate(..., return_cache=True)`), and
that cache is shared, never copied per candidate (`models.cache.BranchCache`): candidate
(b, j) sees sequence b's slots before its branch point, and its own K tokens live in a small
private cache of b * c rows. Each step's attention is the exact merge of the two partials;
the prefix part reads sequence b's filled blocks once for all its c candidates. Positions
continue from the prefix. Instead of the hidden state at t-1 (not kept in a cache), the last
prefix token is hidden too and fed again as the first decode step (into the private cache),
so both paths share one code path; it costs one single-token step.

Row order: output row b * c + j is candidate j of sequence b. Keys as in `generate`: one key
(split into b * c row keys) or b * c keys; continuation step s of row r uses
fold_in(row_key[r], s), exactly as `generate` would from the truncated prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from topd_jax.models import KVCache, default_positions
from topd_jax.models.cache import BranchCache, slots_for
from topd_jax.rollout.engine import (
    GenerationResult,
    assemble,
    check_eos_ids,
    constrain_cache,
    decode,
    left_align,
    row_keys,
)
from topd_jax.rollout.sampling import SamplingConfig
from topd_jax.sharding import constrain
from topd_jax.sharding.hosts import fetch


def continue_impl(model, sequences: jax.Array, sequence_mask: jax.Array, branch_at: jax.Array,
                  keys: jax.Array, cache: KVCache | None, *, num_tokens: int, sampling: SamplingConfig,
                  eos_ids: tuple[int, ...], pad_id: int, return_cache: bool) -> GenerationResult:
    """The traced body of `continue_from` (inside jit; branch_at [b, c], keys [b * c])."""
    batch, length = sequences.shape
    per_row = branch_at.shape[1]
    seq_mask = sequence_mask.astype(bool)
    prefix_slots = slots_for(length)  # whole blocks: the attention never pads (copies) the prefix
    if cache is None:  # prefill each sequence once; its hidden states / logits are not needed
        cache = constrain_cache(model.init_cache(batch, prefix_slots))
        _, cache = model.hidden_states(constrain(sequences, ("act_batch", "act_seq")),
                                       positions=default_positions(seq_mask), attention_mask=seq_mask, cache=cache)
    else:
        cache = cache.resized(prefix_slots)  # once per call, b rows (no copy when already that size)
    prefix = constrain_cache(cache.replace(mask=jnp.pad(seq_mask, ((0, 0), (0, prefix_slots - length)))))

    ids = jnp.repeat(sequences, per_row, axis=0)  # [r, L]
    t = branch_at.reshape(-1)  # [r]
    cols = jnp.arange(length)[None, :]
    prefix_cols = jnp.repeat(seq_mask, per_row, axis=0) & (cols < t[:, None])  # c_t: real tokens before t
    last = length - 1 - jnp.argmax(jnp.flip(prefix_cols, axis=1), axis=1)  # [r] last real column < t
    # candidate (b, j) sees the prefix slots < last (the last prefix token is fed again below, into
    # its own cache); the c candidates share sequence b's prefix cache
    suffix = model.init_cache(batch * per_row, slots_for(num_tokens))  # the re-fed token + K - 1 fed tokens
    branch = BranchCache(prefix=prefix, prefix_end=last.reshape(batch, per_row).astype(jnp.int32), suffix=suffix)
    branch = constrain_cache(branch)

    last_token = jnp.take_along_axis(ids, last[:, None], axis=1)  # [r, 1]
    position = (prefix_cols & (cols < last[:, None])).sum(axis=1, dtype=jnp.int32)  # [r] = position of the last token
    hidden, branch = model.hidden_states(last_token, positions=position[:, None],
                                         attention_mask=jnp.ones_like(last_token, bool), cache=branch)
    logits = model.compute_logits(hidden)[:, 0]
    decoded = decode(model, constrain_cache(branch), logits, position + 1, keys, num_tokens=num_tokens,
                     sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)
    prefix_ids, prefix_mask = left_align(ids, prefix_cols)
    return assemble(prefix_ids, prefix_mask, decoded, decoded[-1] if return_cache else None, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "sampling", "eos_ids", "pad_id",
                                             "return_cache"))
def _continue_jit(graphdef, state, sequences, sequence_mask, branch_at, keys, cache, **static):
    return continue_impl(nnx.merge(graphdef, state), sequences, sequence_mask, branch_at, keys, cache, **static)


def branch_points(candidates: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """Branch columns from a candidate mask (e.g. `topd_jax.losses.select_candidates` over the
    columns of `sequences`), ready for `continue_from`.

    candidates [b, L] bool -> (branch_at [b, num] int32, valid [b, num] bool): the first `num`
    candidate columns of each row, left to right. Missing ones (valid False) are set to L,
    which `continue_from` accepts (it continues after the whole sequence); ignore their rows.
    """
    length = candidates.shape[1]
    cols = jnp.where(candidates, jnp.arange(length, dtype=jnp.int32), length)  # [b, L]
    first = jnp.sort(cols, axis=1)[:, :num]  # candidate columns in order, then L
    if num > length:
        first = jnp.pad(first, ((0, 0), (0, num - length)), constant_values=length)
    return first, first < length


def _check_branch_at(branch_at: np.ndarray, sequence_mask: np.ndarray) -> None:
    """Every branch point needs a real token before it (the prefix c_t is never empty)."""
    length = sequence_mask.shape[1]
    bad = (branch_at < 1) | (branch_at > length)
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(f"branch_at[{b}, {j}] = {branch_at[b, j]}; expected 1 <= t <= sequence length {length}")
    real_before = np.cumsum(sequence_mask, axis=1)  # [b, L]: real tokens in columns <= j
    count = np.take_along_axis(real_before, branch_at - 1, axis=1)  # real tokens before t
    if (count == 0).any():
        b, j = np.argwhere(count == 0)[0]
        raise ValueError(f"branch_at[{b}, {j}] = {branch_at[b, j]}: row {b} has no real token before it")


def continue_from(model, sequences, sequence_mask, branch_at, *, key, num_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids=(),
                  pad_id: int = 0, cache: KVCache | None = None, return_cache: bool = False) -> GenerationResult:
    """Generate `num_tokens` tokens from the prefix before each branch point, as one compiled call.

    sequences, sequence_mask [b, L]: whole sequences (e.g. `GenerationResult.sequences` and
    `.sequence_mask`); any gaps or padding are allowed, positions are cumsum(mask) - 1.
    branch_at [b] or [b, c] int: column of the token to regenerate; the prefix is the real
    tokens in columns < t (1 <= t <= L; t = L continues after the whole sequence).
    cache: optional KVCache (b rows, >= L - 1 slots) already holding these sequences, slot
    j = column j (as `generate(..., return_cache=True)` returns); skips the prefill. It is
    shared by the c candidates of each row, not copied per candidate.
    return_cache: keep the decode's `BranchCache` (those b prefixes + [b * c rows, K slots]).
    Sampling arguments as in `generate`.

    Returns a `GenerationResult` with rows b * c: `tokens`/`mask`/... [b * c, num_tokens] are
    the continuations, `sequences` [b * c, L + num_tokens] the left-aligned prefix c_t followed
    by the continuation (teacher-force it with the usual shift by one).
    """
    sequences = jnp.asarray(sequences)
    # For the checks (fetch: the rows may span several hosts); the arrays stay where they are.
    host_mask = fetch(sequence_mask).astype(bool)
    if sequences.ndim != 2 or sequences.shape != host_mask.shape:
        raise ValueError(f"sequences {sequences.shape} and sequence_mask {sequence_mask.shape}: "
                         f"expected the same [batch, length] shape")
    branch_at = fetch(branch_at).astype(np.int32)
    if branch_at.ndim == 1:
        branch_at = branch_at[:, None]
    if branch_at.ndim != 2 or branch_at.shape[0] != sequences.shape[0]:
        raise ValueError(f"branch_at {branch_at.shape}: expected [batch] or [batch, candidates] with "
                         f"batch = {sequences.shape[0]} (sequences {sequences.shape})")
    _check_branch_at(branch_at, host_mask)
    if not (isinstance(num_tokens, int) and num_tokens >= 1):
        raise ValueError(f"num_tokens={num_tokens!r}; expected an int >= 1")
    if cache is not None and (cache.batch != sequences.shape[0] or cache.max_len < sequences.shape[1] - 1):
        raise ValueError(f"cache mask {cache.mask.shape}: expected batch {sequences.shape[0]} and at least "
                         f"{sequences.shape[1] - 1} slots for sequences {sequences.shape}")
    sampling = SamplingConfig(float(temperature), float(top_p), top_k)
    keys = row_keys(jnp.asarray(key), branch_at.size)
    graphdef, state = nnx.split(model)
    return _continue_jit(graphdef, state, jnp.asarray(sequences, jnp.int32), jnp.asarray(sequence_mask, bool),
                         jnp.asarray(branch_at), keys, cache, num_tokens=num_tokens, sampling=sampling,
                         eos_ids=check_eos_ids(eos_ids), pad_id=int(pad_id), return_cache=return_cache)
