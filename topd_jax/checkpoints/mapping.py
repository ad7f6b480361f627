"""Hugging Face tensor names <-> our parameter paths, as data.

Our weights keep HF's `[out, in]` order and only split the fused head dimension, so each
direction is a reshape between the HF shape (from the config) and ours (from the model):
    to_native(x) = x.reshape(native_shape)     to_hf(x) = x.reshape(hf_shape)
The same table serves Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm); rows apply `when` the
config has the feature. Qwen3-MoE layers swap the MLP rows for the router and the experts:
HF keeps one `[out, in]` tensor per expert, we stack them as `[E, in, out]`, so an expert
row is one slice of our array, transposed (`TensorSpec.expert`):
    to_native: ours[e] = x.T                   to_hf: x = ours[e].T
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from topd_jax.models.config import ModelConfig

Shape = Callable[[ModelConfig], tuple[int, ...]]


def _always(cfg: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str  # HF name; "{i}" = layer index
    ours: str  # our state path, dot-separated; "{i}" = layer index
    hf_shape: Shape
    when: Callable[[ModelConfig], bool] = _always


def _d(c):
    return (c.hidden_size,)


# Top-level tensors.
GLOBAL_ROWS = (
    Row("model.embed_tokens.weight", "embed", lambda c: (c.vocab_size, c.hidden_size)),
    Row("model.norm.weight", "final_norm.weight", _d),
    Row("lm_head.weight", "lm_head", lambda c: (c.vocab_size, c.hidden_size), lambda c: not c.tie_word_embeddings),
)

# Tensors of decoder layer i: "model.layers.{i}." + hf  <->  "layers.{i}." + ours.
LAYER_ROWS = (
    Row("input_layernorm.weight", "attn_norm.weight", _d),
    Row("self_attn.q_proj.weight", "attn.q_proj", lambda c: (c.num_heads * c.head_dim, c.hidden_size)),
    Row("self_attn.k_proj.weight", "attn.k_proj", lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size)),
    Row("self_attn.v_proj.weight", "attn.v_proj", lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size)),
    Row("self_attn.o_proj.weight", "attn.o_proj", lambda c: (c.hidden_size, c.num_heads * c.head_dim)),
    Row("self_attn.q_proj.bias", "attn.q_bias", lambda c: (c.num_heads * c.head_dim,), lambda c: c.qkv_bias),
    Row("self_attn.k_proj.bias", "attn.k_bias", lambda c: (c.num_kv_heads * c.head_dim,), lambda c: c.qkv_bias),
    Row("self_attn.v_proj.bias", "attn.v_bias", lambda c: (c.num_kv_heads * c.head_dim,), lambda c: c.qkv_bias),
    Row("self_attn.q_norm.weight", "attn.q_norm.weight", lambda c: (c.head_dim,), lambda c: c.qk_norm),
    Row("self_attn.k_norm.weight", "attn.k_norm.weight", lambda c: (c.head_dim,), lambda c: c.qk_norm),
    Row("post_attention_layernorm.weight", "mlp_norm.weight", _d),
)

# The MLP of a dense layer.
MLP_ROWS = (
    Row("mlp.gate_proj.weight", "mlp.gate_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    Row("mlp.up_proj.weight", "mlp.up_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    Row("mlp.down_proj.weight", "mlp.down_proj", lambda c: (c.hidden_size, c.intermediate_size)),
)

# The MLP of a MoE layer (ModelConfig.is_moe_layer): the router, then per expert j
# "mlp.experts.{j}." + hf  <->  slice j of "mlp." + ours (transposed).
MOE_ROWS = (
    Row("mlp.gate.weight", "mlp.router", lambda c: (c.num_experts, c.hidden_size)),
)
EXPERT_ROWS = (
    Row("gate_proj.weight", "gate_proj", lambda c: (c.moe_intermediate_size, c.hidden_size)),
    Row("up_proj.weight", "up_proj", lambda c: (c.moe_intermediate_size, c.hidden_size)),
    Row("down_proj.weight", "down_proj", lambda c: (c.hidden_size, c.moe_intermediate_size)),
)

# HF tensors we may meet and deliberately drop: the tied head duplicate some exporters
# write, and the rotary inverse-frequency buffers of old checkpoints (recomputed here).
IGNORABLE = (
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf: str
    path: tuple[str | int, ...]  # nnx state path, e.g. ("layers", 3, "attn", "q_proj")
    hf_shape: tuple[int, ...]
    expert: int | None = None  # set: the HF tensor is ours[path][expert].T (stacked MoE experts)

    def to_native(self, x, native_shape: tuple[int, ...]):
        """HF tensor -> our array (expert rows: the [in, out] slice `expert` of it)."""
        return x.T if self.expert is not None else x.reshape(native_shape)

    def to_hf(self, ours):
        """Our whole array at `path` -> this HF tensor."""
        return ours[self.expert].T if self.expert is not None else ours.reshape(self.hf_shape)


def _path(dotted: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def tensor_table(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a model with `cfg`, in HF file order (embeddings, layers, norm, head).

    The rows of one stacked expert array are consecutive (all experts' gate_proj, then
    up_proj, then down_proj), so a writer needs one stacked array on the host at a time.
    """
    specs = [TensorSpec(GLOBAL_ROWS[0].hf, _path(GLOBAL_ROWS[0].ours), GLOBAL_ROWS[0].hf_shape(cfg))]
    for i in range(cfg.num_layers):
        moe = cfg.is_moe_layer(i)
        for r in LAYER_ROWS + (MOE_ROWS if moe else MLP_ROWS):
            if r.when(cfg):
                specs.append(TensorSpec(f"model.layers.{i}.{r.hf}", _path(f"layers.{i}.{r.ours}"), r.hf_shape(cfg)))
        for r in EXPERT_ROWS if moe else ():
            specs += [TensorSpec(f"model.layers.{i}.mlp.experts.{e}.{r.hf}", _path(f"layers.{i}.mlp.{r.ours}"),
                                 r.hf_shape(cfg), expert=e) for e in range(cfg.num_experts)]
    specs += [TensorSpec(r.hf, _path(r.ours), r.hf_shape(cfg)) for r in GLOBAL_ROWS[1:] if r.when(cfg)]
    return specs


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return True
    return any(p.fullmatch(name) for p in IGNORABLE)


VOCAB_PATHS = (("embed",), ("lm_head",))  # parameters with one row per vocabulary entry
