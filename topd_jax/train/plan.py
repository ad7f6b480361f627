"""``python -m topd_jax.train --config X --plan``: per-device memory, without allocating.

Sizes come from ``jax.eval_shape`` (abstract params and optimizer state) and the logical-axis
rules table (``topd_jax.sharding.logical_to_spec``) applied to a mesh *shape*, so a v5p-64 or
8×H100 plan runs on a laptop (``--plan-devices 64``). With ``--plan-devices`` equal to the
local device count and a small model, the real jitted update (``TrainStep``) is also lowered
and compiled for abstract inputs, and XLA's ``memory_analysis()`` gives its temporaries.

Rows (bytes per device): student params, optimizer state, teacher params; KV caches of the
rollouts (P + N - 1 slots; sampled by the teacher in the warm-up) and of the TOPD detector's /
guidance's K-token continuations (C x n rows per rollout, L + K slots); the update batch
(ids, masks, teacher hidden states); one layer's attention scores (an estimate: the model has
no flash attention, so at long rows this is the largest activation); the compiled step's
temporaries (small models) — else the student update's attention enters the estimate.
Not counted: other activations (MLP, logits chunks, the teacher's MoE routing) and framework
overhead — keep headroom. The rows are summed although not all are live at once.
"""

from __future__ import annotations

import dataclasses
import functools
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


@functools.lru_cache(maxsize=8)  # a 30B MoE takes seconds to trace; plans for several meshes reuse it
def abstract_params(config: ModelConfig) -> nnx.State:
    """The model's parameters as ``ShapeDtypeStruct``s (logical axes in the metadata); cached
    per config, so treat the result as read-only."""
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
    """Per-device bytes of k and v, one ``[rows, kv_heads, slots, head_dim]`` array per layer
    (compute dtype). The cache's ``[rows, slots]`` bool mask is not counted (1 byte per slot)."""
    shape = (rows, config.num_kv_heads, slots, config.head_dim)
    return 2 * config.num_layers * shard_bytes(shape, config.compute_dtype,
                                               logical_to_spec(CACHE_KV_AXES, shape, mesh), mesh)


def row_bytes(shape: Sequence[int], dtype, mesh: dict[str, int]) -> int:
    """Per-device bytes of a batch array with its rows (axis 0) over ``act_batch``."""
    axes = ("act_batch",) + (None,) * (len(shape) - 1)
    return shard_bytes(shape, dtype, logical_to_spec(axes, shape, mesh), mesh)


def attention_bytes(config: ModelConfig, rows: int, queries: int, keys: int, mesh: dict[str, int]) -> int:
    """Per-device bytes of ONE layer's attention scores (float32) and probabilities (compute
    dtype), ``[rows, kv_heads, groups, queries, keys]`` as ``models.qwen`` materialises them
    (no flash attention): rows over ``act_batch``, kv heads over ``tensor``."""
    groups = config.num_heads // config.num_kv_heads
    shape = (rows, config.num_kv_heads, groups, queries, keys)
    spec = logical_to_spec(("act_batch", "act_kv_heads", None, None, None), shape, mesh)
    return shard_bytes(shape, np.float32, spec, mesh) + shard_bytes(shape, config.compute_dtype, spec, mesh)


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
            lines.append(f"  {name:<52} {b / GIB:10.3f} GiB  ({b:,} B)")
        lines.append(f"  {'total':<52} {self.total / GIB:10.3f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        if device_memory_gib is not None:
            verdict = "fits" if self.fits(device_memory_gib) else "does NOT fit"
            lines.append(f"{verdict} in {device_memory_gib:g} GiB per device "
                         f"({self.total / (device_memory_gib * GIB):.0%} used)")
        return "\n".join(lines)


def _continuation_rows(cfg: RunConfig) -> tuple[int, bool, bool]:
    """K-token continuations per rollout row and who samples them: ``(per_row, teacher,
    student)`` (TOPD.md §3; ``algorithms.topd.detect`` / ``guidance_batch``)."""
    from topd_jax.algorithms.topd import needs_student_continuations
    t = cfg.topd
    if cfg.algorithm == "warmup" or not cfg.uses_detector:
        return 0, False, False
    if t.detector != "kl_window":  # C slots x n continuations per side, teacher always
        n = t.continuations_per_side if t.detector == "ot_embedding" else t.margin_samples
        return t.num_candidates * n, True, needs_student_continuations(cfg)
    if cfg.uses_guidance and t.guidance_target != "student_positions":  # guidance's own continuations
        return guided_points(cfg), True, False
    return 0, False, False


def guided_points(cfg: RunConfig) -> int:
    """m: guidance rows per rollout (at most max_guided_points of the C candidates)."""
    t = cfg.topd
    return t.num_candidates if t.max_guided_points is None else min(t.max_guided_points, t.num_candidates)


def kv_rows(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig | None,
            mesh: dict[str, int]) -> dict[str, int]:
    """The KV caches of one step, per device: the rollouts' (P + N - 1 slots, sampled by the
    student; by the teacher in the warm-up; none for sft) and the K-token continuations'
    (L + K slots)."""
    from topd_jax.train.loop import rollout_len
    if cfg.algorithm == "sft":  # trains on the files' responses: no sampling
        return {}
    r, length = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg)
    sampler, who = (teacher, "teacher") if cfg.algorithm == "warmup" else (student, "student")
    out = {f"{who} KV cache, rollouts [{r}x{length - 1}]": kv_cache_bytes(sampler, r, length - 1, mesh)}
    per_row, by_teacher, by_student = _continuation_rows(cfg)
    rows, slots = r * per_row, length + cfg.topd.window
    for model, name, on in ((teacher, "teacher", by_teacher), (student, "student", by_student)):
        if on:
            out[f"{name} KV cache, continuations [{rows}x{slots}]"] = kv_cache_bytes(model, rows, slots, mesh)
    return out


def batch_bytes(cfg: RunConfig, teacher: ModelConfig | None, mesh: dict[str, int]) -> int:
    """Per-device bytes of the update batch (``step_batch``: ids, masks, teacher hidden states)."""
    return sum(row_bytes(x.shape, x.dtype, mesh) for x in step_batch(cfg, teacher).values())


def attention_peak(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig | None, mesh: dict[str, int],
                   *, with_step: bool) -> tuple[int, str]:
    """The largest one-layer attention of a step (see ``attention_bytes``) and where: the
    teacher's scoring forward over all rows, and (``with_step``) the student's update on one
    micro-batch (x2 for the backward pass; x layers without remat, which keeps every layer's)."""
    from topd_jax.train.loop import rollout_len
    r, length = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg)
    k = cfg.topd.window
    g = r * guided_points(cfg) if cfg.uses_guidance else 0
    name = "teacher scoring" if cfg.needs_teacher else "reference scoring"
    cands = [(attention_bytes(teacher, r, length, length, mesh) if teacher is not None else 0, name),
             (attention_bytes(student, r, length, length, mesh) if cfg.uses_detector else 0, "student ℓ_t pass"),
             (attention_bytes(teacher, g, length + k, length + k, mesh) if g else 0, "teacher guidance rows")]
    if with_step:
        mb = cfg.optim.micro_batches
        keep = student.num_layers if cfg.student.remat == "none" else 1
        cands += [(2 * keep * attention_bytes(student, r // mb, length, length, mesh), "student update"),
                  (2 * keep * attention_bytes(student, max(g // mb, 1), length + k, length + k, mesh) if g else 0,
                   "student update, guidance rows")]
    return max(cands)


def memory_plan(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig | None, num_devices: int,
                *, compile_step: bool = False) -> MemoryPlan:
    """The per-device plan of ``cfg`` on ``num_devices`` devices (see the module docstring).
    ``teacher``: the distillation teacher, GRPO/TAPO's frozen reference policy, or None."""
    from topd_jax.train.optim import make_optimizer
    mesh = mesh_shape(cfg, num_devices)
    s_params = abstract_params(student)
    tx = make_optimizer(cfg.optim, cfg.steps)
    rows = {"student params": param_bytes(s_params, mesh),
            "optimizer state": opt_state_bytes(tx, s_params, mesh)}
    if teacher is not None:
        rows["teacher params" if cfg.needs_teacher else "reference params"] = \
            param_bytes(abstract_params(teacher), mesh)
    rows.update(kv_rows(cfg, student, teacher, mesh))
    rows["update batch arrays"] = batch_bytes(cfg, teacher, mesh)
    notes = ["rows are summed, an upper bound: the KV caches of sampling and of the continuations "
             "are not all live at once (the student's rollout cache is kept for its continuations)"]
    if not cfg.needs_teacher:
        notes.append(f"{cfg.algorithm}: the objective's per-token float arrays (log-probs, "
                     "advantages) and TAPO's construction sampling are not counted")
    compile_step = compile_step and cfg.needs_teacher  # the abstract batch is the distillation one
    attn, where = attention_peak(cfg, student, teacher, mesh, with_step=not compile_step)
    rows[f"attention scores, one layer ({where}; estimate)"] = attn
    notes.append("attention: the model materialises [rows, heads, T, T] scores in float32 (no flash "
                 "attention); the estimate is the largest single layer, other activations not counted")
    if compile_step:
        rows.update(compiled_temp_rows(cfg, student, teacher, s_params, tx))
    else:
        notes.append("compiled step temporaries not measured (large model, --plan-devices differs "
                     "from the local device count, --no-compile, or not a distillation algorithm)")
    return MemoryPlan(mesh, rows, notes)


def step_batch(cfg: RunConfig, teacher: ModelConfig | None) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays of one update batch (keys as ``algorithms.prepare_batch`` makes them for
    the distillation algorithms, fused main pass included; for sft/RL only the rows and masks
    they share)."""
    from topd_jax.train.loop import rollout_len
    R, L = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg)
    sds = jax.ShapeDtypeStruct
    b = {"ids": sds((R, L), jnp.int32), "seq_mask": sds((R, L), bool), "loss_mask": sds((R, L), bool),
         "weights": sds((R, L), jnp.float32)}
    if not cfg.needs_teacher:
        return b
    d_t, h_dtype = teacher.hidden_size, teacher.compute_dtype  # forward_hidden: the compute dtype
    if cfg.uses_detector:  # topd.prepare: the classification instead of weights
        del b["weights"]
        b.update(candidates=sds((R, L), bool), divergence=sds((R, L), jnp.float32),
                 false_alarm=sds((R, L), bool))
    if cfg.fuses_main_pass:  # the step reads ℓ_t, not the teacher's hidden states
        b["token_loss"] = sds((R, L), jnp.float32)
    elif cfg.loss.estimator == "sampled_token":
        b["teacher_logp"] = sds((R, L), jnp.float32)
    else:
        b["teacher_hidden"] = sds((R, L, d_t), h_dtype)
    if cfg.uses_guidance:
        G, K = R * guided_points(cfg), cfg.topd.window
        b.update(g_ids=sds((G, L + K), jnp.int32), g_mask=sds((G, L + K), bool), g_window=sds((G, K), bool),
                 g_targets=sds((G, K), jnp.int32), g_teacher_hidden=sds((G, K, d_t), h_dtype))
    return b


def compiled_temp_rows(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig,
                       s_params: nnx.State, tx) -> dict[str, int]:
    """XLA's temporary bytes (per device) of what runs with a gradient, compiled on the local
    mesh: the jitted update, and with ``topd.fused_main_pass`` also the OPD term's forward and
    backward that run in ``topd.prepare`` (``topd.main_pass_vjp``; its residuals stay live
    through the detector) plus the gradient it hands the step."""
    rows = {"compiled step temporaries": compiled_step_temp_bytes(cfg, student, teacher, s_params, tx)}
    if cfg.fuses_main_pass:
        rows["compiled fused ℓ_t pass temporaries (forward + backward)"] = \
            compiled_main_pass_temp_bytes(cfg, student, teacher, s_params, tx)
        rows["fused ℓ_t pass gradient (step input)"] = param_bytes(s_params, mesh_shape(cfg, jax.device_count()))
    return rows


def _compile_setup(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig, s_params: nnx.State, tx):
    """Mesh, graphdef, train-state shardings and the abstract teacher head on the local devices."""
    from topd_jax.sharding import make_mesh
    from topd_jax.train.state import train_state_shardings
    m = cfg.mesh
    mesh = make_mesh(ShardingMesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen(student, rngs=nnx.Rngs(0))))
    shardings = train_state_shardings(tx, s_params, mesh)
    head_shape = (teacher.hidden_size, teacher.vocab_size)  # [d, V], laid out as lm_head_weight() is
    head = jax.ShapeDtypeStruct(head_shape, teacher.weight_dtype, sharding=jax.sharding.NamedSharding(
        mesh, logical_to_spec(("embed", "vocab"), head_shape, dict(mesh.shape))))
    return mesh, graphdef, shardings, head


def compiled_step_temp_bytes(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig,
                             s_params: nnx.State, tx) -> int:
    """XLA's temporary bytes (per device) of the real jitted update, compiled on the local mesh
    for the batch ``prepare_batch`` hands it (with the fused pass: ℓ_t and a ``PrecomputedGrad``)."""
    from topd_jax.algorithms import build_objective
    from topd_jax.algorithms.prepared import PrecomputedGrad, PreparedBatch
    from topd_jax.train.loop import rollout_len
    from topd_jax.train.optim import lr_schedule
    from topd_jax.train.state import TrainState
    from topd_jax.train.step import TrainStep
    mesh, graphdef, shardings, head = _compile_setup(cfg, student, teacher, s_params, tx)
    sds = jax.ShapeDtypeStruct
    state = TrainState(step=sds((), jnp.int32), opt_steps=sds((), jnp.int32), params=s_params,
                       opt_state=jax.eval_shape(tx.init, s_params), rng=sds((2,), jnp.uint32))
    loss_fn, normalize = build_objective(cfg, graphdef, rollout_len(cfg))  # as train.loop builds it
    step = TrainStep(loss_fn, tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh,
                     micro_batches=cfg.optim.micro_batches, normalize=normalize)
    pre = PrecomputedGrad(s_params, through=("token_loss",)) if cfg.fuses_main_pass else None
    batch = PreparedBatch(step_batch(cfg, teacher), pre)
    with jax.set_mesh(mesh):
        fn, _, _ = step.compiled(batch, head)
        analysis = fn.lower(state, batch.arrays, head, pre).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def compiled_main_pass_temp_bytes(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig,
                                  s_params: nnx.State, tx) -> int:
    """XLA's temporary bytes (per device) of TOPD's fused main pass as one program: ℓ_t's
    forward with its residuals, then ∂L/∂ℓ pulled back through them (``topd.main_pass_vjp``)."""
    from topd_jax.algorithms.topd import main_pass_vjp
    from topd_jax.train.loop import rollout_len
    from topd_jax.train.step import batch_shardings
    mesh, graphdef, shardings, head = _compile_setup(cfg, student, teacher, s_params, tx)
    R, L = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg)
    sds = jax.ShapeDtypeStruct
    rows = {"ids": sds((R, L), jnp.int32), "seq_mask": sds((R, L), bool), "loss_mask": sds((R, L), bool),
            "teacher_hidden": sds((R, L, teacher.hidden_size), teacher.compute_dtype),
            "ct": sds((R, L), jnp.float32)}
    r_sh = batch_shardings(rows, mesh)

    def grads(params, rows, head):
        _, vjp_fn = main_pass_vjp(cfg, graphdef, params, rows, rows["teacher_hidden"], head)
        return vjp_fn(rows["ct"])[0]

    with jax.set_mesh(mesh):
        fn = jax.jit(grads, in_shardings=(shardings.params, r_sh, head.sharding), out_shardings=shardings.params)
        analysis = fn.lower(s_params, rows, head).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def plan_models(cfg: RunConfig) -> tuple[ModelConfig, ModelConfig | None]:
    """Student and teacher configs as ``train.setup.plan_run`` resolves them (the teacher is
    GRPO/TAPO's reference policy, or None for sft and RL without a KL term)."""
    from topd_jax.train.setup import model_plan
    student = model_plan(cfg.student, "student", None, cfg.seed).config
    if cfg.needs_teacher:
        return student, model_plan(cfg.teacher, "teacher", None, cfg.seed + 1).config
    return student, (model_plan(cfg.student, "reference", None, cfg.seed).config if cfg.uses_reference else None)


def plan_main(cfg: RunConfig, args: PlanArgs) -> int:
    """Print the plan; exit status 0 (fits or no limit given), 3 (does not fit), 2 (bad input)."""
    from topd_jax.train.setup import RunSetupError
    try:
        student, teacher = plan_models(cfg)
        local = jax.device_count()
        n = args.devices or local
        small = all(m.num_params() <= COMPILE_MAX_PARAMS for m in (student, teacher) if m is not None)
        plan = memory_plan(cfg, student, teacher, n, compile_step=args.compile and small and n == local)
    except (RunSetupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format(args.device_memory_gib), flush=True)
    return 3 if args.device_memory_gib is not None and not plan.fits(args.device_memory_gib) else 0

