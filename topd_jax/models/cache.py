"""KVCache: keys/values of every layer in fixed slots, plus a per-slot validity mask."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Logical axes of the cache arrays, for sharding with topd_jax.sharding.
CACHE_KV_AXES = ("cache_layers", "act_batch", "act_kv_heads", "cache_seq", "head_dim")
CACHE_MASK_AXES = ("act_batch", "cache_seq")


@flax.struct.dataclass
class KVCache:
    """Slot-mask KV cache (a pytree; pass it in and out of jitted functions).

    k, v:  [layers, batch, kv_heads, slots, head_dim]  keys after RoPE (and q/k norm); slots
           next to head_dim, so one layer's [batch, kv_heads, slots, head_dim] is the operand
           attention contracts over (no transpose per decode step) and a prefix of slots is a
           contiguous block per head
    mask:  [batch, slots] bool   slot holds a real token that later queries may attend to
    index: int32 scalar          next slot to write (the same for every row)

    Rows may hold gaps (mask False in the middle), e.g. after rollout branching; a query in
    slot i attends to the slots j <= i whose mask is True. Positions (RoPE) are supplied by
    the caller, so slots and positions are independent.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
              dtype) -> "KVCache":
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]
