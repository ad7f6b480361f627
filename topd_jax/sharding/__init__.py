"""Mesh construction and the single logical-axis -> mesh-axis rules table.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shard_model(model, mesh)              # parameters placed by LOGICAL_AXIS_RULES
    with jax.set_mesh(mesh):              # activation constraints become active
        logits = jax.jit(forward)(...)
"""

from topd_jax.sharding.mesh import MESH_AXES, MeshConfig, make_mesh
from topd_jax.sharding.rules import (
    LOGICAL_AXIS_RULES,
    constrain,
    logical_to_spec,
    shard_model,
    state_shardings,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "MeshConfig",
    "constrain",
    "logical_to_spec",
    "make_mesh",
    "shard_model",
    "state_shardings",
]
