"""``train(cfg) -> TrainResult``: the training loop shared by every algorithm.

Per step: prompts (grain, resumable) -> ``algorithms.prepare_batch`` (sampling, teacher
scoring, TOPD detector; with ``topd.fused_main_pass`` also the OPD term's gradient, pulled
back through the forward that gave the detector its ℓ_t) -> ``TrainStep`` (jitted update) ->
metrics, periodic evaluation, checkpoint. Resume: the latest good checkpoint restores the
train state, the data iterator, the metrics history and the non-finite counter, so
re-running the same command continues exactly; ``metrics.jsonl`` and ``tb/`` are rewound to the restored step
(what a run killed between two checkpoints logged after it is dropped, then logged again
once), and a run that restores nothing starts them afresh. SIGTERM: save, then return with ``preempted=True`` (the command
exits 0). Non-finite loss: the step is skipped (state unchanged) and counted; after
``max_nonfinite_steps`` in a row the run halts with ``NonFiniteLossError``.

History rows (``TrainResult.history``, one per step, floats): ``step``, ``loss`` (the
optimised objective), ``opd_loss`` (L_OPD_w), ``traj_loss`` (L_traj, TOPD), ``token_kl``
(mean per-token divergence ℓ on completion tokens), ``ce`` (warm-up), ``grad_norm``,
``lr``, ``skipped``, ``rollout_len``, ``rollout_finished``, detector metrics when it runs
(``detector_token_loss``, ``candidates_per_rollout``, ``false_alarm_fraction`` — the share of
candidates marked as false alarms (q by definition under the quantile rule), ``suppressed_fraction``, ``divergence`` — mean D_t
over candidates, ``local_ot`` — the same for the OT detector, ``guided_points_per_rollout``),
and timing: ``time_sampling``, ``time_scoring``, ``time_update``, ``time_step`` (s),
``tokens_per_s`` (completion tokens / step time). With ``logging.grad_norms_by_term``:
``grad_norm_opd`` and ``grad_norm_traj`` (``train.step``). When the task has a labeller and
``logging.label_metrics`` is on (opd, topd): the ``label_*`` metrics of ``train.labels``, and
``time_label_metrics``, the seconds they took (NOT part of ``time_step``);
``TrainResult.extras["label_example"]`` is one labelled rollout of the last step.

Random numbers: step s samples with ``fold_in(key(seed), s)`` in every algorithm (the rollouts
use that key itself: OPD and TOPD arms with one seed draw the same step-0 rollouts, review D9);
evaluation at step s uses ``fold_in(key(eval.seed), s)``, independent of ``seed``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

from topd_jax.algorithms import Frozen, build_objective, build_opd_term, prepare_batch, topd
from topd_jax.checkpoints.train_state import PreemptionFlag, TrainCheckpointer, abstract_state
from topd_jax.data.prompts import PromptLoader
from topd_jax.data.tasks import run_task
from topd_jax.train import labels
from topd_jax.sharding.hosts import any_process, fetch, is_main_process, place_rows
from topd_jax.config.schema import RunConfig
from topd_jax.config.loader import to_dict
from topd_jax.train.evaluate import evaluate_detailed
from topd_jax.train.metrics import MetricsSink, PairAccumulator, reduce_pairs
from topd_jax.train.optim import lr_schedule, make_optimizer
from topd_jax.train.setup import RunPlan, load_model, plan_run
from topd_jax.train.state import TrainState, create_train_state
from topd_jax.train.step import TrainStep

log = logging.getLogger(__name__)
# Metrics that depend on wall time, not on the computation (excluded from resume checks).
TIMING_KEYS = ("time_sampling", "time_scoring", "time_update", "time_step", "tokens_per_s", "time_label_metrics")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    """What a run leaves behind (see the module docstring for the history keys)."""
    output_dir: Path
    history: list[dict[str, float]]
    evals: dict[int, float]               # step -> held-out accuracy (0: before training)
    state: TrainState
    model: Any                            # the final student (topd_jax.models.Qwen)
    final_step: int
    preempted: bool = False
    skipped_steps: int = 0
    skipped_prompts: int = 0
    hf_dir: Path | None = None
    # eval_reflection: {step: ReflectionStats} (RL runs); label_example (train.labels, the last step)
    extras: dict = field(default_factory=dict)

    @property
    def params(self):
        return self.state.params


def rollout_len(cfg: RunConfig) -> int:
    """L: columns of a rollout row (prompt + completion), static for the whole run."""
    new = cfg.warmup.max_new_tokens if cfg.algorithm == "warmup" else cfg.rollout.max_new_tokens
    return cfg.data.max_prompt_len + new


def _loader(cfg: RunConfig, plan: RunPlan) -> PromptLoader:
    """The global prompt stream, the same on every process: which prompts make up a step does
    not depend on the process count (a 2-host run equals the 1-host run, and a checkpoint's
    iterator state resumes on any host count). Each process then places only the rows its
    devices hold (``hosts.place_rows``); the prompts are tokenized on every host anyway."""
    return PromptLoader(plan.train_examples, batch_size=cfg.data.prompts_per_step,
                        prompt_len=cfg.data.max_prompt_len, pad_id=plan.text.pad_id, seed=cfg.seed,
                        shuffle=cfg.data.shuffle, epochs=cfg.data.epochs)


def evaluation_key(cfg: RunConfig) -> jax.Array:
    """The base key of every evaluation (step s: ``fold_in(key, s)``): ``eval.seed``'s, not the
    run's ``seed``, so arms with different seeds are evaluated with the same random numbers."""
    return jax.random.key(cfg.eval.seed)


def _row(step: int, out: dict, prep: dict, timings: dict, completion_tokens: float) -> dict[str, float]:
    row = {"step": float(step)}
    row.update(reduce_pairs({k: (tuple(v) if isinstance(v, (tuple, list)) else v) for k, v in out.items()}))
    row.update(reduce_pairs(prep))
    for k in ("sampling", "scoring", "update"):
        row[f"time_{k}"] = timings.get(k, 0.0)
    row["time_step"] = timings["step"]
    if "label_metrics" in timings:
        row["time_label_metrics"] = timings["label_metrics"]
    row["tokens_per_s"] = completion_tokens / max(timings["step"], 1e-9)
    return row


def _json_history(history):
    return [{k: (v if math.isfinite(v) else None) for k, v in r.items()} for r in history]


def _unjson_history(history):
    return [{k: (float("nan") if v is None else float(v)) for k, v in r.items()} for r in history]


def train(cfg: RunConfig, *, student_path: str | None = None, teacher_path: str | None = None,
          plan: RunPlan | None = None) -> TrainResult:
    """Run ``cfg`` (see the module docstring). Explicit paths override ``cfg.*.path``."""
    plan = plan or plan_run(cfg, student_path, teacher_path)  # validates; writes nothing
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # only process 0 logs and writes files (every process saves checkpoints)
        log.info("%s: %d training prompts (%d skipped: longer than data.max_prompt_len=%d), %d held-out; "
                 "mesh %s; output %s", cfg.algorithm, len(plan.train_examples), plan.skipped_prompts,
                 cfg.data.max_prompt_len, len(plan.eval_examples), dict(plan.mesh.shape), out_dir)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # Models are built outside ``set_mesh``: their init places each parameter by the rules
    # itself (NNX would otherwise read the logical names as mesh axes).
    student = load_model(plan.student, plan.mesh)
    teacher = load_model(plan.teacher, plan.mesh) if plan.teacher is not None else None  # none: GRPO/TAPO
    with jax.set_mesh(plan.mesh):
        return _run(cfg, plan, out_dir, student, teacher)


def _run(cfg: RunConfig, plan: RunPlan, out_dir: Path, student, teacher) -> TrainResult:
    mesh = plan.mesh
    tx = make_optimizer(cfg.optim, cfg.steps)
    schedule = lr_schedule(cfg.optim, cfg.steps)
    # topd.ot_embedding=student_initial copies the table before the train state takes the arrays.
    ot_table = topd.frozen_ot_table(cfg, student, teacher) if cfg.uses_detector else None
    graphdef, state, shardings = create_train_state(student, tx, mesh, seed=cfg.seed, copy=False)
    del student
    loader = _loader(cfg, plan)
    # Without a teacher (GRPO/TAPO) the step's head argument is a placeholder it never reads.
    head = teacher.lm_head_weight() if teacher is not None else jax.numpy.zeros((1, 1), jax.numpy.float32)
    frozen = Frozen(teacher, head, plan.text.eos_ids, plan.text.pad_id, text=plan.text,
                    format_prompt=plan.format_prompt, ot_table=ot_table)
    loss_fn, normalize = build_objective(cfg, graphdef, rollout_len(cfg))
    by_term = cfg.logging.grad_norms_by_term  # D11: one extra backward pass unless fused (train.step)
    step_fn = TrainStep(loss_fn, tx, schedule, shardings, mesh, micro_batches=cfg.optim.micro_batches,
                        normalize=normalize, updates=cfg.grpo.updates_per_batch if cfg.is_rl else 1,
                        grad_norms_by_term=by_term,
                        opd_term_fn=build_opd_term(cfg, graphdef, rollout_len(cfg)) if by_term else None)
    ckpt = TrainCheckpointer(cfg.checkpoint_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    history: list[dict[str, float]] = []
    evals: dict[int, float] = {}
    nonfinite_run = skipped_total = 0
    acc = PairAccumulator()  # the current log interval (logging.every steps)
    resume_from = -1  # the metrics files start afresh unless a checkpoint is restored
    if cfg.checkpoint.resume:
        restored = ckpt.restore(abstract_state(state, shardings))
        if restored is not None:
            resume_from = restored.step
            state = restored.state
            loader.set_state(restored.data)
            history = _unjson_history(restored.metrics["history"])
            evals = {int(k): float(v) for k, v in restored.metrics["evals"].items()}
            nonfinite_run = int(restored.metrics["nonfinite_run"])
            skipped_total = int(restored.metrics["skipped_total"])
            # Checkpoints written before the interval was saved lack it: start it empty.
            acc.set_state(restored.metrics.get("log_interval", {}))
            if restored.config != to_dict(cfg):
                log.warning("resuming from %s step %d with a config that differs from the saved one",
                            cfg.checkpoint_dir, restored.step)
            if is_main_process():
                log.info("resumed from %s at step %d", cfg.checkpoint_dir, restored.step)
    start = int(state.step)
    rows_per_eval_batch = cfg.data.prompts_per_step
    eval_key = evaluation_key(cfg)
    labeller = run_task(cfg).labeller
    with_labels = labels.enabled(cfg, labeller)
    label_example: dict[str, Any] = {}
    eval_reflection: dict[int, Any] = {}  # step -> rewards.reflection.ReflectionStats (this run's evals)

    def run_eval(step: int) -> None:
        if not plan.eval_examples:
            return
        model = nnx.merge(graphdef, state.params)
        evals[step], reflection = evaluate_detailed(cfg, model, plan.eval_examples, plan.text,
                                                    key=jax.random.fold_in(eval_key, step),
                                                    batch_size=rows_per_eval_batch)
        row = {"eval_accuracy": evals[step]}
        if cfg.is_rl:  # TAPO's direct-solution / effective-reflection rates (rewards.reflection)
            eval_reflection[step] = reflection
            row.update({f"eval_{k}": v for k, v in reflection.as_pairs().items()})
        sink.write(step, row)

    def save(step: int, force: bool = False) -> None:
        if not ckpt.due(step, force=force):  # the history JSON is built only for an actual save
            return
        ckpt.save(step, state, data=loader.get_state(), config=to_dict(cfg), force=force,
                  metrics={"history": _json_history(history), "evals": {str(k): v for k, v in evals.items()},
                           "nonfinite_run": nonfinite_run, "skipped_total": skipped_total,
                           "log_interval": acc.get_state()})

    lg = cfg.logging
    # Rows and events that a killed run wrote after the restored step are dropped first.
    sink = MetricsSink(out_dir, stdout=lg.stdout, jsonl=lg.jsonl, tensorboard=lg.tensorboard,
                       resume_from=resume_from, wandb=wandb_init(cfg, out_dir))
    preempted = False
    flag = PreemptionFlag()
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
        flag.install()
    try:
        if cfg.eval.at_start and start == 0 and 0 not in evals:
            run_eval(0)
        bar = tqdm(total=cfg.steps, initial=start, disable=not (lg.progress_bar and is_main_process()),
                   desc=cfg.algorithm)
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            try:
                prompts = next(loader)
            except StopIteration:
                if is_main_process():
                    log.info("data exhausted after data.epochs=%d at step %d", cfg.data.epochs, step)
                break
            if jax.process_count() > 1:  # global arrays; one process keeps NumPy (jit places it)
                prompts = place_rows(prompts, mesh)
            timings: dict[str, float] = {}
            model = nnx.merge(graphdef, state.params)
            batch, prep, gen = prepare_batch(cfg, model, prompts, jax.random.fold_in(state.key(), step), frozen,
                                             timings)
            label_pairs: dict[str, tuple[float, float]] = {}
            if with_labels:  # before the update: OPD's ℓ_t is that of the sampling params
                t_labels = time.perf_counter()
                label_pairs, label_example = labels.label_metrics(cfg, labeller, prompts, batch, model, frozen)
                prep = {**prep, **label_pairs}
                timings["label_metrics"] = time.perf_counter() - t_labels
            del model
            t1 = time.perf_counter()
            state, out = step_fn(state, batch, frozen.teacher_head)
            out = jax.device_get(out)
            timings["update"] = time.perf_counter() - t1
            timings["step"] = time.perf_counter() - t0 - timings.get("label_metrics", 0.0)
            row = _row(step + 1, out, prep, timings, float(fetch(gen.lengths).sum()))
            history.append(row)
            # Label metrics enter the log interval as (sum, count) pairs: a step where one is
            # undefined (e.g. no guided point, count 0) adds nothing instead of a NaN.
            acc.add({**{k: v for k, v in row.items() if k != "step"}, **label_pairs})
            skipped = row["skipped"] > 0
            nonfinite_run = nonfinite_run + 1 if skipped else 0
            skipped_total += int(skipped)
            if (step + 1) % lg.every == 0 or step + 1 == cfg.steps:
                sink.write(step + 1, acc.pop())
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if nonfinite_run >= cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"halting at step {step + 1}: {nonfinite_run} steps in a row had a non-finite loss or "
                    f"gradient (max_nonfinite_steps={cfg.max_nonfinite_steps}); the state is that of the "
                    f"last finite step. Lower optim.lr, check the data, or raise max_nonfinite_steps.")
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                run_eval(step + 1)
            save(step + 1)
            if any_process(flag.requested):  # every process saves, or none
                save(step + 1, force=True)
                ckpt.wait()
                if is_main_process():
                    log.warning("preempted (signal %s): saved step %d to %s", flag.received, step + 1,
                                cfg.checkpoint_dir)
                preempted = True
                break
        bar.close()
        final = int(state.step)
        if not preempted:
            if cfg.eval.at_end and final not in evals:
                run_eval(final)
            save(final, force=True)
        ckpt.wait()
    finally:
        flag.uninstall()
        ckpt.close()
        sink.close()
    model = nnx.merge(graphdef, state.params)
    hf_dir = None
    if cfg.checkpoint.export_hf and not preempted:
        hf_dir = export_hf(model, out_dir / "student_hf", plan)
    return TrainResult(out_dir, history, evals, state, model, final, preempted, skipped_total,
                       plan.skipped_prompts, hf_dir,
                       extras={"eval_reflection": eval_reflection,
                               **({"label_example": label_example} if label_example else {})})


def wandb_init(cfg: RunConfig, out_dir: Path) -> dict[str, Any] | None:
    """``wandb.init`` keyword arguments for ``logging.wandb`` (None when it is off)."""
    lg = cfg.logging
    if not lg.wandb:
        return None
    return dict(project=lg.wandb_project, entity=lg.wandb_entity, name=lg.wandb_name,
                config=to_dict(cfg), dir=str(out_dir))


def export_hf(model, directory: Path, plan: RunPlan) -> Path:
    """The final student as an HF directory (config.json + safetensors, + tokenizer files)."""
    from topd_jax.checkpoints import save_hf
    save_hf(model, directory)  # every process joins its gathers; process 0 writes
    if plan.text.hf_tokenizer is not None and is_main_process():
        plan.text.hf_tokenizer.save_pretrained(str(directory))
    return directory
