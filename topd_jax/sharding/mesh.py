"""Device mesh from a small config: axes (data, fsdp, tensor), plus multi-host start-up."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes; at most one may be -1 (= all remaining devices).

    data:   pure data parallelism (parameters replicated).
    fsdp:   data parallelism with parameters/optimizer state sharded (ZeRO-3).
    tensor: Megatron-style tensor parallelism over heads / MLP / vocab.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) sizes for `num_devices` devices."""
        sizes = (self.data, self.fsdp, self.tensor)
        unknown = [i for i, s in enumerate(sizes) if s == -1]
        if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
        known = math.prod(s for s in sizes if s != -1)
        if unknown:
            if num_devices % known:
                raise ValueError(
                    f"{num_devices} devices cannot be split with {dict(zip(MESH_AXES, sizes))}: "
                    f"{num_devices} is not a multiple of {known}"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} available"
            )
        return sizes  # type: ignore[return-value]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") in Auto mode (classic GSPMD propagation).

    `jax.make_mesh` defaults to Explicit axes in JAX 0.10; we want Auto so that sharding
    annotations on parameters propagate through unannotated model code.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
