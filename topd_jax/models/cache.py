"""KVCache: keys/values of every layer in fixed slots, plus a per-slot validity mask.

Attention over a cache is length-aware: a step reads only the key blocks below the filled
length (`index + T`), never the preallocated tail, so a decode step costs O(filled length),
not O(max_len). Each layer's keys are their own [batch, kv_heads, slots, head_dim] buffer
(a tuple over layers): the decode loop updates and reads it in place. A stacked
[layers, ...] array would make XLA copy the whole layer slice (all max_len slots) out of the
stack at every step (measured: decode time grew linearly with max_len).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from topd_jax.models.attention import attention, merge_partials

# Logical axes of one layer's k / v, and of the mask, for sharding with topd_jax.sharding.
CACHE_KV_AXES = ("act_batch", "act_kv_heads", "cache_seq", "head_dim")
CACHE_MASK_AXES = ("act_batch", "cache_seq")
# Key block of the cached attention: blocks at or beyond the filled length are never read.
DEFAULT_BLOCK = 256


def slots_for(length: int, block: int = DEFAULT_BLOCK) -> int:
    """Slots to allocate for `length` tokens: a multiple of `block` once longer than one block,
    so the attention never pads (copies) the cache to whole blocks."""
    return length if length <= block else -(-length // block) * block


@flax.struct.dataclass
class KVCache:
    """Slot-mask KV cache (a pytree; pass it in and out of jitted functions).

    k, v:  tuple over layers of [batch, kv_heads, slots, head_dim]  keys after RoPE (and
           q/k norm); slots next to head_dim, so a layer is attention's operand as it is
    mask:  [batch, slots] bool   slot holds a real token that later queries may attend to
    index: int32 scalar          next slot to write (the same for every row)
    block: static int            key block of the attention over the cache

    Rows may hold gaps (mask False in the middle), e.g. after rollout branching; a query in
    slot i attends to the slots j <= i whose mask is True. Positions (RoPE) are supplied by
    the caller, so slots and positions are independent.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    block: int = flax.struct.field(pytree_node=False, default=DEFAULT_BLOCK)

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
              dtype, block: int = DEFAULT_BLOCK) -> "KVCache":
        shape = (batch, num_kv_heads, max_len, head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32), block=block)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    # ---- the model's use, in order: admit, then per layer write + attend, then advance ----
    def admit(self, mask: jax.Array) -> "KVCache":
        """mask [B, T] of the T new tokens -> slots [index, index + T) of the slot mask."""
        return self.replace(mask=jax.lax.dynamic_update_slice(self.mask, mask.astype(bool), (0, self.index)))

    def write(self, layer: int, k: jax.Array, v: jax.Array) -> "KVCache":
        """k, v [B, T, kv_heads, h] of the new tokens -> slots [index, index + T) of `layer`."""
        def put(buf, new):
            new = new.transpose(0, 2, 1, 3).astype(buf.dtype)  # [B, kv_heads, T, h]
            return jax.lax.dynamic_update_slice(buf, new, (0, 0, self.index, 0))

        k_all, v_all = list(self.k), list(self.v)
        k_all[layer], v_all[layer] = put(k_all[layer], k), put(v_all[layer], v)
        return self.replace(k=tuple(k_all), v=tuple(v_all))

    def attend(self, q: jax.Array, layer: int, *, return_stats: bool = False):
        """Attention of the T new queries q [B, T, heads, h] (in slots index .. index + T - 1)
        over `layer`'s slots; reads only the key blocks below index + T. -> [B, T, heads, h]
        (and the softmax statistics m, l [B, heads, T] with return_stats)."""
        b, t = q.shape[:2]
        q_slots = jnp.broadcast_to(self.index + jnp.arange(t, dtype=jnp.int32), (b, t))
        return attention(q, self.k[layer], self.v[layer], q_slots=q_slots, kv_mask=self.mask,
                         kv_len=self.index + t, impl="chunked", block_q=512, block_kv=self.block,
                         return_stats=return_stats)

    def advance(self, t: int) -> "KVCache":
        return self.replace(index=self.index + t)

    # ---- reshaping -----------------------------------------------------------------------------
    def resized(self, slots: int) -> "KVCache":
        """Cut or zero-pad the slot axis to `slots` (new slots masked)."""
        have = self.max_len
        if have >= slots:
            cut = lambda x: x[:, :, :slots]
            return self.replace(k=tuple(map(cut, self.k)), v=tuple(map(cut, self.v)), mask=self.mask[:, :slots])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, slots - have), (0, 0)))
        return self.replace(k=tuple(map(pad, self.k)), v=tuple(map(pad, self.v)),
                            mask=jnp.pad(self.mask, ((0, 0), (0, slots - have))))

    def map_kv(self, fn) -> "KVCache":
        """`fn` applied to every layer's k and v [B, kv_heads, S, h] (e.g. a sharding constraint)."""
        return self.replace(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)))


@flax.struct.dataclass
class BranchCache:
    """Decode cache of c candidates branching off each of b shared prefixes (rollout branching):
    the prefixes' keys are stored and read once per sequence, never copied per candidate.

    prefix:     KVCache [b rows]      the whole sequences (read-only here); prefix.mask = real tokens
    prefix_end: [b, c] int32          candidate (b, j) sees the prefix slots s < prefix_end[b, j]
                                      whose prefix.mask is True
    suffix:     KVCache [b * c rows]  each candidate's own tokens (row b * c + j), written by decode

    A query of row b * c + j attends over the union of its prefix slots and its suffix slots
    <= its own: two partial attentions merged exactly (`merge_partials`). For the prefix part
    the c candidates of sequence b are c extra queries of row b (q_slots = prefix_end - 1), so
    the prefix blocks below max(prefix_end) are read once per sequence and step.
    The model drives it like a KVCache (admit, write, attend, advance act on the suffix).
    """

    prefix: KVCache
    prefix_end: jax.Array
    suffix: KVCache

    @property
    def index(self) -> jax.Array:
        return self.suffix.index

    def admit(self, mask: jax.Array) -> "BranchCache":
        return self.replace(suffix=self.suffix.admit(mask))

    def write(self, layer: int, k: jax.Array, v: jax.Array) -> "BranchCache":
        return self.replace(suffix=self.suffix.write(layer, k, v))

    def advance(self, t: int) -> "BranchCache":
        return self.replace(suffix=self.suffix.advance(t))

    def attend(self, q: jax.Array, layer: int) -> jax.Array:
        """q [b * c, T, heads, h] -> [b * c, T, heads, h] over prefix + own suffix slots."""
        b, c = self.prefix_end.shape
        rows, t, n, h = q.shape
        q_seq = q.reshape(b, c * t, n, h)  # candidate j's T queries: columns j*T .. j*T + T - 1
        q_slots = jnp.repeat(self.prefix_end.astype(jnp.int32) - 1, t, axis=1)  # [b, c*T]
        p = self.prefix
        out_p, m_p, l_p = attention(q_seq, p.k[layer], p.v[layer], q_slots=q_slots, kv_mask=p.mask,
                                    kv_len=jnp.max(self.prefix_end).astype(jnp.int32), impl="chunked",
                                    block_q=512, block_kv=p.block, return_stats=True)
        to_rows = lambda s: s.reshape(b, n, c, t).transpose(0, 2, 1, 3).reshape(rows, n, t)  # [b,N,c*T] -> [r,N,T]
        out_p = out_p.reshape(rows, t, n, h)
        out_s, m_s, l_s = self.suffix.attend(q, layer, return_stats=True)
        return merge_partials(out_p, to_rows(m_p), to_rows(l_p), out_s, m_s, l_s)[0]
