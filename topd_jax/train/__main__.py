"""``python -m topd_jax.train [--config FILE.yaml] [key.sub=value ...] [--plan ...] | --help``.

``--plan [--device-memory-gib G] [--plan-devices N] [--no-compile]``: print the per-device memory
plan (``topd_jax.train.plan``) and exit. Multi-host runs start ``jax.distributed`` first
(``topd_jax.sharding.distributed``).

With no arguments: the embedded demo (``configs/demo.yaml``): the tiny teacher and student
of the synthetic task are prepared (trained once, then cached), TOPD runs (the demo default; `algorithm=opd` for plain OPD), and the demo
report is written. ``--config configs/tapo_demo.yaml``: TAPO (or ``algorithm=grpo``) on the
same task from a cached cold-start student (``topd_jax.train.rl_demo``). With ``data.source=files``: a real run on local model directories.
Exit status: 0 on success or after a SIGTERM-triggered save, 2 for a bad config or input
(nothing written), 1 when training halts (non-finite losses).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from topd_jax.configs import DEMO_CONFIG  # package data: present in installed wheels too


def main(argv: Sequence[str] | None = None) -> int:
    from topd_jax.train.config import ConfigError
    from topd_jax.train.config_loader import parse_cli

    from topd_jax.train.plan import PlanArgsError, split_plan_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plan_args, argv = split_plan_args(argv)
        cfg = parse_cli(argv, default_config=DEMO_CONFIG)
    except (ConfigError, FileNotFoundError, PlanArgsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if plan_args is not None:  # memory plan only: abstract shapes, no cluster, no allocation
        from topd_jax.train.plan import plan_main
        return plan_main(cfg, plan_args)
    from topd_jax.sharding.distributed import (DistributedConfigError, initialize_distributed,
                                               resolve_distributed)
    try:  # before anything touches devices (plan_run builds the mesh)
        d = cfg.distributed
        initialize_distributed(resolve_distributed(os.environ, coordinator=d.coordinator,
                                                   num_processes=d.num_processes,
                                                   process_id=d.process_id))
    except DistributedConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from topd_jax.train.loop import NonFiniteLossError, train
    from topd_jax.train.setup import RunSetupError, plan_run

    try:
        student_path = teacher_path = None
        if cfg.data.source == "synthetic":
            plan_run(cfg)  # validate everything before the (minutes-long) demo model preparation
            if cfg.is_rl:  # GRPO/TAPO demo: the cold-start student, no teacher
                from topd_jax.train.rl_demo import prepare_cold_start
                student_path = prepare_cold_start(cfg)
            else:
                from topd_jax.train.demo import prepare_demo_models
                student_path, teacher_path = prepare_demo_models(cfg)
        plan = plan_run(cfg, student_path, teacher_path)
    except (RunSetupError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, plan=plan)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        return 0
    from topd_jax.sharding.hosts import is_main_process
    if not is_main_process():  # reports, plots and the summary come from process 0 alone
        return 0
    if cfg.data.source == "synthetic" and cfg.is_rl:
        from topd_jax.train.rl_demo import rl_report
        rl_report(cfg, result, student_dir=student_path)
    elif cfg.data.source == "synthetic":
        from topd_jax.train import demo
        demo.demo_report(cfg, result, student_dir=student_path, teacher_dir=teacher_path)
    _summary(result)
    return 0


def _summary(result) -> None:
    last = result.history[-1] if result.history else {}
    evals = ", ".join(f"step {s}: {a:.1%}" for s, a in sorted(result.evals.items()))
    print(f"done: {result.final_step} steps, final loss {last.get('loss', float('nan')):.4g}; "
          f"accuracy {evals or 'not evaluated'}; outputs in {result.output_dir}"
          + (f"; HF export {result.hf_dir}" if result.hf_dir else ""), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
