"""Qwen2 / Qwen2.5 / Qwen3 (dense) and Qwen3-MoE causal LMs in Flax NNX.

The contract (shared with rollout and training):

    model = Qwen(ModelConfig.preset("qwen3-4b"), rngs=nnx.Rngs(0))   # or load_pretrained(dir)
    logits = model(input_ids, attention_mask=mask)                    # [B, T, V] float32
    hidden, cache = model.hidden_states(ids, positions=pos, attention_mask=mask, cache=cache)
    logits = model.compute_logits(hidden)        # == hidden @ model.lm_head_weight()
    cache = model.init_cache(batch, max_len)     # KVCache(k, v: per layer [B,Hkv,S,Dh], mask [B,S], index)
"""

from topd_jax.models.build import init_model, reconfigure
from topd_jax.models.cache import CACHE_KV_AXES, CACHE_MASK_AXES, KVCache
from topd_jax.models.config import PRESETS, ModelConfig
from topd_jax.models.qwen import Qwen, default_positions


def load_pretrained(path, *, dtype: str = "float32", param_dtype: str | None = None, mesh=None, **kwargs) -> Qwen:
    """A `Qwen` from a local HF directory (config.json + *.safetensors) or a native checkpoint.

    dtype: compute dtype; param_dtype: storage dtype (default: = dtype); mesh: shard the
    parameters onto it while loading (tensor by tensor). Extra keyword arguments go to
    `topd_jax.checkpoints.load_pretrained` (rules, vocab_size).
    """
    from topd_jax.checkpoints import load_pretrained as _load  # models must not import checkpoints at import time

    return _load(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **kwargs)


__all__ = [
    "CACHE_KV_AXES",
    "CACHE_MASK_AXES",
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "Qwen",
    "default_positions",
    "init_model",
    "load_pretrained",
    "reconfigure",
]
