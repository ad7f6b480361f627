"""Parameter creation shared by the dense and MoE blocks: values plus logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.models.config import ModelConfig

ACT = ("act_batch", "act_seq", "act_embed")  # logical axes of the residual stream [B, T, D]


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
          init: str) -> nnx.Param:
    """A parameter with logical axis names; `init` is "normal" (std 0.02, as HF), "ones" or "zeros"."""
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, cfg.weight_dtype)
    # eager_sharding=False: the names are logical, resolved by topd_jax.sharding, not mesh axes.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)
