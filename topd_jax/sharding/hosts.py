"""Host-side helpers for multi-process runs (one JAX process per host, one global mesh).

    fetch(x)                    # np.ndarray of the WHOLE array, on every process
    place_rows(batch, mesh)     # NumPy batch (same on every process) -> global jax.Arrays
    is_main_process()           # process 0 prints and writes files
    any_process(flag)           # True on some process -> True on all (e.g. preemption)

With ``jax.process_count() > 1`` an array sharded over the mesh spans devices of other
processes; ``np.asarray`` on it raises. ``fetch`` gathers it instead. It is a collective when
the array is sharded across processes: every process must call it, in the same order (the
training loop runs the same code on every process, so host pulls there already are).
With one process every helper is the plain NumPy/JAX operation it replaces.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from topd_jax.sharding.rules import logical_to_spec


def is_main_process() -> bool:
    """Whether this process prints, writes metrics/plots/config and exports (process 0)."""
    return jax.process_index() == 0


def fetch(x: Any) -> np.ndarray:
    """``x`` as a NumPy array holding every element, on every process.

    Arrays spanning other processes' devices are all-gathered (a collective: call it on every
    process); fully replicated ones are read from a local copy; anything else is
    ``np.asarray(x)``.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def any_process(value: bool) -> bool:
    """Whether ``value`` is True on any process (a collective with > 1 process: call it on
    every process). E.g. a SIGTERM that reached only some hosts: all must save together."""
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(value, bool))))


def row_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Rows (axis 0) over the ``act_batch`` mesh axes when they divide, the rest whole."""
    axes = ("act_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape)))


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a ``shape`` array that this process's devices hold under ``sharding``:
    a contiguous ``slice``, or every row when they are not contiguous (or replicated)."""
    need = np.zeros(shape[0], bool)
    for index in sharding.addressable_devices_indices_map(shape).values():
        need[index[0]] = True
    rows = np.flatnonzero(need)
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return slice(0, shape[0])


def place_rows(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """The NumPy arrays of ``batch`` (the same global batch on every process, e.g. prompts)
    as global ``jax.Array``s, rows over ``act_batch``; other values (lists of answers) as
    they are. Each process hands over only the rows its own devices hold
    (``jax.make_array_from_process_local_data``).
    """
    out = {}
    for name, x in batch.items():
        if isinstance(x, np.ndarray) and x.ndim >= 1:
            sharding = row_sharding(x.shape, mesh)
            x = jax.make_array_from_process_local_data(sharding, x[process_rows(sharding, x.shape)], x.shape)
        out[name] = x
    return out
