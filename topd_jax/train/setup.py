"""Everything a run needs, checked before anything is written or compiled.

``plan_run(cfg, student_path, teacher_path)`` resolves the model configs (reading only
``config.json``), checks teacher/student vocabularies, loads the tokenizer and every prompt
file (errors name the file and line), and builds the mesh. Nothing touches
``cfg.output_dir`` here: a bad input fails before a half-written run directory exists.
``load_models(plan)`` then loads (or randomly initialises) the models onto the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax

from topd_jax.data import labelled, synthetic
from topd_jax.data.prompts import PromptExample, load_prompts
from topd_jax.data.tasks import MATH, task_for
from topd_jax.losses import common_vocab_size
from topd_jax.models import ModelConfig
from topd_jax.sharding import MeshConfig as ShardingMesh
from topd_jax.sharding import make_mesh
from topd_jax.config.schema import ModelSpec, RunConfig


@dataclass(frozen=True)
class ModelPlan:
    role: str
    path: str | None        # local HF / native directory, or None (random init)
    config: ModelConfig     # from the directory's config (overrides applied) or the spec
    seed: int


@dataclass
class TextIO:
    """How prompts become tokens and completions become text, plus the verifier."""
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    verify: Callable[[str, Any], bool]
    eos_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    hf_tokenizer: Any = None  # saved next to the HF export when present
    # Completion text -> ids without any prefix token (a model's continuation; TAPO
    # re-tokenizes reconstructions). None: ``encode`` (adds nothing already).
    encode_completion: Callable[[str], list[int]] | None = None


@dataclass
class RunPlan:
    cfg: RunConfig
    student: ModelPlan
    teacher: ModelPlan | None  # GRPO/TAPO: the frozen reference policy, or None without a KL term
    text: TextIO
    train_examples: list[PromptExample]
    eval_examples: list[PromptExample]
    skipped_prompts: int
    mesh: jax.sharding.Mesh
    format_prompt: Callable[[str], str] | None = None  # problem text -> model input (the data template)


class RunSetupError(ValueError):
    """A run cannot start; the message names the bad input."""


def model_plan(spec: ModelSpec, role: str, path: str | None, seed: int) -> ModelPlan:
    """Resolve a ``ModelSpec`` (explicit path argument wins) into a ``ModelConfig``."""
    path = path if path is not None else spec.path
    extra = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat, attention=spec.attention)
    overrides = spec.arch_overrides()
    if path is not None:
        from topd_jax.checkpoints import check_local_dir, read_hf_config
        from topd_jax.checkpoints import native
        try:
            directory = check_local_dir(path)
        except FileNotFoundError as e:
            raise RunSetupError(f"{role}.path: {e}") from None
        try:
            base = (native.read_native_config(directory) if native.is_native_dir(directory)
                    else ModelConfig.from_hf_config(read_hf_config(directory)))
        except (FileNotFoundError, ValueError) as e:
            raise RunSetupError(f"{role}.path {path!r}: {e}") from None
        conflicts = {k: (v, getattr(base, k)) for k, v in overrides.items() if getattr(base, k) != v}
        if conflicts:
            listed = ", ".join(f"{role}.{k}={v!r} (the checkpoint has {b!r})" for k, (v, b) in conflicts.items())
            raise RunSetupError(f"{role}.path {path!r}: architecture overrides contradict the checkpoint: "
                                f"{listed}; they apply to random initialisation only")
        return ModelPlan(role, str(directory), base.replace(**extra), seed)
    if spec.preset is not None:
        try:
            return ModelPlan(role, None, ModelConfig.preset(spec.preset, **overrides, **extra), seed)
        except KeyError as e:
            raise RunSetupError(f"{role}.preset: {e.args[0]}") from None
    return ModelPlan(role, None, ModelConfig(**overrides, **extra), seed)


def _check_vocab(student: ModelPlan, teacher: ModelPlan) -> None:
    try:
        common_vocab_size(student.config.vocab_size, teacher.config.vocab_size)
    except ValueError as e:
        raise RunSetupError(f"teacher/student vocabulary mismatch: student vocab_size="
                            f"{student.config.vocab_size}, teacher vocab_size={teacher.config.vocab_size} "
                            f"({e}); OPD needs a shared tokenizer") from None


def _synthetic_text(cfg: RunConfig) -> TextIO:
    """The embedded tasks' word tokenizer: ``labelled.LabelledTokenizer`` for the labelled task;
    for the synthetic one the plain words (RL runs start from a cold start that also knows the
    tag/correction words; other ids unchanged)."""
    if cfg.data.source == "labelled":
        tok = labelled.LabelledTokenizer()
    else:
        tok = synthetic.SyntheticTokenizer(construction_words=cfg.is_rl)
    return TextIO(encode=tok.encode, decode=tok.decode, verify=task_for(cfg.data.source).grade,
                  eos_ids=(tok.eos_id,),
                  pad_id=tok.pad_id, vocab_size=tok.vocab_size,
                  encode_completion=lambda s: tok.encode(s, add_bos=False))


def _format_fn(cfg: RunConfig) -> Callable[[str], str]:
    d = cfg.data
    if d.template == "plain":
        return lambda problem: problem
    from topd_jax.data.templates import BOXED_INSTRUCTION, PromptTemplate
    if d.template == "paper":
        return PromptTemplate("paper").format
    return PromptTemplate("qwen-chat", thinking=d.thinking, system=d.system_prompt,
                          instruction=d.instruction if d.instruction is not None else BOXED_INSTRUCTION).format


def _hf_text(cfg: RunConfig, student_path: str | None) -> TextIO:
    from topd_jax.data.templates import PromptTemplate, stop_token_ids
    from topd_jax.data.tokenizer import load_tokenizer
    where = cfg.data.tokenizer or student_path
    if where is None:
        raise RunSetupError("data.tokenizer: no tokenizer directory (set data.tokenizer, or give the "
                            "student as a local HF directory holding its tokenizer)")
    try:
        tok = load_tokenizer(where)
    except FileNotFoundError as e:
        raise RunSetupError(f"data.tokenizer: {e}") from None
    eos = tuple(stop_token_ids(tok, PromptTemplate("qwen-chat")))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return TextIO(encode=lambda s: tok.encode(s, add_special_tokens=False),
                  decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
                  verify=MATH.grade, eos_ids=eos, pad_id=int(pad),
                  vocab_size=len(tok), hf_tokenizer=tok)


@dataclass(frozen=True)
class _Encoder:
    encode: Callable[[str], list[int]]


def _load_examples(files, fmt, text: TextIO, max_len: int, what: str, response_field: str | None = None):
    try:
        return load_prompts(list(files), fmt, _Encoder(text.encode), max_len, response_field=response_field)
    except (FileNotFoundError, ValueError) as e:  # both name the file (and line)
        raise RunSetupError(f"data.{what}: {e}") from None


def _synthetic_examples(cfg: RunConfig, text: TextIO):
    s = cfg.data.synthetic
    train, evals = synthetic.make_splits(s.num_train, s.num_eval, s.seed, min_steps=s.min_steps,
                                         max_steps=s.max_steps, modulus=s.modulus)

    def examples(problems, name):
        out = [PromptExample(tuple(text.encode(p.prompt)), p.answer, f"synthetic-{name} {i}", p.prompt)
               for i, p in enumerate(problems)]
        kept = [e for e in out if len(e.ids) <= cfg.data.max_prompt_len]
        return kept, len(out) - len(kept)

    (tr, skipped), (ev, _) = examples(train, "train"), examples(evals, "eval")
    if not tr:
        raise RunSetupError(f"data.max_prompt_len={cfg.data.max_prompt_len}: every {cfg.data.source} prompt "
                            f"is longer")
    return tr, ev, skipped


def plan_run(cfg: RunConfig, student_path: str | None = None, teacher_path: str | None = None) -> RunPlan:
    """Validate every input of ``cfg``; raises ``RunSetupError`` naming the bad one."""
    student = model_plan(cfg.student, "student", student_path, cfg.seed)
    if not cfg.needs_teacher:  # sft, RL: no teacher; RL's KL reference is the initial student
        teacher = model_plan(cfg.student, "reference", student_path, cfg.seed) if cfg.uses_reference else None
    else:
        teacher = model_plan(cfg.teacher, "teacher", teacher_path, cfg.seed + 1)
        _check_vocab(student, teacher)
    if cfg.logging.wandb:  # optional, never a dependency: fail here, before anything runs
        from topd_jax.train.metrics import WandbMissingError, import_wandb
        try:
            import_wandb()
        except WandbMissingError as e:
            raise RunSetupError(str(e)) from None
    if task_for(cfg.data.source).embedded:
        text = _synthetic_text(cfg)
        fmt = None  # the synthetic prompt is the model input
        train, evals, skipped = _synthetic_examples(cfg, text)
    else:
        text = _hf_text(cfg, student.path)
        fmt = _format_fn(cfg)
        train, stats = _load_examples(cfg.data.train_files, fmt, text, cfg.data.max_prompt_len, "train_files",
                                      cfg.data.response_field if cfg.algorithm == "sft" else None)
        skipped = stats.skipped_too_long
        evals = []
        if cfg.data.eval_files:
            evals, _ = _load_examples(cfg.data.eval_files, fmt, text, cfg.data.max_prompt_len, "eval_files")
    for plan in (p for p in (student, teacher) if p is not None):
        if plan.config.vocab_size < text.vocab_size:
            hint = (f" (data.source={cfg.data.source}: set {plan.role}.vocab_size >= {text.vocab_size}, or use "
                    f"its prepared models)" if task_for(cfg.data.source).embedded and plan.path is None else "")
            raise RunSetupError(f"{plan.role}: vocab_size={plan.config.vocab_size} < the tokenizer's "
                                f"{text.vocab_size} tokens{hint}")
    if len(train) < cfg.data.prompts_per_step:
        raise RunSetupError(f"data: {len(train)} usable prompts < data.prompts_per_step={cfg.data.prompts_per_step}")
    m = cfg.mesh
    try:
        mesh = make_mesh(ShardingMesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor))
    except ValueError as e:
        raise RunSetupError(f"mesh: {e}") from None
    return RunPlan(cfg, student, teacher, text, train, evals, skipped, mesh, fmt)


def load_model(plan: ModelPlan, mesh):
    """The model on ``mesh``: loaded from its directory, or random (seeded) from its config."""
    from topd_jax.models import init_model, load_pretrained
    if plan.path is not None:
        return load_pretrained(plan.path, mesh=mesh, dtype=plan.config.dtype, param_dtype=plan.config.param_dtype)
    return init_model(plan.config, seed=plan.seed, mesh=mesh)

