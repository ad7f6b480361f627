"""Data: prompt sources (JSONL), prompt templates, tokenizers, batching.

Import the submodule you need (``topd_jax.data.templates``, ``topd_jax.data.jsonl``,
``topd_jax.data.tokenizer``, ...); nothing is imported here so that a light import stays light.
"""
