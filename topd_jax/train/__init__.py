"""Training: ``python -m topd_jax.train`` and its pieces.

    from topd_jax.config.loader import load_config
    from topd_jax.train.loop import train
    result = train(load_config("configs/demo.yaml", ["algorithm=topd"]))
    result.history[-1]["loss"], result.evals, result.output_dir

Modules (the run config is ``topd_jax.config``): ``setup`` (validation before
any write), ``state`` (TrainState + shardings), ``step`` (jitted update), ``loop``
(``train``), ``evaluate`` (eval hook), ``optim``, ``metrics``, ``plan`` (memory plan). The embedded
demos' model preparation and reports are ``topd_jax.demos``. Nothing heavy is imported here.
"""
