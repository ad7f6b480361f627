"""topd_jax: on-policy distillation (OPD) and Trajectory-aware OPD (TOPD) in JAX/Flax.

Subpackages in data-flow order: ``data`` → ``rollout`` → ``models`` (scoring) →
``losses`` → ``train`` → ``checkpoints`` → ``rewards``/``eval``. Import what you need;
nothing heavy happens at import time, and ``topd_jax.losses`` depends on nothing else here.
"""

__version__ = "0.1.0"
