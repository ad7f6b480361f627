"""``python -m topd_jax.train [--config FILE.yaml] [key.sub=value ...] [--plan ...] | --help``.

``--plan [--device-memory-gib G] [--plan-devices N] [--plan-backend B] [--no-compile]``: print
the per-device memory plan (``topd_jax.train.plan``) and exit. Multi-host runs start
``jax.distributed`` first (``topd_jax.sharding.distributed``).

With no arguments: the embedded demo (``configs/demo.yaml``): the tiny teacher and student
of the synthetic task are prepared (trained once, then cached), TOPD runs (the demo default;
``algorithm=opd`` for plain OPD), and the demo report is written. ``--config
configs/tapo_demo.yaml``: TAPO (or ``algorithm=grpo``) on the same task from a cached
cold-start student (``topd_jax.demos.rl_demo``). ``data.source=labelled`` (``--config
configs/labelled.yaml``): OPD/TOPD on the labelled task, whose rollouts carry ground-truth
token labels, with its own cached models (``topd_jax.demos.labelled_demo``). With
``data.source=files``: a real run on local model directories.

Exit status (``topd_jax.cli_common``): 0 on success or after a SIGTERM-triggered save, 2 for
a bad flag, config or input (nothing written), 1 when training fails (non-finite losses);
``--plan``: 3 when the plan does not fit in ``--device-memory-gib``.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from topd_jax.cli_common import UsageError, add_log_level, positive, run_command, setup_logging
from topd_jax.configs import DEMO_CONFIG  # package data: present in installed wheels too


def build_parser() -> argparse.ArgumentParser:
    from topd_jax.config.loader import format_options
    from topd_jax.train.plan import BACKENDS
    p = argparse.ArgumentParser(
        prog="python -m topd_jax.train", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with a YAML run config and key.sub=value overrides (without --config: "
                    "the embedded demo, configs/demo.yaml). Exit status: 0 done (or saved after "
                    "SIGTERM), 2 bad flag/config/input (nothing written), 1 training failed.",
        epilog=format_options())
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="run config (default: the embedded demo config)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, applied after --config (options listed below)")
    g = p.add_argument_group("memory plan", "print the per-device memory plan and exit (abstract "
                             "shapes; nothing is allocated). Exit 0: fits or no limit given, 3: "
                             "does not fit")
    g.add_argument("--plan", action="store_true", help="print the plan instead of training")
    g.add_argument("--plan-devices", type=positive(int), metavar="N",
                   help="plan for N devices (default: the local device count)")
    g.add_argument("--device-memory-gib", type=positive(float), metavar="G",
                   help="check the plan against G GiB per device")
    g.add_argument("--plan-backend", choices=BACKENDS,
                   help="plan for this backend's attention (default: the local one)")
    g.add_argument("--no-compile", action="store_true",
                   help="do not compile the step to measure temporaries (small models only)")
    add_log_level(p)
    return p


def _plan_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    from topd_jax.train.plan import PlanArgs
    given = {"--plan-devices": args.plan_devices, "--device-memory-gib": args.device_memory_gib,
             "--plan-backend": args.plan_backend, "--no-compile": args.no_compile or None}
    if not args.plan:
        if used := [k for k, v in given.items() if v is not None]:
            parser.error(f"{', '.join(used)}: only valid with --plan")
        return None
    return PlanArgs(device_memory_gib=args.device_memory_gib, devices=args.plan_devices,
                    compile=not args.no_compile, backend=args.plan_backend)


def main(argv: Sequence[str] | None = None) -> int:
    from topd_jax.sharding.distributed import DistributedConfigError
    from topd_jax.config.schema import ConfigError
    from topd_jax.train.loop import NonFiniteLossError
    from topd_jax.train.setup import RunSetupError
    return run_command(_main, argv, usage=(ConfigError, RunSetupError, DistributedConfigError),
                       failure=(NonFiniteLossError,))


def _main(argv: list[str]) -> int:
    from topd_jax.config.loader import load_config
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.log_level)
    plan_args = _plan_args(parser, args)
    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    except FileNotFoundError as e:
        raise UsageError(e) from None
    if plan_args is not None:  # memory plan only: abstract shapes, no cluster, no allocation
        from topd_jax.train.plan import plan_main
        return plan_main(cfg, plan_args)
    from topd_jax.sharding.distributed import initialize_distributed, resolve_distributed
    d = cfg.distributed  # before anything touches devices (plan_run builds the mesh)
    initialize_distributed(resolve_distributed(os.environ, coordinator=d.coordinator,
                                               num_processes=d.num_processes, process_id=d.process_id))

    from topd_jax.data.tasks import task_for
    from topd_jax.train.loop import train
    from topd_jax.train.setup import plan_run

    embedded = task_for(cfg.data.source).embedded  # the demo task: models prepared here

    student_path = teacher_path = None
    try:  # a missing input file is bad input (exit 2); during training it is a failure
        if embedded:
            plan_run(validation_config(cfg))  # everything checked before the (minutes-long) model preparation
            if cfg.is_rl:  # GRPO/TAPO demo: the cold-start student, no teacher
                from topd_jax.demos.rl_demo import prepare_cold_start
                student_path = prepare_cold_start(cfg)
            else:
                student_path, teacher_path = prepare_embedded_models(cfg)
        plan = plan_run(cfg, student_path, teacher_path)
    except FileNotFoundError as e:
        raise UsageError(e) from None
    result = train(cfg, plan=plan)
    if result.preempted:
        return 0
    from topd_jax.sharding.hosts import is_main_process
    if not is_main_process():  # reports, plots and the summary come from process 0 alone
        return 0
    if embedded and cfg.is_rl:
        from topd_jax.demos.rl_demo import rl_report
        rl_report(cfg, result, student_dir=student_path)
    elif embedded:
        from topd_jax.demos import demo
        demo.demo_report(cfg, result, student_dir=student_path, teacher_dir=teacher_path)
    print(summary_line(result), flush=True)
    return 0


def validation_config(cfg):
    """``cfg`` as ``plan_run`` should check it before an embedded task's models are prepared: the
    labelled task's models are built with ``labelled_demo.VOCAB_SIZE`` whatever a spec without a
    ``path`` says (e.g. the demo config with ``data.source=labelled``)."""
    if cfg.data.source != "labelled":
        return cfg
    import dataclasses

    from topd_jax.demos.labelled_demo import VOCAB_SIZE
    specs = {role: dataclasses.replace(spec, vocab_size=VOCAB_SIZE)
             for role, spec in (("student", cfg.student), ("teacher", cfg.teacher)) if spec.path is None}
    return dataclasses.replace(cfg, **specs)


def prepare_embedded_models(cfg) -> tuple[str, str]:
    """``(student_dir, teacher_dir)`` of an embedded task's distillation run: the demo models
    (``demos.demo.prepare_demo_models``) for ``synthetic``, the labelled task's
    (``demos.labelled_demo.prepare_labelled_models``) for ``labelled``; directories named by
    ``student.path`` and ``teacher.path`` (both) are used as they are."""
    if cfg.data.source == "labelled":
        if cfg.student.path is not None and cfg.teacher.path is not None:
            return cfg.student.path, cfg.teacher.path
        from topd_jax.demos.labelled_demo import prepare_labelled_models
        return prepare_labelled_models(cfg, progress=cfg.logging.progress_bar, log=print)
    from topd_jax.demos.demo import prepare_demo_models
    return prepare_demo_models(cfg)


def summary_line(result) -> str:
    """``done: N steps, final loss …; accuracy …; outputs in …`` (the command's last line)."""
    last = result.history[-1] if result.history else {}
    evals = ", ".join(f"step {s}: {a:.1%}" for s, a in sorted(result.evals.items()))
    return (f"done: {result.final_step} steps, final loss {last.get('loss', float('nan')):.4g}; "
            f"accuracy {evals or 'not evaluated'}; outputs in {result.output_dir}"
            + (f"; HF export {result.hf_dir}" if result.hf_dir else ""))


if __name__ == "__main__":
    raise SystemExit(main())
