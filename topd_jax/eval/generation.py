"""Batched generation for evaluation: the one loop behind the eval command, the trainer's
eval hook and the demos' accuracy.

``generate_in_batches(model, rows, ...)`` samples completions of token-id prompts
``batch_size`` at a time; every batch is left-padded to one shape (exactly ``length``
columns, or a multiple of ``multiple``) and a short last batch is filled with copies of its
last prompt, whose outputs are dropped, so the sampler compiles once per prompt-length
bucket. ``key_for(start, index)`` gives each batch its key(s): the caller's seed rule.

``make_generate_fn`` returns ``generate(prompts, round_index)`` for ``run_eval`` (the eval
command): prompts are tokenized once and each row gets its own key
``fold_in(fold_in(key(seed), i), j)`` for problem i and round j, so a sample does not depend
on the batch it landed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.sharding.hosts import fetch

if TYPE_CHECKING:
    from topd_jax.eval.runner import GenerateFn


def sample_keys(seed: int, problem_indices: Sequence[int], round_index: int) -> jax.Array:
    """[len(problem_indices)] typed keys: fold_in(fold_in(key(seed), i), round_index)."""
    base = jax.random.key(seed)
    idx = jnp.asarray(problem_indices, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), round_index))(idx)


def pad_batch(
    rows: Sequence[Sequence[int]], *, pad_id: int, multiple: int = 1, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common length: exactly ``length`` when given (a longer row is
    an error), else the longest row rounded up to ``multiple``.

    Returns ids [b, p] int32 and mask [b, p] bool (True = real token).
    """
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt tokenized to zero tokens")
    if length is None:
        p = -(-max(len(r) for r in rows) // multiple) * multiple
    else:
        p = length
        if too_long := [(i, len(r)) for i, r in enumerate(rows) if len(r) > length]:
            i, n = too_long[0]
            raise ValueError(f"prompt {i} has {n} tokens > length={length}")
    ids = np.full((len(rows), p), pad_id, np.int32)
    mask = np.zeros((len(rows), p), bool)
    for b, r in enumerate(rows):
        ids[b, p - len(r):] = r
        mask[b, p - len(r):] = True
    return ids, mask


@dataclass(frozen=True)
class Completions:
    """One batch's real rows: ``index`` (the prompts' positions in ``rows``); ``tokens [r, N]``,
    ``lengths [r]`` (stop token included), ``finished [r]`` with r = len(index) * num_samples,
    row ``k * num_samples + j`` sample j of prompt ``index[k]``. NumPy, on every process."""

    index: list[int]
    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray


def generate_in_batches(
    model,
    rows: Sequence[Sequence[int]],
    *,
    batch_size: int,
    key_for: Callable[[int, list[int]], jax.Array],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    multiple: int = 1,
    length: int | None = None,
) -> Iterator[Completions]:
    """See the module docstring. ``key_for(start, index)``: the key of the batch holding
    prompts ``index`` (``batch_size`` positions, fill included) that starts at ``start``;
    one key, or one per output row."""
    from topd_jax.rollout import generate as sample_tokens

    for start in range(0, len(rows), batch_size):
        index = list(range(start, min(start + batch_size, len(rows))))
        real = len(index)
        index += [index[-1]] * (batch_size - real)  # fill: fixed batch shape
        ids, mask = pad_batch([rows[i] for i in index], pad_id=pad_id, multiple=multiple,
                              length=length)
        res = sample_tokens(
            model, ids, mask, key=key_for(start, index), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=tuple(eos_ids),
            num_samples=num_samples, pad_id=pad_id,
        )
        n = real * num_samples  # every process reads every row
        yield Completions(index[:real], fetch(res.tokens)[:n], fetch(res.lengths)[:n],
                          fetch(res.finished)[:n])


def make_generate_fn(
    model,
    tokenizer,
    *,
    seed: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_ids: Sequence[int],
    pad_multiple: int = 64,
) -> GenerateFn:
    """See the module docstring. ``tokenizer``: a transformers tokenizer (no BOS/EOS added)."""
    from topd_jax.eval.runner import Generation  # the runner imports the math grader

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded: dict[str, list[int]] = {}

    def generate(prompts: Sequence[str], round_index: int) -> list[Generation]:
        for p in prompts:
            if p not in encoded:
                encoded[p] = tokenizer.encode(p, add_special_tokens=False)
        out: list[Generation] = []
        for batch in generate_in_batches(
            model, [encoded[p] for p in prompts], batch_size=batch_size,
            key_for=lambda start, index: sample_keys(seed, index, round_index),
            max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
            temperature=temperature, top_p=top_p, top_k=top_k, multiple=pad_multiple,
        ):
            for tokens, n, finished in zip(batch.tokens, batch.lengths, batch.finished):
                n = int(n)
                text_ids = tokens[: n - 1] if finished else tokens[:n]  # drop the stop
                out.append(Generation(
                    text=tokenizer.decode(text_ids.tolist(), skip_special_tokens=False),
                    num_tokens=n,
                    truncated=not bool(finished),
                ))
        return out

    return generate
