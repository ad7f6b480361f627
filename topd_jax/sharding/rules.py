"""The ONE table mapping logical axis names to mesh axes, and the functions that apply it.

Model code names every parameter and activation dimension logically (``"embed"``,
``"heads"``, ``"act_batch"`` ...). Only this table says which mesh axis (``data``, ``fsdp``,
``tensor``) shards it, so changing the parallelism means changing the rules, never the model.

Parameters and activations use different names (MaxText convention): a weight's ``embed``
dimension is FSDP-sharded, while the ``embed`` dimension of an activation stays whole
because the batch already uses the ``fsdp`` axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# logical name -> mesh axes. Unlisted names, and `None`, mean "replicated".
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # --- parameters -----------------------------------------------------------------
    ("vocab", "tensor"),        # embedding / LM-head rows
    ("embed", "fsdp"),          # model dimension of every weight: FSDP (ZeRO-3 style)
    ("heads", "tensor"),        # query heads: Megatron tensor parallelism
    ("kv_heads", "tensor"),     # key/value heads
    ("head_dim", None),
    ("mlp", "tensor"),          # SwiGLU hidden dimension
    # MoE experts: expert parallelism on "tensor". The expert index is, like "mlp", a hidden
    # dimension of the FFN (the block is an MLP of width E*f), so it takes the same axis: each
    # device keeps whole experts (f=768 in Qwen3-30B-A3B is too narrow to split further), the
    # weights' embed dim stays FSDP-sharded, tokens are already replicated over "tensor", and
    # the outputs are psum'd over it as an MLP's are. On "fsdp" it would collide with the
    # embed dim and with the token sharding. When E does not divide, "mlp" is the fallback.
    ("expert", "tensor"),
    ("norm", None),             # RMSNorm scales (tiny; replicate)
    # --- activations ----------------------------------------------------------------
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # --- KV cache ---------------------------------------------------------------------
    ("cache_layers", None),
    ("cache_seq", None),
)


def _rule_lookup(rules: Rules) -> dict[str, MeshAxes]:
    table: dict[str, MeshAxes] = {}
    for name, axes in rules:
        table.setdefault(name, axes)  # first match wins, as in flax/MaxText
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: dict[str, int],
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`.

    A mesh axis is dropped (that dimension is left replicated on it) when it is missing
    from the mesh, has size 1, was already used by an earlier dimension, or does not
    divide the dimension (e.g. 2 KV heads on a tensor axis of 4). This keeps one rules
    table valid for every model size and mesh instead of failing on small models.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match array shape {tuple(shape)}")
    table = _rule_lookup(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, dim in zip(logical_axes, shape):
        axes = table.get(name) if name is not None else None
        candidates = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept: list[str] = []
        size = 1
        for axis in candidates:
            n = mesh_shape.get(axis, 1)
            if n == 1 or axis in used or dim % (size * n) != 0:
                continue
            kept.append(axis)
            size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _active_rules() -> Rules:
    """Rules set with `flax.nnx.logical_axis_rules(...)` if any, else our table."""
    return tuple(flax_spmd.get_logical_axis_rules()) or LOGICAL_AXIS_RULES


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op unless a mesh is set (`jax.set_mesh`).

    Override the table for a block with `with flax.nnx.logical_axis_rules(rules): ...`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape), _active_rules())
    return jax.lax.with_sharding_constraint(x, spec)


def _logical_axes_of(path: tuple, var: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
    names = var.get_metadata().get("out_sharding")
    if names is None:
        if ndim == 0:
            return ()
        raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical axis names (out_sharding)")
    return tuple(names)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> nnx.State:
    """A State of `NamedSharding`s (same structure as `state`) from each Variable's logical axes.

    `state` may be abstract (from `nnx.eval_shape`) or concrete.
    """
    mesh_shape = dict(mesh.shape)

    def one(path, var):
        value = var.get_value()
        spec = logical_to_spec(_logical_axes_of(path, var, value.ndim), value.shape, mesh_shape, rules)
        return var.replace(NamedSharding(mesh, spec))

    return nnx.map_state(one, state)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> nnx.Module:
    """Move every parameter of `model` into the sharding its logical axes ask for (in place).

    Returns the model for chaining.
    """
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model
