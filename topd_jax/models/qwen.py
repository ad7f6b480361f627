"""Qwen2 / Qwen2.5 / Qwen3 (dense and MoE) decoder in Flax NNX, written to read like the math.

    h_0     = E[ids]
    a_l     = h_l + Attn(RMSNorm(h_l))              grouped-query attention with RoPE
    h_{l+1} = a_l + W_down (silu(W_gate x) * W_up x),   x = RMSNorm(a_l)
              (Qwen3-MoE layers: a_l + sum of the top-k routed experts' SwiGLU, models/moe.py)
    logits  = RMSNorm(h_L) @ W_head^T               W_head = E when embeddings are tied

Weights keep Hugging Face's `[out, in]` order, only split per head, so conversion is a
reshape (checkpoints/mapping.py holds the name table); the stacked MoE expert weights are
the exception, `[experts, in, out]` as `jax.lax.ragged_dot` takes them (a transpose). Every parameter carries logical
axis names (`out_sharding` metadata) that topd_jax.sharding maps to the mesh.

Letters in einsums: b batch, t query positions, s key slots, d model, n query heads,
k kv heads, g query heads per kv head, h head_dim, f mlp hidden, v vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.models.attention import attention
from topd_jax.models.cache import DEFAULT_BLOCK, KVCache
from topd_jax.models.config import ModelConfig
from topd_jax.models.moe import MoEBlock
from topd_jax.models.params import ACT
from topd_jax.models.params import param as _param
from topd_jax.sharding.rules import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}



class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps); statistics in float32 for stability."""

    def __init__(self, dim: int, cfg: ModelConfig, axis: str = "norm"):
        self.eps = cfg.rms_norm_eps
        self.weight = _param(None, (dim,), (axis,), cfg, "ones")  # HF: *norm.weight [dim]

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of the rotary angles: positions [B, T] -> two [B, T, head_dim/2] float32.

    Angles in float32 (as HF): position * theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [h/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, h/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (x_i, x_{i+h/2}) by the angle table ("rotate_half" layout of HF Qwen).

    x [B, T, heads, h]; cos, sin [B, T, h/2]. Computed in float32, returned in x.dtype.
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, heads, h/2] each
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Visibility(NamedTuple):
    """Which key slots each query sees (models/attention.py): slot s is visible to query (b, t)
    iff s <= q_slots[b, t] and kv_mask[b, s] (and s < kv_len when given).

    q_slots [B, T] int32; kv_mask [B, S] bool; kv_len int32 scalar or None (no slot at or past it
    is read: a decode step costs the filled length)."""

    q_slots: jax.Array
    kv_mask: jax.Array
    kv_len: jax.Array | None


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.impl, self.block_q, self.block_kv = cfg.attention, cfg.attention_block_q, cfg.attention_block_kv
        self.q_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg, "normal")  # self_attn.q_proj.weight
        kv_axes = ("kv_heads", "head_dim", "embed")
        self.k_proj = _param(rngs, (k, h, d), kv_axes, cfg, "normal")  # self_attn.k_proj.weight
        self.v_proj = _param(rngs, (k, h, d), kv_axes, cfg, "normal")  # self_attn.v_proj.weight
        self.o_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg, "normal")  # self_attn.o_proj.weight
        if cfg.qkv_bias:  # Qwen2 / 2.5
            self.q_bias = _param(None, (n, h), ("heads", "head_dim"), cfg, "zeros")  # self_attn.q_proj.bias
            self.k_bias = _param(None, (k, h), ("kv_heads", "head_dim"), cfg, "zeros")  # self_attn.k_proj.bias
            self.v_bias = _param(None, (k, h), ("kv_heads", "head_dim"), cfg, "zeros")  # self_attn.v_proj.bias
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim of every query / key head
            self.q_norm = RMSNorm(h, cfg, axis="head_dim")  # self_attn.q_norm.weight
            self.k_norm = RMSNorm(h, cfg, axis="head_dim")  # self_attn.k_norm.weight
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, *, cos: jax.Array, sin: jax.Array, visible: Visibility,
                 cache: KVCache | None, layer: int) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, d] -> [B, T, d]. With a cache, this layer's keys/values of the T new tokens
        are written to slots [index, index + T) of cache.k[layer], and attention reads the slots
        below index + T only (KVCache.attend)."""
        dt = x.dtype
        q = jnp.einsum("btd,nhd->btnh", x, self.q_proj[...].astype(dt))  # [B, T, n, h]
        k = jnp.einsum("btd,khd->btkh", x, self.k_proj[...].astype(dt))  # [B, T, k, h]
        v = jnp.einsum("btd,khd->btkh", x, self.v_proj[...].astype(dt))  # [B, T, k, h]
        if self.q_bias is not None:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "head_dim"))
        if cache is not None:  # write the new keys, attend over the filled blocks only (models/cache.py)
            cache = cache.write(layer, k, v)
            out = cache.attend(q, layer).astype(dt)  # [B, T, n, h]
        else:  # self-attention over the T tokens (q_slots = arange(T)): fused kernels apply
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, k, T, h]
            out = attention(q, k, v, q_slots=visible.q_slots, kv_mask=visible.kv_mask, kv_len=visible.kv_len,
                            impl=self.impl, block_q=self.block_q, block_kv=self.block_kv,
                            layout="causal")  # [B, T, n, h]
        return jnp.einsum("btnh,dnh->btd", out, self.o_proj[...].astype(dt)), cache  # [B, T, d]


class MLP(nnx.Module):
    """SwiGLU: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (f, d), ("mlp", "embed"), cfg, "normal")  # mlp.gate_proj.weight
        self.up_proj = _param(rngs, (f, d), ("mlp", "embed"), cfg, "normal")  # mlp.up_proj.weight
        self.down_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg, "normal")  # mlp.down_proj.weight

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = jnp.einsum("btd,fd->btf", x, self.gate_proj[...].astype(dt))  # [B, T, f]
        up = jnp.einsum("btd,fd->btf", x, self.up_proj[...].astype(dt))  # [B, T, f]
        hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return jnp.einsum("btf,df->btd", hidden, self.down_proj[...].astype(dt))  # [B, T, d]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg)  # input_layernorm.weight
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg)  # post_attention_layernorm.weight
        # Qwen3-MoE: routed experts in the layers cfg.is_moe_layer picks, SwiGLU elsewhere
        self.mlp = MoEBlock(cfg, rngs=rngs) if cfg.is_moe_layer(index) else MLP(cfg, rngs=rngs)

    def __call__(self, x, *, cos, sin, visible, cache, layer):
        """x [B, T, d] -> [B, T, d] (pre-norm residual block)."""
        attn_out, cache = self.attn(self.attn_norm(x), cos=cos, sin=sin, visible=visible, cache=cache, layer=layer)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ACT), cache


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row: cumsum(mask) - 1, clipped at 0.

    Right padding: 0..n-1 then n-1 repeated; left padding: 0 .. 0 then 0..n-1. [B, T] int32.
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Qwen(nnx.Module):
    """Qwen2/2.5/3 and Qwen3-MoE causal LM. See the model contract in topd_jax/models/__init__.py."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        v, d = cfg.vocab_size, cfg.hidden_size
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), cfg, "normal")  # model.embed_tokens.weight
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])  # model.layers.{i}
        self.final_norm = RMSNorm(cfg.hidden_size, cfg)  # model.norm.weight
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (v, d), ("vocab", "embed"), cfg, "normal")  # lm_head.weight [V, d]

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] -> logits [B, T, V] float32. mask: 1/True = real token."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if positions is None:
            positions = default_positions(attention_mask)
        hidden, _ = self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask)
        return self.compute_logits(hidden)

    def hidden_states(self, input_ids: jax.Array, *, positions: jax.Array, attention_mask: jax.Array,
                      cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, d] in the compute dtype, and the updated cache.

        No cache: causal attention among the T tokens, keys masked by attention_mask [B, T].
        With cache: the T tokens go to slots [index, index + T) of every row; mask of those
        slots := attention_mask; query in slot i sees slots j <= i with mask True; index += T.
        The caller keeps index + T <= cache.max_len (out-of-range writes are clamped by XLA).
        """
        cfg = self.config
        t = input_ids.shape[1]
        mask = attention_mask.astype(bool)  # [B, T]
        h = constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.compute_dtype), ACT)  # [B, T, d]
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, h/2]
        if cache is None:  # causal among the T tokens: query t sits in slot t
            visible = Visibility(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), mask.shape), mask, None)
        else:
            cache = cache.admit(mask)  # no dense [B, T, S] mask: the cache's attention reads slot rules
            visible = None
        for i, layer in enumerate(self.layers):
            h, cache = self._layer(layer, h, cos=cos, sin=sin, visible=visible, cache=cache, index=i)
        if cache is not None:
            cache = cache.advance(t)
        return self.final_norm(h), cache

    def _layer(self, layer, h, *, cos, sin, visible, cache, index):
        def run(layer, h, cos, sin, visible, cache):
            return layer(h, cos=cos, sin=sin, visible=visible, cache=cache, layer=index)

        if self.config.remat != "none":
            run = nnx.remat(run, policy=_REMAT_POLICIES[self.config.remat])
        return run(layer, h, cos, sin, visible, cache)

    # ---- LM head ------------------------------------------------------------------------------
    def _head_vd(self) -> jax.Array:
        return (self.embed if self.lm_head is None else self.lm_head)[...]  # [V, d]

    def lm_head_weight(self) -> jax.Array:
        """[d, V]: the tied embedding transposed, or the separate head."""
        return self._head_vd().T

    def embedding_table(self) -> jax.Array:
        """[V, d]."""
        return self.embed[...]

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, d] -> logits [B, T, V] float32 (inputs in compute dtype, float32 accumulation)."""
        w = self._head_vd().astype(hidden.dtype)
        logits = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))

    # ---- cache ----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None, block: int = DEFAULT_BLOCK) -> KVCache:
        """Empty cache: all slots masked out, index 0. dtype defaults to the compute dtype;
        block: key block of the attention over it (blocks past the filled length are not read)."""
        cfg = self.config
        return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                             cfg.compute_dtype if dtype is None else dtype, block=block)
