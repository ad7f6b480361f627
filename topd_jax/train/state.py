"""The train state: student params, optimizer state, counters and PRNG key, as one pytree.

    state, shardings = create_train_state(student, tx, mesh, seed=cfg.seed)
    model = nnx.merge(graphdef, state.params)      # the student, for sampling / export

Every array is placed by the logical-axis rules (``topd_jax.sharding``): parameters by
their own axis names, optimizer moments like the parameter they track, scalars
replicated. The teacher is never part of it (frozen, outside the optimizer).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from topd_jax.sharding import state_shardings


@flax.struct.dataclass
class TrainState:
    """step       [] int32   iterations run (including skipped non-finite ones)
    opt_steps     [] int32   optimizer updates applied (drives the lr schedule)
    params        nnx.State  student parameters (pytree of arrays)
    opt_state     optax state
    rng           [2] uint32 raw key data of the run's base key (``jax.random.key_data``)
    """
    step: jax.Array
    opt_steps: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def key(self) -> jax.Array:
        """The typed base key; per-step keys are ``fold_in(key, step)``."""
        return jax.random.wrap_key_data(self.rng)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, param_shardings: Any, params: Any,
                        mesh: Mesh) -> Any:
    """Moments shard like their parameter; counts and other non-parameter leaves replicate."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def train_state_shardings(tx, params: Any, mesh: Mesh) -> TrainState:
    """A ``TrainState`` of ``NamedSharding``s for ``params`` (arrays or abstract)."""
    p_sh = state_shardings(params, mesh)
    rep = replicated(mesh)
    return TrainState(step=rep, opt_steps=rep, params=p_sh,
                      opt_state=opt_state_shardings(tx, p_sh, params, mesh), rng=rep)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int, copy: bool = True) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Split ``model``, shard its params over ``mesh`` and initialise the optimizer there.

    Returns ``(graphdef, state, shardings)``; ``shardings`` is the ``TrainState`` of
    ``NamedSharding``s the jitted step uses for its state input and output. The step donates
    the state: with ``copy=False`` the model's own arrays may be reused (and then freed by
    the first step), so only pass it when the model is not used afterwards.
    """
    graphdef, params = nnx.split(model)
    shardings = train_state_shardings(tx, params, mesh)
    if copy:
        params = jax.tree.map(jnp.copy, params)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    rep = shardings.step
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                       opt_steps=jax.device_put(jnp.zeros((), jnp.int32), rep),
                       params=params, opt_state=opt_state,
                       rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep))
    return graphdef, state, shardings
