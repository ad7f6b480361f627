"""Shared scoring helpers: teacher-forced forwards, token alignment, per-token terms.

Alignment convention (used by every algorithm): arrays over a sequence ``[rows, L]`` are
**token-indexed**. Entry ``t`` of a per-token quantity belongs to token ``ids[:, t]`` and is
computed from the model's output at position ``t - 1`` (the logits at position ``i``
predict token ``i + 1``). ``to_token_index`` does that shift once; entry 0 (no context) is
always 0 / masked. Completion masks from ``rollout`` are token-indexed already, so
``mask = completion_mask`` marks exactly the tokens the loss is taken on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from topd_jax.losses import chunked_token_divergence, token_divergence
from topd_jax.models import default_positions


def to_token_index(x: jax.Array) -> jax.Array:
    """Position-indexed ``[rows, L, ...]`` -> token-indexed: ``out[:, t] = x[:, t - 1]``,
    ``out[:, 0] = 0``."""
    pad = [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x[:, :-1], pad)


def hidden_states(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Teacher-forced final hidden states ``[rows, L, d]`` (positions = cumsum(mask) - 1)."""
    mask = mask.astype(bool)
    hidden, _ = model.hidden_states(ids, positions=default_positions(mask), attention_mask=mask)
    return hidden


def token_divergences(student_hidden, student_head, teacher_hidden, teacher_head, mask, *,
                      kind: str, beta: float, temperature: float, chunk: int | None) -> jax.Array:
    """Per-token divergence ``[rows, L]``, token-indexed, 0 off ``mask``.

    student_hidden/teacher_hidden ``[rows, L, d_s|d_t]`` position-indexed; heads ``[d, V]``.
    ``chunk`` None: whole logits (small vocabularies); an int: ``chunked_token_divergence``
    with that many positions per chunk, so ``[rows, L, V]`` of both models is never live.
    """
    hs, ht = to_token_index(student_hidden), to_token_index(teacher_hidden)
    if chunk is not None:
        return chunked_token_divergence(hs, student_head, ht, teacher_head, mask, chunk_size=chunk,
                                        kind=kind, beta=beta, temperature=temperature)
    ls = jnp.einsum("btd,dv->btv", hs, student_head.astype(hs.dtype), preferred_element_type=jnp.float32)
    lt = jnp.einsum("btd,dv->btv", ht, teacher_head.astype(ht.dtype), preferred_element_type=jnp.float32)
    return token_divergence(ls, lax.stop_gradient(lt), mask, kind=kind, beta=beta, temperature=temperature)


def _per_position(fn, hidden: jax.Array, head: jax.Array, ids: jax.Array, *, temperature: float,
                  chunk: int | None):
    """Apply ``fn(logits [B, c, V] float32, ids [B, c]) -> pytree of [B, c]`` to the
    token-indexed logits, ``chunk`` positions at a time (rematerialised) when given, so that
    ``[rows, L, V]`` is never live. Returns the pytree of ``[rows, L]``."""
    h = to_token_index(hidden).astype(jnp.float32)
    w = head.astype(jnp.float32)

    def on_chunk(h_c, ids_c):
        return fn(jnp.einsum("bcd,dv->bcv", h_c, w) / temperature, ids_c)  # float32: stable softmax

    rows, length = ids.shape
    if chunk is None or chunk >= length:
        return on_chunk(h, ids)
    n = -(-length // chunk)
    pad = n * chunk - length
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(rows, n, chunk, -1).swapaxes(0, 1)
    ip = jnp.pad(ids, ((0, 0), (0, pad))).reshape(rows, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda c, xs: (c, on_chunk(*xs)), prevent_cse=False)
    _, out = lax.scan(body, None, (hp, ip))
    return jax.tree.map(lambda o: o.swapaxes(0, 1).reshape(rows, n * chunk)[:, :length], out)


def _picked_logprob(logits, ids):
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0] - lse


def token_logprobs(hidden: jax.Array, head: jax.Array, ids: jax.Array, mask: jax.Array, *,
                   temperature: float = 1.0, chunk: int | None = None) -> jax.Array:
    """``log p(ids[:, t] | ids[:, :t])`` token-indexed ``[rows, L]`` float32, 0 off ``mask``.

    hidden ``[rows, L, d]`` position-indexed; head ``[d, V]``. With ``chunk`` the sequence is
    scanned ``chunk`` positions at a time (rematerialised), never holding ``[rows, L, V]``.
    """
    out = _per_position(_picked_logprob, hidden, head, ids, temperature=temperature, chunk=chunk)
    return jnp.where(mask.astype(bool), out, 0.0)


def token_logprobs_entropy(hidden: jax.Array, head: jax.Array, ids: jax.Array, mask: jax.Array, *,
                           temperature: float = 1.0, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(log p(y_t), H_t)``, both token-indexed ``[rows, L]`` float32 and 0 off ``mask``:
    the log-prob of each token and the entropy of the distribution it was drawn from."""

    def fn(logits, ids_c):
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp_all, ids_c[..., None], axis=-1)[..., 0]
        # p log p with p = 0 where log p = -inf: zero it explicitly (0 * -inf = NaN).
        p = jnp.exp(logp_all)
        entropy = -jnp.sum(jnp.where(p > 0, p * logp_all, 0.0), axis=-1)
        return picked, entropy

    logp, entropy = _per_position(fn, hidden, head, ids, temperature=temperature, chunk=chunk)
    valid = mask.astype(bool)
    return jnp.where(valid, logp, 0.0), jnp.where(valid, entropy, 0.0)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward_jit(graphdef, state, ids, mask, row_groups):
    if row_groups == 1:
        return hidden_states(nnx.merge(graphdef, state), ids, mask)
    rows, length = ids.shape
    # Strided groups (group j = rows j, j + row_groups, ...): each group spreads over every
    # device the rows are sharded on, so every device runs 1 / row_groups of its rows at a time.
    ids_g = ids.reshape(rows // row_groups, row_groups, length).swapaxes(0, 1)
    mask_g = mask.reshape(rows // row_groups, row_groups, length).swapaxes(0, 1)
    out = jax.lax.map(lambda x: hidden_states(nnx.merge(graphdef, state), *x), (ids_g, mask_g))
    return out.swapaxes(0, 1).reshape(rows, length, -1)


def forward_hidden(model, ids: jax.Array, mask: jax.Array, *, row_groups: int = 1) -> jax.Array:
    """Jitted ``hidden_states`` of a (frozen) model: ``[rows, L, d]``. ``row_groups`` > 1 runs
    the forward on that many groups of rows one after another (``lax.map``), so a layer's
    activations are live for rows / row_groups rows only (the warm-up's long teacher rows)."""
    rows = ids.shape[0]
    if row_groups < 1 or rows % row_groups:
        raise ValueError(f"row_groups={row_groups} must be >= 1 and divide the {rows} rows of ids {ids.shape}")
    graphdef, state = nnx.split(model)
    return _forward_jit(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), row_groups)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("temperature", "chunk"))
def _score_jit(per_token, graphdef, state, ids, mask, target_mask, *, temperature, chunk):
    """``per_token(hidden, head, ids, target_mask, ...)`` under the model, compiled once per function."""
    model = nnx.merge(graphdef, state)
    return per_token(hidden_states(model, ids, mask), model.lm_head_weight(), ids, target_mask,
                     temperature=temperature, chunk=chunk)


def _score(per_token, model, ids, mask, target_mask, temperature, chunk):
    graphdef, state = nnx.split(model)
    return _score_jit(per_token, graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool),
                      jnp.asarray(target_mask, bool), temperature=float(temperature), chunk=chunk)


def score_tokens(model, ids: jax.Array, mask: jax.Array, target_mask: jax.Array, *,
                 temperature: float = 1.0, chunk: int | None = None) -> jax.Array:
    """Jitted ``token_logprobs`` of ``ids`` under ``model`` (no gradient): ``[rows, L]``."""
    return _score(token_logprobs, model, ids, mask, target_mask, temperature, chunk)


def score_tokens_entropy(model, ids: jax.Array, mask: jax.Array, target_mask: jax.Array, *,
                         temperature: float = 1.0, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Jitted ``token_logprobs_entropy`` under ``model`` (no gradient): two ``[rows, L]``."""
    return _score(token_logprobs_entropy, model, ids, mask, target_mask, temperature, chunk)
