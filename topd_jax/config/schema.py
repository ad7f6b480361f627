"""The run config: typed, frozen dataclasses, one section per concern.

Every option of ``../shared/design/TOPD.md`` is a field here with the default named there.
Each field carries its help text (``metadata["help"]``) and, where it has one, a range
check (``metadata["check"]``); checks run in ``__post_init__``, so a config built in Python
is validated just like one loaded from YAML (``topd_jax.config.loader``). Errors are
``ConfigError`` naming the dotted key and the bad value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal


class ConfigError(ValueError):
    """A bad config key or value. ``key`` is the dotted path (``"topd.window"``)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}")

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}", self.message)


# ---- range checks: value -> error message or None (None values are never checked) ----
def _positive(v): return None if v > 0 else "must be > 0"
def _nonneg(v): return None if v >= 0 else "must be >= 0"
def _unit(v): return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"
def _open_unit(v): return None if 0.0 < v < 1.0 else "must be in (0, 1)"
def _half_open_unit(v): return None if 0.0 < v <= 1.0 else "must be in (0, 1]"
def _mesh_axis(v): return None if v == -1 or v >= 1 else "must be >= 1, or -1 (all remaining devices)"


def opt(default: Any, help: str, check: Callable[[Any], str | None] | None = None):
    """A config field with its help text and optional range check."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"help": help, "check": check})


def section(cls: type, help: str):
    """A nested config section (default-constructed)."""
    return field(default_factory=cls, metadata={"help": help, "check": None})


class _Checked:
    """Runs each field's range check; subclasses add cross-field checks in ``_validate``."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and value is not None:
                values = value if isinstance(value, tuple) else (value,)
                for v in values:
                    if (msg := check(v)) is not None:
                        raise ConfigError(f.name, f"{msg}, got {value!r}")
        self._validate()

    def _validate(self) -> None:
        pass


Dtype = Literal["float32", "bfloat16"]
_ARCH_REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size")


@dataclass(frozen=True)
class ModelSpec(_Checked):
    """Where a model comes from: a local HF directory, a named preset, or explicit sizes.

    Architecture fields left ``None`` come from ``path``/``preset``; set ones override them
    (with neither, all of ``vocab_size … intermediate_size`` must be given: random init).
    """
    path: str | None = opt(None, "local HF model directory (config.json + safetensors)")
    preset: str | None = opt(None, "named ModelConfig preset (random weights), e.g. qwen3-4b")
    vocab_size: int | None = opt(None, "vocabulary size override", _positive)
    hidden_size: int | None = opt(None, "hidden size override", _positive)
    num_layers: int | None = opt(None, "number of decoder layers override", _positive)
    num_heads: int | None = opt(None, "attention heads override", _positive)
    num_kv_heads: int | None = opt(None, "key/value heads override (GQA)", _positive)
    head_dim: int | None = opt(None, "per-head dimension override", _positive)
    intermediate_size: int | None = opt(None, "MLP intermediate size override", _positive)
    max_position_embeddings: int | None = opt(None, "max positions override", _positive)
    rope_theta: float | None = opt(None, "RoPE base override", _positive)
    rms_norm_eps: float | None = opt(None, "RMSNorm epsilon override", _positive)
    tie_word_embeddings: bool | None = opt(None, "tie input embedding and LM head")
    qk_norm: bool | None = opt(None, "per-head RMSNorm on q/k (Qwen3 style)")
    qkv_bias: bool | None = opt(None, "bias on q/k/v projections (Qwen2/2.5 style)")
    dtype: Dtype = opt("float32", "compute dtype")
    param_dtype: Dtype = opt("float32", "parameter dtype")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = opt(
        "none", "rematerialisation policy per layer (topd_jax.models)")
    attention: Literal["auto", "xla", "chunked", "cudnn", "splash"] = opt(
        "auto", "attention kernel (topd_jax.models.attention): auto = cudnn on GPU (bf16/fp16), "
        "splash on TPU, chunked online-softmax otherwise; xla = einsum with [B, N, T, S] scores")

    def _validate(self):
        if self.path is not None and self.preset is not None:
            raise ConfigError("preset", f"give either path ({self.path!r}) or preset "
                              f"({self.preset!r}), not both")
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ConfigError("num_kv_heads", f"num_heads={self.num_heads} is not a multiple "
                              f"of num_kv_heads={self.num_kv_heads}")

    @property
    def is_specified(self) -> bool:
        """True when the model can be built: a path, a preset or every required size."""
        return (self.path is not None or self.preset is not None
                or all(getattr(self, k) is not None for k in _ARCH_REQUIRED))

    def arch_overrides(self) -> dict[str, Any]:
        """The architecture fields set in this spec, as ``ModelConfig`` keyword arguments."""
        skip = {"path", "preset", "dtype", "param_dtype", "remat", "attention"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class MeshConfig(_Checked):
    """Device mesh (data, fsdp, tensor); the logical-axis rules live in topd_jax.sharding."""
    data: int = opt(-1, "data-parallel axis size (-1: all remaining devices)", _mesh_axis)
    fsdp: int = opt(1, "fully-sharded axis size (-1: all remaining devices)", _mesh_axis)
    tensor: int = opt(1, "tensor-parallel axis size (-1: all remaining devices)", _mesh_axis)

    def _validate(self):
        if (self.data, self.fsdp, self.tensor).count(-1) > 1:
            raise ConfigError("data", "at most one mesh axis may be -1, got "
                              f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}")


@dataclass(frozen=True)
class DistributedConfig(_Checked):
    """Multi-host start-up (topd_jax.sharding.distributed); unset: TOPD_* / SLURM / TPU env."""
    coordinator: str | None = opt(None, "host:port of process 0 (else TOPD_COORDINATOR)")
    num_processes: int | None = opt(None, "processes in the job (else TOPD_NUM_PROCESSES)",
                                    _positive)
    process_id: int | None = opt(None, "this process's index (else TOPD_PROCESS_ID)", _nonneg)


@dataclass(frozen=True)
class SyntheticConfig(_Checked):
    """The embedded arithmetic-chain task (topd_jax.data.synthetic)."""
    num_train: int = opt(4096, "training problems generated", _positive)
    num_eval: int = opt(256, "held-out evaluation problems", _positive)
    min_steps: int = opt(2, "fewest derived variables per problem", _positive)
    max_steps: int = opt(4, "most derived variables per problem (<= 7)", _positive)
    modulus: int = opt(7, "arithmetic modulus, a prime <= 100 (larger: harder to learn)",
                       _positive)
    seed: int = opt(1234, "generation seed (eval set uses a disjoint stream)")

    def _validate(self):
        if self.min_steps > self.max_steps:
            raise ConfigError("min_steps", f"min_steps={self.min_steps} > "
                              f"max_steps={self.max_steps}")
        if self.max_steps > 7:
            raise ConfigError("max_steps", f"at most 7 (variables a..h), got {self.max_steps}")
        if self.modulus < 2 or self.modulus > 100 or any(self.modulus % d == 0 for d in range(2, self.modulus)):
            raise ConfigError("modulus", f"must be a prime <= 100, got {self.modulus}")


@dataclass(frozen=True)
class DataConfig(_Checked):
    """Prompt source and batching (topd_jax.data.prompts)."""
    source: Literal["files", "synthetic", "labelled"] = opt(
        "files", "prompt files, the synthetic task, or the labelled synthetic task (every "
        "completion token gets a ground-truth label: topd_jax.data.labelled)")
    train_files: tuple[str, ...] = opt((), "JSONL/parquet files with problem/answer fields")
    eval_files: tuple[str, ...] = opt((), "held-out JSONL/parquet files for the eval hook")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the student's path)")
    template: Literal["qwen-chat", "paper", "plain"] = opt(
        "qwen-chat", "prompt format (topd_jax.data.templates); plain: the problem text as is")
    system_prompt: str | None = opt(None, "system message (qwen-chat)")
    thinking: bool = opt(True, "qwen-chat: False appends Qwen3's empty think block")
    instruction: str | None = opt(None, "qwen-chat instruction after the problem (None: "
                                  "the template's boxed-answer default)")
    prompts_per_step: int = opt(1, "prompts per optimizer step (global, all hosts)", _positive)
    max_prompt_len: int = opt(800, "prompts longer than this (tokens) are skipped", _positive)
    shuffle: bool = opt(True, "shuffle prompts (seeded, reshuffled every epoch)")
    epochs: int | None = opt(None, "passes over the prompts (None: repeat forever)", _positive)
    response_field: str = opt("response", "algorithm=sft: the record field holding the target "
                              "text (truncated to rollout.max_new_tokens tokens)")
    synthetic: SyntheticConfig = section(SyntheticConfig, "synthetic demo task")

    def _validate(self):
        if self.source == "files" and not self.train_files:
            raise ConfigError("train_files", "data.source='files' needs at least one file")
        if self.template != "qwen-chat" and (self.system_prompt is not None
                                             or self.instruction is not None or not self.thinking):
            raise ConfigError("template", f"system_prompt, instruction and thinking apply to "
                              f"qwen-chat only, got template={self.template!r}")


@dataclass(frozen=True)
class RolloutConfig(_Checked):
    """Student sampling (paper: n=4, temperature 1.0, top_p 1.0, <= 8000 new tokens)."""
    n: int = opt(4, "rollouts per prompt", _positive)
    temperature: float = opt(1.0, "sampling temperature", _positive)
    top_p: float = opt(1.0, "nucleus sampling mass", _half_open_unit)
    top_k: int | None = opt(None, "sample among the k most likely tokens (None: all)", _positive)
    max_new_tokens: int = opt(8000, "new tokens per rollout", _positive)


@dataclass(frozen=True)
class LossConfig(_Checked):
    """Per-token OPD loss on the student's rollouts (TOPD.md §1)."""
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = opt(
        "reverse_kl", "per-token divergence between student and teacher")
    jsd_beta: float = opt(0.5, "generalized JSD interpolation (divergence=jsd)", _open_unit)
    estimator: Literal["full_vocab", "sampled_token"] = opt(
        "full_vocab", "full-vocabulary divergence, or log p_s(y_t) - log p_T(y_t) as a "
        "per-token policy-gradient reward (Tinker style)")
    kd_temperature: float = opt(1.0, "temperature applied to both models' logits", _positive)
    vocab_chunk: int | None = opt(None, "chunk the vocabulary when scoring (None: whole)",
                                  _positive)


@dataclass(frozen=True)
class TopdConfig(_Checked):
    """Candidates, near-future detector, suppression and guidance (TOPD.md §2–4)."""
    candidate_mode: Literal["top_c", "quantile"] = opt("top_c", "how high-loss candidates "
                                                       "are picked per rollout")
    num_candidates: int = opt(3, "C: candidates per rollout (top_c)", _positive)
    min_separation: int = opt(8, "minimum token gap between candidates (top_c)", _nonneg)
    candidate_quantile: float = opt(0.8, "q: positions above this loss quantile (quantile)",
                                    _unit)
    detector: Literal["ot_embedding", "margin_w1", "kl_window", "oracle"] = opt(
        "ot_embedding", "near-future divergence D_t between teacher and student futures; "
        "oracle: the task's ground-truth labels instead of a detector (a SURFACE candidate is a "
        "false alarm, D = 1 at FORK/RECOVERY, 0 at SURFACE, 0.5 otherwise; needs a task with a "
        "labeller: data.source=synthetic|labelled)")
    window: int = opt(50, "K: near-future window length in tokens", _positive)
    rollback: int = opt(1, "tokens rolled back before branching (1: regenerate y_t)", _positive)
    continuation_temperature: float = opt(1.0, "sampling temperature of the K-token "
                                          "continuations", _positive)
    continuations_per_side: int = opt(1, "continuations per side (ot_embedding)", _positive)
    reuse_student_suffix: bool = opt(False, "use the rollout's own y_t..y_{t+K-1} as the "
                                     "student future (saves one generation)")
    fused_main_pass: bool = opt(True, "take ℓ_t from the update's own forward pass (jax.vjp) "
                                "and reuse its residuals for the OPD gradient, instead of a "
                                "separate no-gradient pass (needs optim.micro_batches=1 and the "
                                "full_vocab estimator; otherwise the separate pass runs)")
    ot_solver: Literal["sinkhorn", "sinkhorn_divergence", "exact"] = opt(
        "sinkhorn", "OT solver (ot_embedding): sinkhorn <P_eps, C> (biased up by as much as "
        "eps*ln K), sinkhorn_divergence (debiased: OT(a,b) - OT(a,a)/2 - OT(b,b)/2, 0 for "
        "identical windows), exact (SciPy assignment / LP on the host)")
    ot_embedding: Literal["student", "student_initial", "teacher"] = opt(
        "student_initial", "embedding table of the OT cost (ot_embedding): the initial "
        "student's or the teacher's (both frozen: D and the mean local OT are comparable across "
        "steps and runs), or the current student's (changes every step, so the local OT drifts "
        "with training)")
    ot_window_end: Literal["shorten", "pad_eos"] = opt(
        "shorten", "a continuation that stops before K tokens: shorten (uniform mass over its "
        "tokens; a late mismatch weighs more) or pad_eos (pad it with eos to K tokens, so an "
        "early stop is itself a mismatch)")
    sinkhorn_epsilon: float = opt(0.05, "entropic regularisation (sinkhorn)", _positive)
    sinkhorn_iters: int = opt(200, "Sinkhorn iterations", _positive)
    margin_samples: int = opt(4, "N continuations per side (margin_w1)", _positive)
    false_alarm_quantile: float = opt(0.3, "candidates with D_t at or below this quantile "
                                      "(over the batch) are false alarms", _unit)
    false_alarm_rule: Literal["quantile", "teacher_null"] = opt(
        "quantile", "quantile: the false_alarm_quantile rule (its share of candidates is q by "
        "definition); teacher_null: D(teacher, student) <= D(teacher, teacher') from the same "
        "prefix (a measured share; needs detector=ot_embedding, continuations_per_side >= 2)")
    suppression: Literal["default", "none", "false_alarms", "high_divergence"] = opt(
        "default", "which candidates get weight s in the OPD loss; default: false_alarms "
        "for topd, none for opd (set false_alarms on opd for OPD+suppression; "
        "high_divergence is the paper's ablation)")
    suppression_weight: float = opt(0.0, "s: loss weight of suppressed positions (0: mask)",
                                    _unit)
    guidance: bool = opt(True, "multi-token guidance at divergent states (topd only)")
    max_guided_points: int | None = opt(1, "guided points per rollout, most divergent first "
                                        "(None: all divergent)", _positive)
    guidance_window: int | None = opt(None, "guidance tokens per guided point: L_traj reads the "
                                      "first guidance_window tokens of the K-token teacher "
                                      "continuation (None: topd.window; 1: single-token guidance, "
                                      "the TOPD-K1 arm)", _positive)
    guidance_weight: float = opt(1.0, "lambda: weight of L_traj", _nonneg)
    guidance_decay: float = opt(1.0, "gamma: weight gamma^i on guidance position i "
                                "(1: uniform)", _half_open_unit)
    guidance_target: Literal["teacher_kl", "teacher_tokens", "student_positions"] = opt(
        "teacher_kl", "forward KL on the teacher's continuation, NLL of its tokens, or "
        "targets on the student's own future positions")

    def _validate(self):
        if self.guidance_window is not None and self.guidance_window > self.window:
            raise ConfigError("guidance_window", f"guidance_window={self.guidance_window} > "
                              f"window={self.window}: guidance reads at most the K-token window")
        if self.false_alarm_rule == "teacher_null":
            if self.detector != "ot_embedding":
                raise ConfigError("false_alarm_rule", f"teacher_null compares two teacher "
                                  f"continuations by OT: needs detector=ot_embedding, got "
                                  f"detector={self.detector!r}")
            if self.continuations_per_side < 2:
                raise ConfigError("false_alarm_rule", f"teacher_null needs a second teacher "
                                  f"sample: continuations_per_side >= 2, got "
                                  f"{self.continuations_per_side}")


@dataclass(frozen=True)
class WarmupConfig(_Checked):
    """Stage-1 off-policy warm-up on teacher samples: alpha*CE + (1-alpha)*forward KL."""
    ce_weight: float = opt(0.5, "alpha: weight of cross-entropy on the teacher's tokens", _unit)
    temperature: float = opt(0.6, "teacher sampling temperature", _positive)
    top_p: float = opt(0.95, "teacher nucleus sampling mass", _half_open_unit)
    max_new_tokens: int = opt(16384, "teacher response length", _positive)


@dataclass(frozen=True)
class GrpoConfig(_Checked):
    """GRPO (algorithm grpo, and tapo's base): group-normalised advantages over the
    ``rollout.n`` samples of a prompt, PPO-clipped token surrogate (TAPO.md steps 1-2)."""
    clip_low: float = opt(0.2, "PPO clip: ratio floor 1 - clip_low", _open_unit)
    clip_high: float = opt(0.2, "PPO clip: ratio ceiling 1 + clip_high (DAPO: 0.28)", _positive)
    advantage_eps: float = opt(1e-6, "epsilon in (r - mean) / (std + eps)", _positive)
    advantage_scale: Literal["std", "none"] = opt(
        "std", "divide advantages by the group std (none: Dr. GRPO, r - mean only)")
    aggregation: Literal["token_mean", "sequence_mean"] = opt(
        "token_mean", "token_mean: sum over all tokens / token count (DAPO); sequence_mean: "
        "mean over sequences of each sequence's token mean (original GRPO)")
    kl_coef: float = opt(0.0, "weight of the KL to the reference policy (the initial "
                         "student, kept frozen); 0: no reference model is loaded", _nonneg)
    kl_estimator: Literal["k1", "k3"] = opt("k3", "per-token KL estimator (k3: Schulman's)")
    updates_per_batch: int = opt(1, "optimizer updates per rollout batch, on that many row "
                                 "mini-batches (> 1 makes the PPO clip active)", _positive)


@dataclass(frozen=True)
class TapoConfig(_Checked):
    """TAPO: corrected versions of wrong rollouts written by the policy (TAPO.md steps 3-8)."""
    n_pos: int = opt(2, "DCS gate: at least this many right rollouts in the group", _positive)
    n_neg: int = opt(4, "DCS gate: at least this many wrong rollouts in the group", _positive)
    m_max: int = opt(4, "at most this many constructions per prompt", _positive)
    ref_weight: float = opt(1.0, "lambda: weight of L_ref", _nonneg)
    ref_group: Literal["batch", "prompt"] = opt(
        "batch", "scope of G_ref's advantage normalisation: all constructions of the batch, "
        "or per prompt (zero-variance groups give no signal; logged)")
    construction_mode: Literal["splice", "text"] = opt(
        "splice", "splice: the wrong rollout's own token ids up to the verified common prefix, "
        "then the new tokens; text: trust the re-typed reconstruction")
    min_prefix: int = opt(0, "constructions sharing fewer prefix tokens with the wrong "
                          "rollout are dropped", _nonneg)
    temperature: float | None = opt(None, "construction sampling temperature (None: "
                                    "rollout.temperature)", _positive)
    max_new_tokens: int | None = opt(None, "construction length (None: 2 x "
                                     "rollout.max_new_tokens + 64)", _positive)
    max_synthesis_prompt_len: int | None = opt(
        None, "synthesis prompts longer than this are dropped (None: data.max_prompt_len + "
        "2 x rollout.max_new_tokens + 64)", _positive)
    ots: bool = opt(True, "OOD-token suppression weights on constructed trajectories")
    ots_low: float = opt(0.01, "OTS weight floor", _positive)
    ots_high: float = opt(10.0, "OTS weight ceiling", _positive)
    mask_error_prefix: bool = opt(False, "exclude the spliced wrong prefix from L_ref")

    def _validate(self):
        if self.ots_low > self.ots_high:
            raise ConfigError("ots_low", f"ots_low={self.ots_low} > ots_high={self.ots_high}")


@dataclass(frozen=True)
class OptimConfig(_Checked):
    """AdamW with warm-up + cosine to min_lr, global-norm clipping, grad accumulation."""
    lr: float = opt(2e-6, "peak learning rate", _positive)
    min_lr: float = opt(1e-8, "learning rate at the end of the cosine", _nonneg)
    warmup_fraction: float = opt(0.05, "fraction of steps with linear warm-up", _unit)
    b1: float = opt(0.9, "AdamW beta1", _open_unit)
    b2: float = opt(0.98, "AdamW beta2", _open_unit)
    eps: float = opt(1e-8, "AdamW epsilon", _positive)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", _nonneg)
    clip_norm: float | None = opt(1.0, "global gradient-norm clip (None: off)", _positive)
    micro_batches: int = opt(1, "gradient-accumulation micro-batches per step", _positive)

    def _validate(self):
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"min_lr={self.min_lr} > lr={self.lr}")


@dataclass(frozen=True)
class CheckpointConfig(_Checked):
    """Orbax checkpoints of the train state, data iterator, config and metrics step."""
    dir: str | None = opt(None, "checkpoint directory (None: <output_dir>/checkpoints)")
    every: int = opt(100, "save every N steps (and always at the end)", _positive)
    keep: int = opt(3, "keep the last k checkpoints", _positive)
    async_save: bool = opt(True, "write checkpoints in the background")
    resume: bool = opt(True, "resume from the latest good checkpoint if one exists")
    export_hf: bool = opt(True, "export the final student as an HF directory")


@dataclass(frozen=True)
class LoggingConfig(_Checked):
    """Metric sinks (topd_jax.train.metrics); only process 0 writes."""
    every: int = opt(1, "log every N steps", _positive)
    stdout: bool = opt(True, "one summary line per logged step")
    jsonl: bool = opt(True, "<output_dir>/metrics.jsonl")
    tensorboard: bool = opt(True, "TensorBoard event file under <output_dir>/tb")
    progress_bar: bool = opt(True, "tqdm progress bar")
    wandb: bool = opt(False, "also log to Weights & Biases (needs `pip install wandb`; a new W&B "
                      "run per start, so a resumed run's rows begin after the restored step)")
    wandb_project: str | None = opt(None, "W&B project (None: wandb's default / WANDB_PROJECT)")
    wandb_entity: str | None = opt(None, "W&B entity (None: wandb's default / WANDB_ENTITY)")
    wandb_name: str | None = opt(None, "W&B run name (None: wandb picks one)")
    label_metrics: bool = opt(True, "per-step label_* metrics from the task's ground-truth labels "
                              "(synthetic and labelled tasks; a no-op without a labeller)")
    grad_norms_by_term: bool = opt(False, "log grad_norm_opd and grad_norm_traj, the norms of the "
                                   "two loss terms' gradients (one extra backward pass per term)")


@dataclass(frozen=True)
class EvalConfig(_Checked):
    """Periodic accuracy on held-out prompts with the verifier."""
    every: int = opt(0, "evaluate every N steps (0: never during training)", _nonneg)
    at_start: bool = opt(True, "evaluate before the first step")
    at_end: bool = opt(True, "evaluate after the last step")
    num_prompts: int | None = opt(None, "held-out prompts used (None: all)", _positive)
    samples_per_prompt: int = opt(1, "samples per prompt (pass@1 averaged)", _positive)
    temperature: float = opt(0.6, "evaluation sampling temperature", _nonneg)
    max_new_tokens: int = opt(16384, "evaluation response length", _positive)
    seed: int = opt(0, "seed of the evaluation sampling key (independent of the run's seed, so "
                    "arms with different seeds are evaluated with the same random numbers)")


@dataclass(frozen=True)
class DemoConfig(_Checked):
    """The embedded demo's own stages: a tiny teacher trained to high accuracy on reference
    solutions (cached), a student warmed up on noisy ones to be mediocre."""
    cache_dir: str = opt("runs/demo_cache", "where the trained tiny teacher/student are cached")
    teacher_steps: int = opt(1500, "supervised steps for the tiny teacher", _nonneg)
    student_steps: int = opt(300, "supervised warm-up steps for the student", _nonneg)
    batch_size: int = opt(64, "sequences per supervised step", _positive)
    lr: float = opt(3e-3, "supervised learning rate", _positive)
    student_noise: float = opt(0.3, "probability that a warm-up solution has a slip", _unit)
    student_confusion: float = opt(0.0, "probability that the student's warm-up data writes a "
                                   "'-' step as '+' (a systematic misconception: above 0.5 "
                                   "the student's accuracy levels off below the teacher's)", _unit)


@dataclass(frozen=True)
class ColdStartConfig(_Checked):
    """TAPO's cold start on the synthetic task (topd_jax.demos.rl_demo, algorithm grpo|tapo):
    supervised CE of the student on solutions (a slip with probability demo.student_noise)
    mixed with construction-task examples; demo.batch_size, demo.lr and demo.cache_dir apply."""
    steps: int = opt(1500, "supervised steps of the cold start", _nonneg)
    construction_fraction: float = opt(1 / 3, "share of construction-task examples in each "
                                       "batch (paper: 15k of 45k)", _unit)


@dataclass(frozen=True)
class LabelledConfig(_Checked):
    """The labelled task's models (topd_jax.demos.labelled_demo, data.source=labelled): the
    recipe (every field is in the cache key) and the gates the models must pass before a
    comparison (TOPD_REVIEW §4.3). Sizes come from teacher/student; demo.cache_dir applies."""
    teacher_steps: int = opt(5000, "supervised steps of the teacher", _nonneg)
    teacher_lr: float = opt(1e-2, "teacher learning rate (5 % warm-up, then constant)", _positive)
    teacher_slip_rate: float = opt(0.6, "share of teacher solutions with planted slips, each "
                                   "repaired by 'wait fix <line>' (the wrong value is no target)",
                                   _unit)
    teacher_max_slips: int = opt(2, "most planted slips per teacher solution (1..this many, "
                                 "uniform)", _positive)
    teacher_slip_kind: Literal["unreduced", "random"] = opt(
        "unreduced", "the planted slips (teacher data and the recovery gate): unreduced = the "
        "result without its mod p (the student's misconception, see student_confusion; a value "
        ">= p the teacher can tell is wrong); random = a random wrong residue (the tiny teachers "
        "did not learn to detect these: recovery 0-36 %)")
    decision_weight: float = opt(10.0, "teacher loss weight of the token after each result "
                                 "value ('wait' vs going on): the comparison recovery needs is "
                                 "a small share of the tokens and is not learned at weight 1",
                                 _positive)
    student_steps: int = opt(3000, "supervised steps of the student (until its greedy accuracy "
                             "plateaus: see curve_every)", _nonneg)
    student_lr: float = opt(1e-2, "student learning rate (5 % warm-up, then constant)", _positive)
    student_slip_rate: float = opt(0.5, "share of student solutions with an unrepaired slip", _unit)
    student_confusion: float = opt(0.7, "probability that a '+' or '*' step of a student "
                                   "solution is written without its mod p (a systematic "
                                   "misconception, never repaired: above 0.5 the fully trained "
                                   "student's greedy answer is wrong wherever the raw result is "
                                   ">= p, so its accuracy plateaus well below the teacher's)", _unit)
    batch_size: int = opt(32, "sequences per supervised step", _positive)
    curve_every: int = opt(500, "greedy accuracy measured every this many steps while training "
                           "(the accuracy-vs-steps curve in demo_meta.json; 0: off)", _nonneg)
    min_teacher_accuracy: float = opt(0.95, "gate: teacher greedy accuracy on held-out problems",
                                      _unit)
    min_teacher_recovery: float = opt(0.9, "gate: teacher recovery rate on planted slips", _unit)
    max_teacher_spurious: float = opt(0.05, "gate: share of the teacher's greedy solutions with "
                                      "a 'wait' after a correct value", _unit)
    student_accuracy_range: tuple[float, ...] = opt((0.2, 0.6), "gate: [low, high] of the "
                                                     "student's greedy accuracy (room for OPD)",
                                                     _unit)
    max_student_recovery: float = opt(0.05, "gate: student recovery rate (it must lack recovery)",
                                      _unit)
    plateau_tolerance: float = opt(0.05, "gate: the student's greedy accuracy changed by at "
                                   "most this much over its last curve interval (past its "
                                   "warm-up jump)", _unit)

    def _validate(self):
        r = self.student_accuracy_range
        if len(r) != 2 or r[0] > r[1]:
            raise ConfigError("student_accuracy_range", f"must be [low, high] with low <= high, "
                              f"got {r!r}")


Algorithm = Literal["opd", "topd", "warmup", "grpo", "tapo", "sft"]
RL_ALGORITHMS = ("grpo", "tapo")


@dataclass(frozen=True)
class RunConfig(_Checked):
    """A whole run. ``algorithm`` selects the wiring; the sections hold every option."""
    algorithm: Algorithm = opt("opd", "opd | topd | warmup (stage-1 off-policy warm-up) | grpo "
                               "| tapo (RL with verifiable rewards; no teacher) | sft (supervised "
                               "on the files' data.response_field; e.g. TAPO's cold start)")
    steps: int = opt(1000, "optimizer steps", _positive)
    seed: int = opt(0, "seed of every PRNG stream (sampling, shuffling, init)")
    output_dir: str = opt("runs/default", "metrics, plots, report and (default) checkpoints")
    max_nonfinite_steps: int = opt(5, "halt after this many non-finite losses in a row",
                                   _positive)
    student: ModelSpec = section(ModelSpec, "the trained model")
    teacher: ModelSpec = section(ModelSpec, "the frozen teacher")
    mesh: MeshConfig = section(MeshConfig, "device mesh")
    distributed: DistributedConfig = section(DistributedConfig, "multi-host start-up")
    data: DataConfig = section(DataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "student sampling")
    loss: LossConfig = section(LossConfig, "per-token OPD loss")
    topd: TopdConfig = section(TopdConfig, "TOPD detector, suppression and guidance")
    warmup: WarmupConfig = section(WarmupConfig, "stage-1 warm-up")
    grpo: GrpoConfig = section(GrpoConfig, "GRPO (grpo and tapo)")
    tapo: TapoConfig = section(TapoConfig, "TAPO constructions")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpointing")
    logging: LoggingConfig = section(LoggingConfig, "metrics sinks")
    eval: EvalConfig = section(EvalConfig, "evaluation hook")
    demo: DemoConfig = section(DemoConfig, "embedded demo stages")
    cold_start: ColdStartConfig = section(ColdStartConfig, "GRPO/TAPO demo: cold-start SFT")
    labelled: LabelledConfig = section(LabelledConfig, "labelled task: model recipe and gates")

    def _validate(self):
        for name in ("student", "teacher") if self.needs_teacher else ("student",):
            if not getattr(self, name).is_specified:
                raise ConfigError(f"{name}.path", "no model given: set path, preset, or all of "
                                  + ", ".join(_ARCH_REQUIRED))
        if self.rollout.n * self.data.prompts_per_step % self.optim.micro_batches:
            raise ConfigError("optim.micro_batches", f"{self.optim.micro_batches} does not "
                              f"divide rollout.n * data.prompts_per_step = "
                              f"{self.rollout.n * self.data.prompts_per_step}")
        if self.is_rl:
            # TAPO adds m_max construction slots per prompt to the batch's rows.
            per_prompt = self.rollout.n + (self.tapo.m_max if self.algorithm == "tapo" else 0)
            rows = per_prompt * self.data.prompts_per_step
            if rows % (self.grpo.updates_per_batch * self.optim.micro_batches):
                raise ConfigError("grpo.updates_per_batch", f"updates_per_batch="
                                  f"{self.grpo.updates_per_batch} x optim.micro_batches="
                                  f"{self.optim.micro_batches} does not divide the {rows} rows of a "
                                  f"step (data.prompts_per_step x (rollout.n"
                                  f"{' + tapo.m_max' if self.algorithm == 'tapo' else ''}))")
            if self.rollout.n < 2:
                raise ConfigError("rollout.n", f"{self.algorithm} needs >= 2 rollouts per prompt "
                                  f"(group-normalised advantages), got {self.rollout.n}")
        if self.algorithm == "tapo" and self.tapo.n_pos + self.tapo.n_neg > self.rollout.n:
            raise ConfigError("tapo.n_pos", f"n_pos={self.tapo.n_pos} + n_neg={self.tapo.n_neg} > "
                              f"rollout.n={self.rollout.n}: no group can pass the DCS gate")
        if self.logging.grad_norms_by_term and self.algorithm not in ("opd", "topd"):
            raise ConfigError("logging.grad_norms_by_term", f"the L_OPD and L_traj gradient norms "
                              f"exist for algorithm=opd|topd, got algorithm={self.algorithm}")
        if self.is_rl and self.data.source == "labelled":
            raise ConfigError("data.source", f"algorithm={self.algorithm} has no cold start for the "
                              "labelled task; use data.source=synthetic (or algorithm=opd|topd)")
        if self.algorithm == "sft" and self.data.source != "files":
            raise ConfigError("data.source", "algorithm=sft trains on the files' responses; "
                              f"got data.source={self.data.source!r}")
        if self.topd.false_alarm_rule == "teacher_null" and self.suppression == "high_divergence":
            raise ConfigError("topd.false_alarm_rule", "teacher_null classifies each candidate "
                              "against the teacher's own spread; it has no matched high-divergence "
                              "set: use false_alarm_rule=quantile with suppression=high_divergence")
        if self.uses_guidance and self.suppression == "high_divergence":
            raise ConfigError("topd.suppression", "high_divergence suppresses the candidates "
                              "guidance would pick (the most divergent ones); the paper's "
                              "ablation has no guidance: set topd.guidance=false or "
                              "algorithm=opd")
        if self.algorithm == "warmup" and self.loss.estimator == "sampled_token":
            raise ConfigError("loss.estimator", "the warm-up stage trains on teacher samples; "
                              "the sampled-token estimator is on-policy only")

    # ---- derived, so that no caller has to re-implement defaults ----
    @property
    def suppression(self) -> str:
        """Resolved suppression mode: ``none``, ``false_alarms`` or ``high_divergence``."""
        if self.topd.suppression != "default":
            return self.topd.suppression
        return "false_alarms" if self.algorithm == "topd" else "none"

    @property
    def uses_detector(self) -> bool:
        """Whether candidates and D_t must be computed (TOPD, or OPD with suppression)."""
        return self.algorithm == "topd" or (self.algorithm == "opd"
                                            and self.suppression != "none")

    @property
    def needs_teacher(self) -> bool:
        """The distillation algorithms (opd, topd, warmup) load a teacher; sft and RL do not."""
        return self.algorithm in ("opd", "topd", "warmup")

    @property
    def is_rl(self) -> bool:
        """GRPO/TAPO: rewards from the verifier, no teacher."""
        return self.algorithm in RL_ALGORITHMS

    @property
    def uses_reference(self) -> bool:
        """Whether a frozen reference policy is loaded (the KL term of GRPO/TAPO)."""
        return self.is_rl and self.grpo.kl_coef > 0

    @property
    def fuses_main_pass(self) -> bool:
        """Whether the detector's ℓ_t comes from the OPD term's own forward (``topd.fused_main_pass``)."""
        return (self.uses_detector and self.topd.fused_main_pass and self.optim.micro_batches == 1
                and self.loss.estimator == "full_vocab")

    @property
    def uses_guidance(self) -> bool:
        return self.algorithm == "topd" and self.topd.guidance and self.topd.guidance_weight > 0

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.output_dir}/checkpoints"
