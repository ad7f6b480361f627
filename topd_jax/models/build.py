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


# Config fields that change how the forward pass runs, not the parameters.
RUNTIME_FIELDS = ("moe_impl", "remat", "attention", "attention_block_q", "attention_block_kv")


def reconfigure(model: Qwen, **changes) -> Qwen:
    """`model`'s parameters (shared, not copied) under its config with runtime fields changed,
    e.g. `reconfigure(load_pretrained(d), moe_impl="dense")`. Only `RUNTIME_FIELDS`. Call it
    outside `jax.set_mesh` (it traces the model abstractly, as `init_model` does)."""
    bad = sorted(set(changes) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"reconfigure: {bad} change the parameters; only {RUNTIME_FIELDS} can change")
    config = model.config.replace(**changes)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))
