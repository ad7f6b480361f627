"""``python -m topd_jax.train --config X --plan``: per-device memory, without allocating.

Sizes come from ``jax.eval_shape`` (abstract params and optimizer state) and the logical-axis
rules table (``topd_jax.sharding.logical_to_spec``) applied to a mesh *shape*, so a v5p-64 or
8×H100 plan runs on a laptop (``--plan-devices 64``). With ``--plan-devices`` equal to the
local device count and a small model, the real jitted update (``TrainStep``) is also lowered
and compiled for abstract inputs, and XLA's ``memory_analysis()`` gives its temporaries.

Rows (bytes per device): student params, optimizer state, teacher params; KV caches of the
rollouts (P + N - 1 slots; sampled by the teacher in the warm-up) and of the TOPD detector's /
guidance's K-token continuations (each sequence's cache shared by its C x n rows, plus K private slots per row); the update batch
(ids, masks, teacher hidden states); then the activations of the step's largest phase (the
teacher's scoring forward, the student's ℓ_t pass, the guidance rows, the student's update on
one micro-batch): one layer's attention intermediates as the planned backend's attention
implementation holds them (``models.attention``: xla materialises [rows, heads, T, S] scores,
chunked and the flash kernels hold O(T·block); ``--plan-backend`` picks what ``auto`` means),
one layer's other activations (with a MoE teacher its token dispatch), and for the update the
remat checkpoints (every layer's input) and the loss's logits chunks. The compiled step's
temporaries replace the update's rows for small models (measured by XLA).
Not counted: framework overhead and fragmentation — keep headroom. The rows are summed
although not all are live at once (the sampling KV cache is freed before the update).
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
from topd_jax.models.cache import CACHE_KV_AXES, slots_for
from topd_jax.models.qwen import Qwen
from topd_jax.sharding import MeshConfig as ShardingMesh
from topd_jax.sharding import MESH_AXES, logical_to_spec
from topd_jax.config.schema import RunConfig

GIB = 1024 ** 3
BACKENDS = ("cpu", "gpu", "tpu")
ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "splash")  # models.attention.IMPLS without "auto"
# The layout models.qwen passes for its cache-free forwards (training, scoring): self-attention
# over the row's T tokens, where `auto` can pick the fused kernels.
ROW_LAYOUT = "causal"
# Models above this size are not compiled by default: on CPU the compile alone takes minutes.
COMPILE_MAX_PARAMS = 50_000_000


class PlanArgsError(ValueError):
    pass


@dataclass(frozen=True)
class PlanArgs:
    device_memory_gib: float | None = None   # fits check against this per-device memory
    devices: int | None = None               # plan for this many devices (default: local)
    compile: bool = True                     # compile the step for temporaries (small models)
    backend: str | None = None               # plan for this backend's attention (default: local)


def split_plan_args(argv: Sequence[str]) -> tuple[PlanArgs | None, list[str]]:
    """Take ``--plan``, ``--device-memory-gib G``, ``--plan-devices N``, ``--plan-backend
    cpu|gpu|tpu``, ``--no-compile`` out of ``argv``; returns ``(PlanArgs or None when --plan is
    absent, the rest)``."""
    rest, found, kw = [], False, {}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg == "--plan":
            found = True
        elif arg == "--no-compile":
            kw["compile"] = False
        elif name == "--plan-backend":
            value = value if eq else next(it, None)
            if value not in BACKENDS:
                raise PlanArgsError(f"--plan-backend must be one of {', '.join(BACKENDS)}, got {value!r}")
            kw["backend"] = value
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


def _act_bytes(shape: Sequence[int], dtype, axes: tuple, mesh: dict[str, int]) -> int:
    return shard_bytes(shape, dtype, logical_to_spec(axes, shape, mesh), mesh)


@dataclass(frozen=True)
class AttentionPlan:
    """How the planned backend runs one model's attention (``models.attention``): ``impl`` is
    xla | chunked | cudnn | splash (``auto`` already resolved), blocks as ``attention()`` takes them."""
    impl: str
    block_q: int = 512
    block_kv: int = 512

    def describe(self) -> str:
        if self.impl == "xla":
            return "xla, materialised"
        kind = "chunked" if self.impl == "chunked" else f"{self.impl} flash"
        return f"{kind}, block {self.block_q}x{self.block_kv}"


def attention_plan(config: ModelConfig, backend: str) -> AttentionPlan:
    """The attention ``config`` runs on ``backend`` for teacher-forced rows: ``ModelConfig.attention``
    through ``models.attention.choose_impl`` (which resolves ``auto`` and refuses an explicit
    kernel the rows' layout cannot use)."""
    from topd_jax.models.attention import choose_impl
    impl = choose_impl(config.attention, backend, config.compute_dtype, layout=ROW_LAYOUT)
    return AttentionPlan(impl, config.attention_block_q, config.attention_block_kv)


def attention_bytes(config: ModelConfig, rows: int, queries: int, keys: int, mesh: dict[str, int], *,
                    attn: AttentionPlan, backward: bool = False) -> int:
    """Per-device bytes of ONE layer's attention intermediates (beyond q, k, v and the output
    the layer holds anyway), as ``models.attention`` computes them; rows over ``act_batch``, kv
    heads over ``tensor``; g = heads / kv heads, h = head_dim:

    - xla (materialised): float32 scores and compute-dtype probabilities ``[rows, kv, g, T, S]``;
      the backward holds as much again (the scores' gradient): O(T·S).
    - chunked (online softmax; ``lax.map`` over query blocks, a loop over key blocks): one
      block's float32 scores, probabilities and mask temporaries ``[rows, kv, g, bq, bkv]`` (3),
      the block's running max / sum and accumulator, and the stacked float32 output
      ``[rows, kv, g, T, h]`` and statistics ``[rows, kv, g, T]`` (2). The backward (custom VJP,
      FlashAttention-2) keeps the log-sum-exp ``[rows, kv, g, T]``, holds dO and dq in float32
      ``[rows, kv, g, T, h]`` (2), dk and dv in float32 ``[rows, kv, S, h]`` (2), D ``[rows, kv, g, T]``
      and one block's p, dp, ds (3): O(T·h + block²), linear in T.
    - cudnn / splash (flash kernels): one block's float32 scores per (row, head) — an upper
      bound, the kernel keeps them on chip — and the saved softmax statistics
      ``[rows, kv, g, T]`` float32; cudnn also holds the compacted (right-padded) copies of q
      and the output ``[rows, kv, g, T, h]`` and of k, v ``[rows, kv, T, h]`` (compute dtype), and
      its backward a float32 dq accumulator ``[rows, kv, g, T, h]`` (workspace); splash
      accumulates dq on chip: O(T).
    """
    kv, g, hd = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    axes = ("act_batch", "act_kv_heads", None, None, None)
    f32 = np.float32
    if attn.impl == "xla":
        shape = (rows, kv, g, queries, keys)
        fwd = _act_bytes(shape, f32, axes, mesh) + _act_bytes(shape, config.compute_dtype, axes, mesh)
        return 2 * fwd if backward else fwd
    if attn.impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {attn.impl!r}; expected one of {ATTENTION_IMPLS}")
    bq, bkv = min(attn.block_q, queries), min(attn.block_kv, keys)
    block = _act_bytes((rows, kv, g, bq, bkv), f32, axes, mesh)
    per_query = _act_bytes((rows, kv, g, queries), f32, axes[:4], mesh)  # [rows, kv, g, T] f32
    per_query_h = _act_bytes((rows, kv, g, queries, hd), f32, axes, mesh)  # [rows, kv, g, T, h] f32
    if attn.impl == "chunked":
        fwd = (3 * block + 2 * _act_bytes((rows, kv, g, bq), f32, axes[:4], mesh)
               + _act_bytes((rows, kv, g, bq, hd), f32, axes, mesh) + per_query_h + 2 * per_query)
        if not backward:
            return fwd
        dkv = _act_bytes((rows, kv, keys, hd), f32, axes[:4], mesh)
        return fwd + 2 * per_query + 2 * per_query_h + 2 * dkv + 3 * block
    if attn.impl == "cudnn":
        copies = (2 * _act_bytes((rows, kv, g, queries, hd), config.compute_dtype, axes, mesh)
                  + 2 * _act_bytes((rows, kv, keys, hd), config.compute_dtype, axes[:4], mesh))
        return block + per_query + copies + (block + per_query_h if backward else 0)
    return (2 if backward else 1) * block + per_query  # splash


def layer_activation_bytes(config: ModelConfig, rows: int, length: int, mesh: dict[str, int], *,
                           moe: bool) -> int:
    """Per-device bytes of one decoder layer's activations in the compute dtype, attention
    intermediates aside (``attention_bytes``): the input and its norm ``[rows, T, d]``, q and
    the attention output ``[rows, T, heads, head_dim]``, k and v ``[rows, T, kv_heads, head_dim]``;
    a dense MLP's gate, up and their product ``[rows, T, I]`` (``act_mlp`` over tensor); a MoE
    layer's (``models.moe``, ragged) float32 router logits and probabilities ``[rows, T, E]``,
    the sorted token copies and expert outputs ``[rows*T*k, d]`` and gate, up and product
    ``[rows*T*k, f]`` (every device holds its own tokens' k pairs)."""
    dt, d, hd = config.compute_dtype, config.hidden_size, config.head_dim
    res = _act_bytes((rows, length, d), dt, ("act_batch", None, None), mesh)
    total = 2 * res
    total += 2 * _act_bytes((rows, length, config.num_heads, hd), dt, ("act_batch", None, "act_heads", None), mesh)
    total += 2 * _act_bytes((rows, length, config.num_kv_heads, hd), dt,
                            ("act_batch", None, "act_kv_heads", None), mesh)
    if not moe:
        return total + 3 * _act_bytes((rows, length, config.intermediate_size), dt,
                                      ("act_batch", None, "act_mlp"), mesh)
    k = config.num_experts_per_tok
    total += 2 * _act_bytes((rows, length, config.num_experts), np.float32, ("act_batch", None, None), mesh)
    total += 2 * k * res  # [rows*T*k, d]: rows stay on their device
    total += 3 * k * _act_bytes((rows, length, config.moe_intermediate_size), dt, ("act_batch", None, None), mesh)
    return total


def logits_chunk_bytes(config: ModelConfig, rows: int, length: int, chunk: int | None,
                       mesh: dict[str, int]) -> int:
    """Per-device bytes of the loss's live logits (``losses.chunked`` / ``scoring``): student and
    teacher float32 logits of one chunk ``[rows, chunk, V]`` and their softmaxes (4 arrays);
    ``chunk`` None (``loss.vocab_chunk`` unset): the whole ``[rows, T, V]``."""
    shape = (rows, length if chunk is None else min(chunk, length), config.vocab_size)
    return 4 * _act_bytes(shape, np.float32, ("act_batch", None, "act_vocab"), mesh)


@dataclass(frozen=True)
class Phase:
    """One phase of a step (a forward, or the student's update) and its activation rows."""
    name: str
    rows: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def forward_phase(name: str, config: ModelConfig, rows: int, length: int, mesh: dict[str, int],
                  attn: AttentionPlan, *, logits: int = 0) -> Phase:
    """A no-gradient forward over ``rows`` rows of ``length`` tokens: one layer is live at a time
    (its activations + attention intermediates); the final hidden states are the update batch's.
    ``logits``: bytes of the per-token scoring's live logits chunks, when the phase scores tokens."""
    moe = bool(config.moe_layers)
    out = {f"attention, one layer ({name}; {attn.describe()})":
           attention_bytes(config, rows, length, length, mesh, attn=attn),
           f"activations, one {'MoE ' if moe else ''}layer ({name})":
           layer_activation_bytes(config, rows, length, mesh, moe=moe)}
    if logits:
        out[f"scoring logits chunks ({name})"] = logits
    return Phase(name, out)


def update_phase(name: str, cfg: RunConfig, student: ModelConfig, segments: Sequence[tuple[int, int]],
                 mesh: dict[str, int], attn: AttentionPlan) -> Phase:
    """The student's forward + backward on one micro-batch: ``segments`` are its ``(rows,
    length)`` row sets (the rollout rows, TOPD's guidance rows), each a forward of its own in
    the one loss. With remat, the saved layer inputs ``[rows, T, d]`` of every layer and
    segment (all live at the start of the backward), and the one layer being recomputed (its
    activations and their gradients: x2; attention with its backward); without remat (or a
    ``dots`` policy, counted as none: an upper bound), every layer's activations and attention
    intermediates of every segment; plus the loss's logits chunks (the largest segment's)."""
    n = student.num_layers
    layer = [layer_activation_bytes(student, r, t, mesh, moe=False) for r, t in segments]
    attention = [attention_bytes(student, r, t, t, mesh, attn=attn, backward=True) for r, t in segments]
    out = {}
    if student.remat == "full":
        out[f"saved layer inputs, {n} layers ({name}, remat full)"] = sum(
            n * _act_bytes((r, t, student.hidden_size), student.compute_dtype, ("act_batch", None, None), mesh)
            for r, t in segments)
        out[f"activations, one layer + gradients ({name})"] = 2 * max(layer)
        out[f"attention, one layer + backward ({name}; {attn.describe()})"] = max(attention)
    else:
        out[f"activations, {n} layers ({name}, remat {student.remat})"] = n * sum(layer)
        out[f"attention, {n} layers + backward ({name}; {attn.describe()})"] = n * sum(attention)
    chunk = cfg.loss.vocab_chunk
    out[f"loss logits {'chunks' if chunk else 'WHOLE (loss.vocab_chunk unset)'} ({name})"] = \
        max(logits_chunk_bytes(student, r, t, chunk, mesh) for r, t in segments)
    return Phase(name, out)


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
        width = max([52, *map(len, self.rows)])
        for name, b in self.rows.items():
            lines.append(f"  {name:<{width}} {b / GIB:10.3f} GiB  ({b:,} B)")
        lines.append(f"  {'total':<{width}} {self.total / GIB:10.3f} GiB")
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
    if t.detector in ("ot_embedding", "margin_w1"):  # C slots x n continuations per side, teacher always
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
    student; by the teacher in the warm-up; none for sft) and the K-token continuations' (the r
    sequences' cache shared by all their candidates, L slots in whole attention blocks, plus a
    private K-slot cache per continuation row: ``models.cache.BranchCache``)."""
    from topd_jax.train.loop import rollout_len
    if cfg.algorithm == "sft":  # trains on the files' responses: no sampling
        return {}
    r, length = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg)
    sampler, who = (teacher, "teacher") if cfg.algorithm == "warmup" else (student, "student")
    out = {f"{who} KV cache, rollouts [{r}x{length - 1}]": kv_cache_bytes(sampler, r, length - 1, mesh)}
    per_row, by_teacher, by_student = _continuation_rows(cfg)
    rows, shared, own = r * per_row, slots_for(length), slots_for(cfg.topd.window)
    for model, name, on in ((teacher, "teacher", by_teacher), (student, "student", by_student)):
        if on:
            out[f"{name} KV cache, continuations [{r}x{shared} shared + {rows}x{own}]"] = \
                kv_cache_bytes(model, r, shared, mesh) + kv_cache_bytes(model, rows, own, mesh)
    return out


def batch_bytes(cfg: RunConfig, teacher: ModelConfig | None, mesh: dict[str, int]) -> int:
    """Per-device bytes of the update batch (``step_batch``: ids, masks, teacher hidden states)."""
    return sum(row_bytes(x.shape, x.dtype, mesh) for x in step_batch(cfg, teacher).values())


def activation_phases(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig | None,
                      mesh: dict[str, int], backend: str, *, with_step: bool) -> list[Phase]:
    """The step's phases that hold activations, one after another: the teacher's (reference's)
    scoring forward over all rows, the teacher's guidance rows, the student's ℓ_t pass (forward +
    backward when fused), and (``with_step``) the student's update on one micro-batch (its rollout
    rows and guidance rows together). ``with_step`` False: the phases with a gradient are
    measured by compiling them (``compiled_temp_rows``) instead."""
    from topd_jax.train.loop import rollout_len
    r, length = cfg.data.prompts_per_step * cfg.rollout.n, rollout_len(cfg)
    k = cfg.topd.window
    g = r * guided_points(cfg) if cfg.uses_guidance else 0
    s_attn = attention_plan(student, backend)
    out = []
    if teacher is not None:
        t_attn = attention_plan(teacher, backend)
        # the warm-up's teacher scores in optim.micro_batches row groups (algorithms.warmup)
        groups = cfg.optim.micro_batches if cfg.algorithm == "warmup" else 1
        name = "teacher scoring" if cfg.needs_teacher else "reference scoring"
        # GRPO/TAPO's reference log-probs: one model's logits chunks (logits_chunk_bytes counts two)
        ref_logits = 0 if cfg.needs_teacher else logits_chunk_bytes(teacher, r, length, cfg.loss.vocab_chunk, mesh) // 2
        out.append(forward_phase(name if groups == 1 else f"{name}, {groups} row groups", teacher, r // groups,
                                 length, mesh, t_attn, logits=ref_logits))
        if g:
            out.append(forward_phase("teacher guidance rows", teacher, g, length + k, mesh, t_attn))
    if cfg.uses_detector:
        if not cfg.fuses_main_pass:
            out.append(forward_phase("student ℓ_t pass", student, r, length, mesh, s_attn,
                                     logits=logits_chunk_bytes(student, r, length, cfg.loss.vocab_chunk, mesh)))
        elif with_step:  # topd.fused_main_pass: the OPD term's forward + backward in prepare (else compiled)
            out.append(update_phase("student ℓ_t pass, fused", cfg, student, [(r, length)], mesh, s_attn))
    if with_step:
        mb = cfg.optim.micro_batches * (cfg.grpo.updates_per_batch if cfg.is_rl else 1)  # RL: mini-batches too
        segments = [(r // mb, length)] + ([(max(g // mb, 1), length + k)] if g else [])
        out.append(update_phase("student update" + (" with guidance rows" if g else ""), cfg, student, segments,
                                mesh, s_attn))
    return out


def memory_plan(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig | None, num_devices: int,
                *, backend: str, compile_step: bool = False) -> MemoryPlan:
    """The per-device plan of ``cfg`` on ``num_devices`` devices of ``backend`` (cpu | gpu | tpu:
    which attention implementation ``auto`` means; see the module docstring). ``teacher``: the
    distillation teacher, GRPO/TAPO's frozen reference policy, or None."""
    from topd_jax.train.optim import make_optimizer
    mesh = mesh_shape(cfg, num_devices)
    s_params = abstract_params(student)
    tx = make_optimizer(cfg.optim, cfg.steps)
    rows = {"student params": param_bytes(s_params, mesh),
            "optimizer state": opt_state_bytes(tx, s_params, mesh)}
    if teacher is not None:
        rows["teacher params" if cfg.needs_teacher else "reference params"] = \
            param_bytes(abstract_params(teacher), mesh)
    if cfg.uses_detector and cfg.topd.detector == "ot_embedding" and cfg.topd.ot_embedding == "student_initial":
        embed = nnx.State({"embed": s_params["embed"]})  # the frozen copy shards like the table
        rows["OT table (initial student's embeddings)"] = param_bytes(embed, mesh)
    rows.update(kv_rows(cfg, student, teacher, mesh))
    rows["update batch arrays"] = batch_bytes(cfg, teacher, mesh)
    notes = ["rows are summed, an upper bound: the KV caches of sampling and of the continuations "
             "are not all live at once (the student's rollout cache is kept for its continuations)"]
    if not cfg.needs_teacher:
        notes.append(f"{cfg.algorithm}: the objective's per-token float arrays (log-probs, "
                     "advantages) and TAPO's construction sampling are not counted")
    compile_step = compile_step and cfg.needs_teacher  # the abstract batch is the distillation one
    phases = activation_phases(cfg, student, teacher, mesh, backend, with_step=not compile_step)
    if phases:
        peak = max(phases, key=lambda p: p.total)
        rows.update(peak.rows)
        others = ", ".join(f"{p.name} {p.total / GIB:.2f} GiB" for p in phases if p is not peak)
        notes.append(f"activations: the rows are the largest phase ({peak.name}, {backend} backend)"
                     + (f"; the others: {others}" if others else ""))
    if compile_step:
        rows.update(compiled_temp_rows(cfg, student, teacher, s_params, tx))
    else:
        if cfg.fuses_main_pass:  # as compiled_temp_rows counts it
            rows["fused ℓ_t pass gradient (step input)"] = param_bytes(s_params, mesh)
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
        backend = args.backend or jax.default_backend()
        plan = memory_plan(cfg, student, teacher, n, backend=backend,
                           compile_step=args.compile and small and n == local and backend == jax.default_backend())
    except (RunSetupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format(args.device_memory_gib), flush=True)
    return 3 if args.device_memory_gib is not None and not plan.fits(args.device_memory_gib) else 0

