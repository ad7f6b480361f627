"""Supervised next-token training (teacher forcing), used to build the demo's tiny models.

    step = make_sft_step(graphdef, tx)                      # one compile per batch shape
    params, opt_state, (loss_sum, count) = step(params, opt_state, batch)
    model, losses = train_sft(model, batches, steps=..., optim=OptimConfig(lr=3e-3))

A batch is ``topd_jax.data.synthetic.supervised_arrays``' layout: ``input_ids [B, T]``,
``attention_mask [B, T]`` and ``loss_mask [B, T]`` (True at target tokens; the logits at
column t - 1 predict ``input_ids[:, t]``). The loss is the token mean of the cross-entropy
over all target tokens of the batch, returned as a ``(sum, count)`` pair.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from topd_jax.models import Qwen
from topd_jax.config.schema import OptimConfig
from topd_jax.train.optim import make_optimizer

Batch = Mapping[str, jax.Array]


def cross_entropy_sums(logits: jax.Array, input_ids: jax.Array,
                       loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and target count.

    logits [B, T, V] float32 (column t predicts token t + 1); input_ids, loss_mask [B, T].
    Returns (Σ -log p(input_ids[:, t] | < t) over loss_mask[:, t], Σ loss_mask), scalars.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(f"logits {logits.shape}, input_ids {input_ids.shape} and loss_mask "
                         f"{loss_mask.shape} must share [batch, seq]")
    # log_softmax in float32: the targets' log-probs are small differences of large logits
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()


def sft_loss(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch):
    """Token-mean CE of the model ``merge(graphdef, params)`` on ``batch``; aux (sum, count)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # [B, T, V]
    total, count = cross_entropy_sums(logits, batch["input_ids"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0), (total, count)


def make_sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
    """A jitted ``(params, opt_state, batch) -> (params, opt_state, (loss_sum, count))``.

    params and opt_state are donated (updated in place); the returned pair lets callers
    average the loss over steps without a device sync per step.
    """
    grad_fn = jax.value_and_grad(sft_loss, has_aux=True)

    def step(params, opt_state, batch):
        (_, sums), grads = grad_fn(params, graphdef, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, sums

    return jax.jit(step, donate_argnums=(0, 1))


def train_sft(model: Qwen, batches: Iterator[Mapping[str, np.ndarray]], *, steps: int,
              optim: OptimConfig, desc: str = "sft", progress: bool = True,
              log_every: int = 25) -> tuple[Qwen, list[float]]:
    """``steps`` AdamW steps of supervised CE on ``batches``; returns (model, losses).

    ``losses[i]`` is the token-mean CE over steps ``[i * log_every, (i + 1) * log_every)``
    (the last window may be shorter). The input model is left unchanged (a new one is
    returned) since its parameter buffers are donated to the step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)  # donation must not invalidate the caller's model
    if steps == 0:
        return nnx.merge(graphdef, params), []
    tx = make_optimizer(optim, steps)
    opt_state = tx.init(params)
    step = make_sft_step(graphdef, tx)
    losses: list[float] = []
    window_sum, window_count = jnp.zeros(()), jnp.zeros(())
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i in bar:
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        params, opt_state, (s, c) = step(params, opt_state, batch)
        window_sum, window_count = window_sum + s, window_count + c
        if (i + 1) % log_every == 0 or i + 1 == steps:
            losses.append(float(window_sum / jnp.maximum(window_count, 1.0)))
            window_sum, window_count = jnp.zeros(()), jnp.zeros(())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return nnx.merge(graphdef, params), losses
