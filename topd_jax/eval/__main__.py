"""``python -m topd_jax.eval``: see ``topd_jax.eval.cli``."""

from topd_jax.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
