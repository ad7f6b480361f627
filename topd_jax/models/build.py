"""Random initialisation of a `Qwen` in one compiled call, optionally straight into shardings."""

from __future__ import annotations

import jax
from flax import nnx

from topd_jax.models.config import ModelConfig
from topd_jax.models.qwen import Qwen
from topd_jax.sharding.rules import LOGICAL_AXIS_RULES, Rules, state_shardings


def init_model(config: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
               rules: Rules = LOGICAL_AXIS_RULES) -> Qwen:
    """`Qwen(config, rngs=nnx.Rngs(seed))`, but jitted: one compile instead of one per op,
    and with `mesh` each parameter is created directly in its sharding (never whole on one
    device). Same values as the eager constructor."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(seed))))
    shardings = state_shardings(abstract, mesh, rules) if mesh is not None else None

    @jax.jit
    def init():
        state = nnx.state(Qwen(config, rngs=nnx.Rngs(seed)))
        return state if shardings is None else jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())
