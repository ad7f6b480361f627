"""``python -m topd_jax.train --config X --plan``: per-device memory, without allocating.

Sizes come from ``jax.eval_shape`` (abstract params and optimizer state) and the logical-axis
rules table (``topd_jax.sharding.logical_to_spec``) applied to a mesh *shape*, so a v5p-64 or
8×H100 plan runs on a laptop (``--plan-devices 64``). With ``--plan-devices`` equal to the
local device count and a small model, the real jitted update (``TrainStep``) is also lowered
and compiled for abstract inputs, and XLA's ``memory_analysis()`` gives its temporaries.

Rows (bytes per device): student params, optimizer state, teacher params, KV caches of the
rollout batch (student sampling; teacher continuations), compiled-step temporaries. Not
counted: the teacher's scoring activations, the rollout/TOPD batch arrays themselves, and
framework overhead — keep headroom.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from topd_jax.models import ModelConfig
from topd_jax.models.cache import CACHE_KV_AXES
from topd_jax.models.qwen import Qwen
from topd_jax.sharding import MeshConfig as ShardingMesh
from topd_jax.sharding import MESH_AXES, logical_to_spec
from topd_jax.train.config import RunConfig

GIB = 1024 ** 3
# Models above this size are not compiled by default: on CPU the compile alone takes minutes.
COMPILE_MAX_PARAMS = 50_000_000


class PlanArgsError(ValueError):
    pass


@dataclass(frozen=True)
class PlanArgs:
    device_memory_gib: float | None = None   # fits check against this per-device memory
    devices: int | None = None               # plan for this many devices (default: local)
    compile: bool = True                     # compile the step for temporaries (small models)


def split_plan_args(argv: Sequence[str]) -> tuple[PlanArgs | None, list[str]]:
    """Take ``--plan``, ``--device-memory-gib G``, ``--plan-devices N``, ``--no-compile`` out
    of ``argv``; returns ``(PlanArgs or None when --plan is absent, the rest)``."""
    rest, found, kw = [], False, {}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg == "--plan":
            found = True
        elif arg == "--no-compile":
            kw["compile"] = False
        elif name in ("--device-memory-gib", "--plan-devices"):
            value = value if eq else next(it, None)
            try:
                num = float(value) if name == "--device-memory-gib" else int(value)
            except (TypeError, ValueError):
                raise PlanArgsError(f"{name} needs a number, got {value!r}") from None
            if num <= 0:
                raise PlanArgsError(f"{name} must be > 0, got {value!r}")
            kw["device_memory_gib" if name == "--device-memory-gib" else "devices"] = num
        else:
            rest.append(arg)
    if kw and not found:
        raise PlanArgsError(f"{', '.join(sorted(kw))}: only valid with --plan")
    return (PlanArgs(**kw) if found else None), rest


def mesh_shape(cfg: RunConfig, num_devices: int) -> dict[str, int]:
    m = cfg.mesh
    sizes = ShardingMesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor).resolve(num_devices)
    return dict(zip(MESH_AXES, sizes))


def shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, mesh: dict[str, int]) -> int:
    """Bytes of one device's shard of an array of ``shape`` laid out by ``spec``."""
    per = list(shape)
    for i, axes in enumerate(spec):
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            per[i] = math.ceil(per[i] / mesh[a])
    return math.prod(per) * np.dtype(dtype).itemsize


def abstract_params(config: ModelConfig) -> nnx.State:
    """The model's parameters as ``ShapeDtypeStruct``s (logical axes in the metadata)."""
    return nnx.state(nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0))))


def _param_divisors(params: nnx.State, mesh: dict[str, int]) -> nnx.State:
    """Per parameter: how many shards the rules split it into (1: replicated)."""
    def one(path, var):
        v = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * v.ndim
        spec = logical_to_spec(tuple(names), v.shape, mesh)
        return var.replace(v.size * v.dtype.itemsize // max(shard_bytes(v.shape, v.dtype, spec, mesh), 1)
                           if v.size else 1)
    return nnx.map_state(one, params)


def param_bytes(params: nnx.State, mesh: dict[str, int]) -> int:
    """Per-device bytes of ``params`` placed by the rules table."""
    def one(path, var):
        v = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * v.ndim
        return var.replace(shard_bytes(v.shape, v.dtype, logical_to_spec(tuple(names), v.shape, mesh), mesh))
    return int(sum(jax.tree.leaves(nnx.map_state(one, params))))


def opt_state_bytes(tx, params: nnx.State, mesh: dict[str, int]) -> int:
    """Per-device bytes of ``tx``'s state: moments shard like their parameter (as in
    ``train.state.opt_state_shardings``), other leaves (counts) replicate."""
    import optax
    abstract = jax.eval_shape(tx.init, params)
    div = _param_divisors(params, mesh)
    sizes = optax.tree_map_params(tx, lambda leaf, d: leaf.size * leaf.dtype.itemsize // d, abstract, div,
                                  transform_non_params=lambda leaf: leaf.size * leaf.dtype.itemsize)
    return int(sum(jax.tree.leaves(sizes)))


def kv_cache_bytes(config: ModelConfig, rows: int, slots: int, mesh: dict[str, int]) -> int:
    """Per-device bytes of k and v ``[layers, rows, slots, kv_heads, head_dim]`` (compute dtype)."""
    shape = (config.num_layers, rows, slots, config.num_kv_heads, config.head_dim)
    return 2 * shard_bytes(shape, config.compute_dtype, logical_to_spec(CACHE_KV_AXES, shape, mesh), mesh)


@dataclass
class MemoryPlan:
    mesh: dict[str, int]
    rows: dict[str, int]                  # name -> bytes per device
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def fits(self, device_memory_gib: float) -> bool:
        return self.total <= device_memory_gib * GIB

    def format(self, device_memory_gib: float | None = None) -> str:
        lines = [f"memory plan, per device, mesh {self.mesh} ({math.prod(self.mesh.values())} devices):"]
        for name, b in self.rows.items():
            lines.append(f"  {name:<34} {b / GIB:10.3f} GiB  ({b:,} B)")
        lines.append(f"  {'total':<34} {self.total / GIB:10.3f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        if device_memory_gib is not None:
            verdict = "fits" if self.fits(device_memory_gib) else "does NOT fit"
            lines.append(f"{verdict} in {device_memory_gib:g} GiB per device "
                         f"({self.total / (device_memory_gib * GIB):.0%} used)")
        return "\n".join(lines)


def memory_plan(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig, num_devices: int,
                *, compile_step: bool = False) -> MemoryPlan:
    """The per-device plan of ``cfg`` on ``num_devices`` devices (see the module docstring)."""
    from topd_jax.train.loop import rollout_len
    from topd_jax.train.optim import make_optimizer
    mesh = mesh_shape(cfg, num_devices)
    s_params, t_params = abstract_params(student), abstract_params(teacher)
    tx = make_optimizer(cfg.optim, cfg.steps)
    rows_global = cfg.data.prompts_per_step * cfg.rollout.n
    slots = rollout_len(cfg)
    rows = {"student params": param_bytes(s_params, mesh),
            "optimizer state": opt_state_bytes(tx, s_params, mesh),
            "teacher params": param_bytes(t_params, mesh),
            f"student KV cache [{rows_global}x{slots}]": kv_cache_bytes(student, rows_global, slots, mesh)}
    notes = []
    if cfg.uses_detector:
        rows[f"teacher KV cache [{rows_global}x{slots}]"] = kv_cache_bytes(teacher, rows_global, slots, mesh)
        notes.append("teacher KV cache: an upper bound (every rollout row at full length; the TOPD "
                     "branches only continue candidate rows for topd.window tokens)")
    if compile_step:
        rows["compiled step temporaries"] = compiled_step_temp_bytes(cfg, student, teacher, s_params, tx)
    else:
        notes.append("compiled step temporaries not measured (large model, --plan-devices differs "
                     "from the local device count, or --no-compile)")
    return MemoryPlan(mesh, rows, notes)


def step_batch(cfg: RunConfig, teacher: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays of one update batch (keys as ``algorithms.prepare_batch`` makes them)."""
    from topd_jax.train.loop import rollout_len
    R, L, d_t = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg), teacher.hidden_size
    sds = jax.ShapeDtypeStruct
    b = {"ids": sds((R, L), jnp.int32), "seq_mask": sds((R, L), bool), "loss_mask": sds((R, L), bool),
         "weights": sds((R, L), jnp.float32), "teacher_hidden": sds((R, L, d_t), jnp.float32)}
    if cfg.uses_guidance:
        t = cfg.topd  # guided points per row: at most max_guided_points of the C candidates
        m = t.num_candidates if t.max_guided_points is None else min(t.max_guided_points, t.num_candidates)
        G, K = R * m, t.window
        b.update(g_ids=sds((G, L + K), jnp.int32), g_mask=sds((G, L + K), bool), g_window=sds((G, K), bool),
                 g_targets=sds((G, K), jnp.int32), g_teacher_hidden=sds((G, K, d_t), jnp.float32))
    return b


def compiled_step_temp_bytes(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig,
                             s_params: nnx.State, tx) -> int:
    """XLA's temporary bytes (per device) of the real jitted update, compiled on the local mesh."""
    from topd_jax.algorithms import LossSpec, make_loss_fn
    from topd_jax.algorithms.objective import add_normalizers
    from topd_jax.sharding import make_mesh
    from topd_jax.train.loop import rollout_len
    from topd_jax.train.optim import lr_schedule
    from topd_jax.train.state import TrainState, train_state_shardings
    from topd_jax.train.step import TrainStep
    import functools
    m = cfg.mesh
    mesh = make_mesh(ShardingMesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen(student, rngs=nnx.Rngs(0))))
    shardings = train_state_shardings(tx, s_params, mesh)
    sds = jax.ShapeDtypeStruct
    state = TrainState(step=sds((), jnp.int32), opt_steps=sds((), jnp.int32), params=s_params,
                       opt_state=jax.eval_shape(tx.init, s_params), rng=sds((2,), jnp.uint32))
    spec = LossSpec.from_config(cfg, rollout_len(cfg))
    step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh,
                     micro_batches=cfg.optim.micro_batches, normalize=functools.partial(add_normalizers, spec))
    batch = step_batch(cfg, teacher)
    head = sds((teacher.hidden_size, teacher.vocab_size), teacher.weight_dtype)
    with jax.set_mesh(mesh):
        fn, _, _ = step._fn(batch, head)
        analysis = fn.lower(state, batch, head).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def plan_main(cfg: RunConfig, args: PlanArgs) -> int:
    """Print the plan; exit status 0 (fits or no limit given), 3 (does not fit), 2 (bad input)."""
    from topd_jax.train.setup import RunSetupError, model_plan
    try:
        student = model_plan(cfg.student, "student", None, cfg.seed).config
        teacher = model_plan(cfg.teacher, "teacher", None, cfg.seed + 1).config
        local = jax.device_count()
        n = args.devices or local
        small = student.num_params() <= COMPILE_MAX_PARAMS and teacher.num_params() <= COMPILE_MAX_PARAMS
        plan = memory_plan(cfg, student, teacher, n, compile_step=args.compile and small and n == local)
    except (RunSetupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format(args.device_memory_gib), flush=True)
    return 3 if args.device_memory_gib is not None and not plan.fits(args.device_memory_gib) else 0

