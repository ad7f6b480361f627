"""The embedded demos on the synthetic tasks: their models, built once and cached, and reports.

Modules: ``demo`` (the OPD/TOPD demo's tiny teacher and mediocre student, its report),
``rl_demo`` (GRPO/TAPO: the cold-start student, the RL report), ``labelled_demo`` (the
labelled task's teacher and student, for ``bench/detector_roc.py``), ``demo_report`` (tables,
plots, JSON), ``sft`` (the small supervised trainer that prepares these models).
``python -m topd_jax.train`` with no arguments runs the OPD/TOPD demo. Nothing is imported here.
"""
