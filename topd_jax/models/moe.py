"""Qwen3-MoE sparse block: a router picks top-k of E SwiGLU experts per token; no shared
expert, no capacity limit (no token is ever dropped), as transformers' Qwen3MoeSparseMoeBlock.

    p        = softmax(W_router x)                       [E] per token, float32
    (w, idx) = top_k(p, k);  w = w / sum(w) if norm_topk_prob
    y        = sum_j w_j * W_down[idx_j] (silu(W_gate[idx_j] x) * W_up[idx_j] x)

Two implementations of the expert sum, chosen by `ModelConfig.moe_impl`:
  "ragged": the N*k (token, expert) pairs are sorted by expert and each expert multiplies
            only its own contiguous rows (`jax.lax.ragged_dot`, a grouped matmul): compute
            ~ N*k rows. On GPU/TPU XLA runs a native grouped matmul; on CPU JAX lowers
            ragged_dot to a masked dense product (as slow as "dense").
  "dense":  every expert runs on every token and the outputs are mixed with a [N, E] weight
            matrix that is zero outside the top-k: compute ~ N*E rows. A reference, and the
            layout GSPMD partitions without help.

Stacked expert weights: gate/up [E, d, f], down [E, f, d] (ragged_dot's [group, in, out]);
HF stores them per expert as `mlp.experts.{j}.{gate,up,down}_proj.weight` [out, in].

Sharding (ragged, when a mesh is set with `jax.set_mesh`): a `shard_map` over the axes the
rules give the token dimensions, so every device sorts and multiplies only its own tokens
(sorting a batch-sharded array globally would gather every token on every device). Experts
split over the mesh axes the rules give "expert" (expert parallelism): tokens are replicated
over those axes already, so each device runs its own experts on its tokens and one psum
adds the partial sums; no all-to-all.

Letters: n tokens (batch x seq flattened), d model, f expert hidden, e experts, k top-k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from topd_jax.models.config import ModelConfig
from topd_jax.models.params import ACT, param
from topd_jax.sharding.rules import _active_rules, logical_to_spec

EXPERT_IN = ("expert", "embed", "mlp")  # gate_proj, up_proj [E, d, f]
EXPERT_OUT = ("expert", "mlp", "embed")  # down_proj [E, f, d]


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Router: x [..., d], router [E, d] -> (weights [..., k] float32, experts [..., k] int32).

    Logits and softmax in float32 (HF computes the logits in the model dtype): in bfloat16
    two experts' logits within one bf16 ulp tie and top-k picks arbitrarily, so the routing,
    a discrete decision, would depend on rounding; float32 costs only a [tokens, E] matmul.
    """
    logits = jnp.einsum("...d,ed->...e", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)  # over all E experts, then top-k (HF order)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def experts_dense(x, weights, experts, w_gate, w_up, w_down) -> jax.Array:
    """Reference: all E experts on all tokens, mixed by the top-k weights.

    x [n, d]; weights [n, k] float32; experts [n, k]; w_gate, w_up [E, d, f]; w_down [E, f, d]
    -> [n, d] float32.
    """
    mix = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, w_gate.shape[0], dtype=weights.dtype))  # [n, E]
    gate = jnp.einsum("nd,edf->enf", x, w_gate)  # [E, n, f]
    up = jnp.einsum("nd,edf->enf", x, w_up)
    out = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, w_down)  # [E, n, d]
    # mixing sums k (here E) expert outputs: float32 accumulation, as for the ragged path
    return jnp.einsum("end,ne->nd", out, mix.astype(out.dtype), preferred_element_type=jnp.float32)


def experts_ragged(x, weights, experts, w_gate, w_up, w_down, first_expert=0) -> jax.Array:
    """Sorted-token grouped matmul over the experts held here.

    x [n, d]; weights [n, k] float32; experts [n, k] global ids; w_gate, w_up [El, d, f],
    w_down [El, f, d] hold experts first_expert .. first_expert + El - 1 (all E without
    expert parallelism). -> [n, d] float32, the contribution of these experts only.
    """
    n, k = experts.shape
    held = w_gate.shape[0]
    local = experts.reshape(-1) - first_expert  # [n*k]
    mine = (local >= 0) & (local < held)
    key = jnp.where(mine, local, held)  # other devices' experts sort last, outside every group
    order = jnp.argsort(key, stable=True)  # [n*k] slot j of the sorted rows is pair order[j]
    sizes = jnp.bincount(key, length=held + 1)[:held].astype(jnp.int32)  # [El] rows per expert
    rows = jnp.take(x, order // k, axis=0)  # [n*k, d] token of each pair, grouped by expert
    gate = jax.lax.ragged_dot(rows, w_gate, sizes)  # [n*k, f]
    up = jax.lax.ragged_dot(rows, w_up, sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, sizes)  # [n*k, d]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    out = jnp.take(out, inverse, axis=0).reshape(n, k, -1)  # back to [token, j-th choice, d]
    # rows outside every group are not defined by ragged_dot on every backend: select, don't multiply
    out = jnp.where(mine.reshape(n, k, 1), out, jnp.zeros((), out.dtype))
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype), preferred_element_type=jnp.float32)


def _mesh_axes(spec_entry) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def experts_ragged_sharded(x, weights, experts, w_gate, w_up, w_down) -> jax.Array:
    """`experts_ragged` over [B, T, ...] arrays, in a shard_map when a mesh is set (see the
    module docstring); plain call otherwise. x [B, T, d] -> [B, T, d] float32."""
    b, t, d = x.shape
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return experts_ragged(x.reshape(b * t, d), weights.reshape(b * t, -1), experts.reshape(b * t, -1),
                              w_gate, w_up, w_down).reshape(b, t, d)
    sizes, rules = dict(mesh.shape), _active_rules()
    x_spec = logical_to_spec(ACT, x.shape, sizes, rules)
    token_axes = {a for entry in x_spec for a in _mesh_axes(entry)}
    ep = _mesh_axes(logical_to_spec(("expert",), (w_gate.shape[0],), sizes, rules)[0])
    if token_axes & set(ep):  # rules that shard tokens over the expert axes: no expert parallelism
        ep = ()
    tok_spec = P(*x_spec[:2])  # weights / experts [B, T, k]
    w_spec = P(ep or None, None, None)
    held = w_gate.shape[0] // math.prod(sizes[a] for a in ep)

    def local(x, weights, experts, w_gate, w_up, w_down):
        lb, lt, _ = x.shape
        first = jax.lax.axis_index(ep) * held if ep else 0
        if ep:
            # Tokens are the same on every expert-parallel device but meet device-specific
            # weights. ragged_dot does not insert this cast itself; without it the transpose
            # keeps one device's partial dx instead of summing all of them (wrong gradients).
            x, weights = (jax.lax.pcast(a, ep, to="varying") for a in (x, weights))
        y = experts_ragged(x.reshape(lb * lt, d), weights.reshape(lb * lt, -1), experts.reshape(lb * lt, -1),
                           w_gate, w_up, w_down, first)
        y = jax.lax.psum(y, ep) if ep else y  # each device added its experts' share
        return y.reshape(lb, lt, d)

    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, tok_spec, tok_spec, w_spec, w_spec, w_spec),
                         out_specs=x_spec)(x, weights, experts, w_gate, w_up, w_down)


class MoEBlock(nnx.Module):
    """Router + E stacked SwiGLU experts (HF: model.layers.{i}.mlp of a Qwen3-MoE layer)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.norm_topk_prob, self.impl = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.moe_impl
        self.router = param(rngs, (e, d), ("expert", "embed"), cfg, "normal")  # mlp.gate.weight
        self.gate_proj = param(rngs, (e, d, f), EXPERT_IN, cfg, "normal")  # mlp.experts.{j}.gate_proj.weight^T
        self.up_proj = param(rngs, (e, d, f), EXPERT_IN, cfg, "normal")  # mlp.experts.{j}.up_proj.weight^T
        self.down_proj = param(rngs, (e, f, d), EXPERT_OUT, cfg, "normal")  # mlp.experts.{j}.down_proj.weight^T

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d] -> [B, T, d] in x.dtype. Padding tokens are routed too (their outputs
        are ignored downstream); tokens never interact, so batch composition cannot change a
        token's output."""
        dt = x.dtype
        weights, experts = route(x, self.router[...], self.top_k, self.norm_topk_prob)  # [B, T, k]
        w = tuple(p[...].astype(dt) for p in (self.gate_proj, self.up_proj, self.down_proj))
        if self.impl == "dense":
            b, t, d = x.shape
            y = experts_dense(x.reshape(b * t, d), weights.reshape(b * t, -1), experts.reshape(b * t, -1), *w)
            return y.reshape(b, t, d).astype(dt)
        return experts_ragged_sharded(x, weights, experts, *w).astype(dt)
