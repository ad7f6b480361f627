"""Multi-host start-up: ``jax.distributed.initialize`` arguments resolved from the environment.

    args = resolve_distributed(os.environ, coordinator=..., num_processes=..., process_id=...)
    initialize_distributed(args)     # once, before anything touches devices; no-op if None

Sources, first match wins:
1. explicit: the ``distributed.*`` config fields, else ``TOPD_COORDINATOR`` (host:port),
   ``TOPD_NUM_PROCESSES``, ``TOPD_PROCESS_ID``. All three or none; one process -> no-op.
2. SLURM (``SLURM_NTASKS`` > 1): process id ``SLURM_PROCID``, coordinator the first host of
   ``SLURM_JOB_NODELIST`` on port ``TOPD_COORDINATOR_PORT`` (default 12345). Our SLURM
   script runs one task per node, so each process keeps all of its node's GPUs.
3. TPU pod (``TPU_WORKER_HOSTNAMES`` lists more than one host) or ``TOPD_DISTRIBUTED=auto``:
   ``jax.distributed.initialize()`` with no arguments (JAX's own cluster auto-detection).
4. otherwise: a single-process run, nothing to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

DEFAULT_PORT = 12345


class DistributedConfigError(ValueError):
    """Inconsistent multi-host settings; the message names the variable and its value."""


@dataclass(frozen=True)
class DistributedArgs:
    """Keyword arguments for ``jax.distributed.initialize`` (``None``: let JAX detect)."""
    source: Literal["explicit", "slurm", "auto"]
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def kwargs(self) -> dict:
        return dict(coordinator_address=self.coordinator_address,
                    num_processes=self.num_processes, process_id=self.process_id)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``.

    Zero padding of the range start is kept (SLURM writes ``node[001-004]``)."""
    m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise DistributedConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host name")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not first.isdigit():
        raise DistributedConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {ranges!r}")
    return prefix + first


def _int(name: str, value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name}={value!r}: not an integer") from None


def _explicit(coordinator, num, pid) -> DistributedArgs | None:
    given = {"coordinator": coordinator, "num_processes": num, "process_id": pid}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedConfigError(
            f"explicit multi-host setup needs coordinator, num_processes and process_id "
            f"(config distributed.* or TOPD_COORDINATOR / TOPD_NUM_PROCESSES / TOPD_PROCESS_ID); "
            f"missing {', '.join(missing)} (given {given})")
    if num < 1 or not 0 <= pid < num:
        raise DistributedConfigError(f"process_id={pid} must be in [0, num_processes={num})")
    if not re.fullmatch(r"[^:\s]+:\d+", coordinator):
        raise DistributedConfigError(f"coordinator={coordinator!r}: expected host:port")
    if num == 1:
        return None
    return DistributedArgs("explicit", coordinator, num, pid)


def resolve_distributed(env: Mapping[str, str], *, coordinator: str | None = None,
                        num_processes: int | None = None,
                        process_id: int | None = None) -> DistributedArgs | None:
    """The ``jax.distributed.initialize`` arguments for this process, or None (single process).

    Pure: reads only ``env`` and the given config values (see the module docstring)."""
    coordinator = coordinator if coordinator is not None else (env.get("TOPD_COORDINATOR") or None)
    if num_processes is None:
        num_processes = _int("TOPD_NUM_PROCESSES", env.get("TOPD_NUM_PROCESSES"))
    if process_id is None:
        process_id = _int("TOPD_PROCESS_ID", env.get("TOPD_PROCESS_ID"))
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        return _explicit(coordinator, num_processes, process_id)
    mode = env.get("TOPD_DISTRIBUTED", "")
    if mode not in ("", "auto", "off"):
        raise DistributedConfigError(f"TOPD_DISTRIBUTED={mode!r}: expected auto, off or unset")
    if mode == "off":
        return None
    ntasks = _int("SLURM_NTASKS", env.get("SLURM_NTASKS"))
    if ntasks is not None and ntasks > 1 and mode != "auto":
        pid = _int("SLURM_PROCID", env.get("SLURM_PROCID"))
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if pid is None or not nodelist:
            raise DistributedConfigError(f"SLURM_NTASKS={ntasks} but SLURM_PROCID={pid!r} / "
                                         f"SLURM_JOB_NODELIST={nodelist!r} is unset")
        port = _int("TOPD_COORDINATOR_PORT", env.get("TOPD_COORDINATOR_PORT")) or DEFAULT_PORT
        return DistributedArgs("slurm", f"{first_slurm_host(nodelist)}:{port}", ntasks, pid)
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if mode == "auto" or len(tpu_hosts) > 1:
        return DistributedArgs("auto")
    return None


def initialize_distributed(args: DistributedArgs | None) -> bool:
    """Call ``jax.distributed.initialize`` once; returns whether it ran (False: no-op).

    Must run before any JAX call that touches devices (``jax.devices()``, array creation)."""
    if args is None:
        return False
    import jax
    jax.distributed.initialize(**args.kwargs())
    return True
