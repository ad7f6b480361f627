"""The eval command's text generator: prompts -> ``Generation``s with the native sampler.

``make_generate_fn`` returns ``generate(prompts, round_index)`` for ``run_eval``. Prompts are
tokenized once, batched ``batch_size`` at a time, left-padded to a multiple of
``pad_multiple`` tokens (a short last batch is filled with copies of its last prompt, whose
outputs are dropped), so the sampler compiles once per prompt-length bucket. Each row gets
its own key ``fold_in(fold_in(key(seed), i), j)`` for problem i and round j, so a sample
does not depend on the batch it landed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from topd_jax.eval.runner import GenerateFn, Generation


def sample_keys(seed: int, problem_indices: Sequence[int], round_index: int) -> jax.Array:
    """[len(problem_indices)] typed keys: fold_in(fold_in(key(seed), i), round_index)."""
    base = jax.random.key(seed)
    idx = jnp.asarray(problem_indices, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), round_index))(idx)


def pad_batch(
    rows: Sequence[Sequence[int]], *, pad_id: int, multiple: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common length rounded up to ``multiple``.

    Returns ids [b, p] int32 and mask [b, p] bool (True = real token).
    """
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt tokenized to zero tokens")
    p = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), p), pad_id, np.int32)
    mask = np.zeros((len(rows), p), bool)
    for b, r in enumerate(rows):
        ids[b, p - len(r):] = r
        mask[b, p - len(r):] = True
    return ids, mask


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
    from topd_jax.rollout import generate as sample_tokens

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded: dict[str, list[int]] = {}

    def generate(prompts: Sequence[str], round_index: int) -> list[Generation]:
        for p in prompts:
            if p not in encoded:
                encoded[p] = tokenizer.encode(p, add_special_tokens=False)
        out: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            index = list(range(start, min(start + batch_size, len(prompts))))
            real = len(index)
            index += [index[-1]] * (batch_size - real)  # fill: fixed batch shape
            ids, mask = pad_batch([encoded[prompts[i]] for i in index], pad_id=pad_id,
                                  multiple=pad_multiple)
            res = sample_tokens(
                model, ids, mask, key=sample_keys(seed, index, round_index),
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k, eos_ids=tuple(eos_ids), pad_id=pad_id,
            )
            tokens = np.asarray(res.tokens)
            lengths = np.asarray(res.lengths)
            finished = np.asarray(res.finished)
            for r in range(real):
                n = int(lengths[r])
                text_ids = tokens[r, : n - 1] if finished[r] else tokens[r, :n]  # drop the stop
                out.append(Generation(
                    text=tokenizer.decode(text_ids.tolist(), skip_special_tokens=False),
                    num_tokens=n,
                    truncated=not bool(finished[r]),
                ))
        return out

    return generate
