"""Rewards: answer extraction and verification for math, and the pass@k / maj@k estimators.

``topd_jax.rewards.math`` holds the public grading API (``grade``, ``grade_detailed``,
``extract_boxed``, ``pass_at_k``, ``maj_at_k``); it imports ``math-verify`` (and sympy), so
it is not imported here: ``from topd_jax.rewards.math import grade``.
"""
