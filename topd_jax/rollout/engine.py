"""Batched generation: one jitted prefill + a `lax.while_loop` decode over a preallocated KV cache.

    result = generate(model, prompt_ids, prompt_mask, key=jax.random.key(0), max_new_tokens=256)
    result.tokens, result.mask, result.logprobs, result.model_logprobs     # [rows, max_new_tokens]
    result.sequences, result.sequence_mask, result.completion_mask          # [rows, P + max_new_tokens]

Layout. Prompts are first left-aligned (each row rolled so its last real token sits in column
P-1; a left-padded batch is unchanged), so the completion follows every prompt directly and
`sequences` can be teacher-forced with the usual shift by one. Positions are
`cumsum(mask) - 1` (the model's default), cache slots of padding are masked.

Cache. Slot j holds column j of `sequences` (prompt slots 0..P-1, completion token i in slot
P+i); the last completion token is never fed back, so the cache holds P + N - 1 slots
(allocated rounded up to whole attention blocks, returned cut to P + N - 1). It is created
inside the jitted call and updated in place by the while loop (nothing to donate). Each step's
attention reads only the slots below the filled length (`KVCache.attend`).

Randomness. Row r draws step s with `fold_in(row_key[r], s)`; `key` is split into one key per
row unless the caller passes the row keys ([rows] typed keys). Same key -> same tokens, on any
mesh (threefry is partitionable in JAX >= 0.5).

Letters: r rows (= batch * num_samples), p prompt columns, n new tokens, v vocabulary.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.models import CACHE_KV_AXES, CACHE_MASK_AXES, KVCache, default_positions
from topd_jax.models.cache import BranchCache, slots_for
from topd_jax.rollout.sampling import SamplingConfig, sample, token_log_prob
from topd_jax.sharding import constrain


@flax.struct.dataclass
class GenerationResult:
    """Completions and everything the trainer needs to teacher-force them (a pytree).

    tokens          [r, n] int32   completion ids; pad_id after a stop
    mask            [r, n] bool    completion token is real (the stop token itself included)
    logprobs        [r, n] f32     log-prob of each token under the sampling distribution
                                   (after temperature / top-k / top-p; 0 for greedy); 0 on pads
    model_logprobs  [r, n] f32     log-prob under the unmodified model (T = 1, no truncation)
    lengths         [r] int32      real completion tokens per row
    finished        [r] bool       the row stopped on an eos id (False: ran out of tokens)
    sequences       [r, p + n]     left-aligned prompt, then the completion
    sequence_mask   [r, p + n]     real tokens (prompt or completion)
    completion_mask [r, p + n]     completion tokens (the targets of a teacher-forced loss)
    cache           the decode cache (`return_cache=True`), else None: generate's KVCache, slot
                   j = column j; continue_from's BranchCache (shared prefixes + private suffixes)
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    sequences: jax.Array
    sequence_mask: jax.Array
    completion_mask: jax.Array
    cache: KVCache | BranchCache | None = None

    @property
    def prompt_mask(self) -> jax.Array:
        """[r, p + n] bool: real prompt tokens."""
        return self.sequence_mask & ~self.completion_mask

    @property
    def positions(self) -> jax.Array:
        """[r, p + n] int32 RoPE positions the tokens were generated with."""
        return default_positions(self.sequence_mask)


# ---- small pure helpers ---------------------------------------------------------------------
def left_align(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Roll each row right so its last real token lands in the last column.

    ids, mask [r, c] -> same shapes. Rows without a real token are left as they are.
    """
    cols = ids.shape[1]
    last_real = cols - 1 - jnp.argmax(jnp.flip(mask, axis=1), axis=1)  # [r]
    shift = jnp.where(mask.any(axis=1), cols - 1 - last_real, 0)  # [r]
    source = (jnp.arange(cols)[None, :] - shift[:, None]) % cols  # [r, c]
    return jnp.take_along_axis(ids, source, axis=1), jnp.take_along_axis(mask, source, axis=1)


def constrain_cache(cache: KVCache | BranchCache) -> KVCache | BranchCache:
    """Shard the cache by its logical axes (a no-op without a mesh)."""
    if isinstance(cache, BranchCache):
        return cache.replace(prefix=constrain_cache(cache.prefix), suffix=constrain_cache(cache.suffix),
                             prefix_end=constrain(cache.prefix_end, ("act_batch", None)))
    return cache.map_kv(lambda x: constrain(x, CACHE_KV_AXES)).replace(mask=constrain(cache.mask, CACHE_MASK_AXES))


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """[rows] typed keys from one key (split) or from [rows] keys (used as they are).

    Accepts typed keys (`jax.random.key`) and raw uint32 keys (`jax.random.PRNGKey`).
    """
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.random.split(key, rows)
    if key.shape != (rows,):
        raise ValueError(f"key has shape {key.shape}; expected one key () or one per row ({rows},)")
    return key


# ---- the decode loop ------------------------------------------------------------------------
def decode(model, cache: KVCache, logits: jax.Array, positions: jax.Array, keys: jax.Array, *,
           num_tokens: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    """Sample `num_tokens` tokens per row, feeding each back through `model` with `cache`.

    logits [r, v] float32 for the first new token; positions [r] its RoPE position; keys [r].
    The cache needs num_tokens - 1 free slots from cache.index. Stops early once every row
    has produced an eos id. Traced code: call inside jit.
    Returns (tokens, mask, logprobs, model_logprobs [r, n], finished [r], cache).
    """
    rows = logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)

    def pick(step, logits, done):
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tokens, logprobs = sample(step_keys, logits, sampling)
        if sampling.is_model_distribution:
            model_logprobs = logprobs  # the sampling distribution is the model's
        else:
            model_logprobs = token_log_prob(logits, tokens)
        valid = ~done
        stop = (tokens[:, None] == eos[None, :]).any(axis=1) if eos_ids else jnp.zeros_like(done)
        return (jnp.where(valid, tokens, pad_id), valid, jnp.where(valid, logprobs, 0.0),
                jnp.where(valid, model_logprobs, 0.0), done | (valid & stop))

    def record(out, step, values):
        return tuple(buf.at[:, step].set(val) for buf, val in zip(out, values))

    def body(carry):
        step, logits, cache, pos, done, out = carry
        tokens, valid, lp, mlp, done = pick(step, logits, done)
        out = record(out, step, (tokens, valid, lp, mlp))
        hidden, cache = model.hidden_states(tokens[:, None], positions=pos[:, None],
                                            attention_mask=valid[:, None], cache=cache)
        logits = model.compute_logits(hidden)[:, 0]  # [r, v]
        return step + 1, logits, constrain_cache(cache), pos + 1, done, out

    def keep_going(carry):
        step, done = carry[0], carry[4]
        return (step < num_tokens - 1) & ~jnp.all(done)

    out = (jnp.full((rows, num_tokens), pad_id, jnp.int32), jnp.zeros((rows, num_tokens), bool),
           jnp.zeros((rows, num_tokens), jnp.float32), jnp.zeros((rows, num_tokens), jnp.float32))
    done = jnp.zeros((rows,), bool)
    carry = (jnp.zeros((), jnp.int32), logits, cache, positions, done, out)
    step, logits, cache, _, done, out = jax.lax.while_loop(keep_going, body, carry)
    # The last token is sampled but never fed back (saves one forward). If every row had
    # stopped earlier this writes pads into column `step`, which are pads already.
    tokens, valid, lp, mlp, done = pick(step, logits, done)
    tokens, mask, logprobs, model_logprobs = record(out, step, (tokens, valid, lp, mlp))
    return tokens, mask, logprobs, model_logprobs, done, cache


def assemble(prefix_ids, prefix_mask, decoded, cache: KVCache | None, pad_id: int) -> GenerationResult:
    """GenerationResult from left-aligned prefixes [r, c] and `decode`'s output; pad_id
    wherever the mask is False (prompt padding included)."""
    tokens, mask, logprobs, model_logprobs, finished, _ = decoded
    prefix_ids = jnp.where(prefix_mask, prefix_ids, pad_id)
    return GenerationResult(
        tokens=tokens, mask=mask, logprobs=logprobs, model_logprobs=model_logprobs,
        lengths=mask.sum(axis=1, dtype=jnp.int32), finished=finished,
        sequences=jnp.concatenate([prefix_ids, tokens], axis=1),
        sequence_mask=jnp.concatenate([prefix_mask, mask], axis=1),
        completion_mask=jnp.concatenate([jnp.zeros_like(prefix_mask), mask], axis=1),
        cache=cache)


# ---- generate -------------------------------------------------------------------------------
def generate_impl(model, prompt_ids: jax.Array, prompt_mask: jax.Array, keys: jax.Array, *,
                  max_new_tokens: int, sampling: SamplingConfig, eos_ids: tuple[int, ...],
                  pad_id: int, num_samples: int, return_cache: bool) -> GenerationResult:
    """The traced body of `generate` (call inside jit with a merged model; keys [b * num_samples])."""
    ids, mask = left_align(prompt_ids, prompt_mask.astype(bool))
    ids = constrain(jnp.repeat(ids, num_samples, axis=0), ("act_batch", "act_seq"))  # row b*n+j <- prompt b
    mask = constrain(jnp.repeat(mask, num_samples, axis=0), ("act_batch", "act_seq"))
    rows, cols = ids.shape
    # the last new token is never fed back: P + N - 1 slots, allocated in whole attention blocks
    filled = cols + max_new_tokens - 1
    cache = constrain_cache(model.init_cache(rows, slots_for(filled)))
    hidden, cache = model.hidden_states(ids, positions=default_positions(mask), attention_mask=mask, cache=cache)
    logits = model.compute_logits(hidden[:, -1:])[:, 0]  # left-aligned: the last column is real
    decoded = decode(model, constrain_cache(cache), logits, mask.sum(axis=1, dtype=jnp.int32), keys,
                     num_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)
    return assemble(ids, mask, decoded, constrain_cache(decoded[-1].resized(filled)) if return_cache else None,
                    pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id",
                                             "num_samples", "return_cache"))
def _generate_jit(graphdef, state, prompt_ids, prompt_mask, keys, **static):
    return generate_impl(nnx.merge(graphdef, state), prompt_ids, prompt_mask, keys, **static)


def check_eos_ids(eos_ids) -> tuple[int, ...]:
    ids = tuple(eos_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_ids={eos_ids!r}; expected non-negative ints")
    return ids


def generate(model, prompt_ids, prompt_mask, *, key, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids=(), num_samples: int = 1, pad_id: int = 0,
             return_cache: bool = False) -> GenerationResult:
    """Sample up to `max_new_tokens` tokens after each prompt, as one compiled call.

    model: a `topd_jax.models.Qwen` (e.g. from `load_pretrained`); prompt_ids [b, p] int and
    prompt_mask [b, p] (1/True = real token; any padding side, every row needs >= 1 real token).
    key: one PRNG key, or b * num_samples keys (one per output row).
    temperature 0 = greedy; top_p 1 and top_k 0 disable the truncations.
    eos_ids: generation of a row stops after it emits one of these (the stop token is kept,
    mask True); afterwards pad_id, mask False. Stops early once every row has stopped.
    num_samples: rows b * num_samples + j, j < num_samples, are samples for prompt b.
    Returns a `GenerationResult` with rows = b * num_samples, n = max_new_tokens.

    Compiled once per (model structure, shapes, sampling settings, mesh); later calls with the
    same shapes reuse it. Run it inside `jax.set_mesh(mesh)` for a sharded model.
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, bool)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape}: "
                         f"expected the same [batch, prompt_len] shape")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r}; expected an int >= 1")
    sampling = SamplingConfig(float(temperature), float(top_p), top_k)
    keys = row_keys(jnp.asarray(key), prompt_ids.shape[0] * num_samples)
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, prompt_ids, prompt_mask, keys, max_new_tokens=max_new_tokens,
                         sampling=sampling, eos_ids=check_eos_ids(eos_ids), pad_id=int(pad_id),
                         num_samples=num_samples, return_cache=return_cache)
