"""Math reasoning evaluation: ``python -m topd_jax.eval`` (see ``__main__``).

``topd_jax.eval.scoring`` grades samples and builds the summary (pass@1 ± standard error,
pass@k, maj@k, lengths, truncation) without any model code; the command adds generation.
"""
