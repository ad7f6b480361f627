"""The run configuration, at the bottom of the import graph (algorithms and train import it).

    from topd_jax.config.loader import load_config
    cfg = load_config("configs/demo.yaml", ["algorithm=topd"])   # a frozen schema.RunConfig

Modules: ``schema`` (the typed, validated ``RunConfig`` and its sections; ``ConfigError``),
``loader`` (YAML + ``key.sub=value`` overrides, ``--help`` text). ``python -m
topd_jax.config [--config FILE] [key=value ...] | --help`` prints the resolved config.
Nothing is imported here.
"""
