"""``python -m topd_jax.config``: see ``topd_jax.config.loader.main``."""

from topd_jax.config.loader import main

if __name__ == "__main__":
    raise SystemExit(main())
