"""Supervised next-token training (teacher forcing) of the demo's tiny models, through the
trainer's own pieces: the ``algorithm=sft`` objective (``LossSpec(kind="ce")``: the token-mean
cross-entropy of the targets, ``losses.opd_loss`` of the NLL) and the jitted ``TrainStep``
(AdamW with the config's schedule and clipping, non-finite skip), on one device.

    model, losses = train_sft(model, batches, steps=..., optim=OptimConfig(lr=3e-3))

A batch is ``topd_jax.data.synthetic.supervised_arrays``' layout: ``input_ids [B, T]``,
``attention_mask [B, T]`` and ``loss_mask [B, T]`` (True at target tokens; the logits at
column t - 1 predict ``input_ids[:, t]``), the trainer's ``ids`` / ``seq_mask`` /
``loss_mask`` rows under other names (``sft_rows``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from topd_jax.algorithms.objective import LossSpec, make_loss_fn
from topd_jax.config.schema import OptimConfig
from topd_jax.models import Qwen
from topd_jax.sharding import MeshConfig, make_mesh
from topd_jax.train.optim import lr_schedule, make_optimizer
from topd_jax.train.state import create_train_state
from topd_jax.train.step import TrainStep

SFT_SPEC = LossSpec(kind="ce")  # what ``algorithm=sft`` trains


def sft_rows(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """The demo batch as the trainer's supervised rows (``algorithms.sft.rows``' layout):
    ``ids``, ``seq_mask``, ``loss_mask`` and ``weights``, all ``[B, T]``; ``weights`` is the
    batch's ``"weights"`` (per-target loss weights, aligned with ``loss_mask``) when it has
    one, else ones."""
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    weights = (jnp.asarray(batch["weights"], jnp.float32) if "weights" in batch
               else jnp.ones(ids.shape, jnp.float32))
    if weights.shape != ids.shape:
        raise ValueError(f"batch weights {weights.shape} and input_ids {ids.shape} differ")
    return {"ids": ids, "seq_mask": jnp.asarray(batch["attention_mask"], bool),
            "loss_mask": jnp.asarray(batch["loss_mask"], bool), "weights": weights}


def train_sft(model: Qwen, batches: Iterator[Mapping[str, np.ndarray]], *, steps: int,
              optim: OptimConfig, desc: str = "sft", progress: bool = True,
              log_every: int = 25, hook: Callable[[int, Qwen], None] | None = None,
              hook_every: int = 0) -> tuple[Qwen, list[float]]:
    """``steps`` updates of the ``algorithm=sft`` objective on ``batches``; returns (model, losses).

    ``losses[i]`` is the token-mean CE over steps ``[i * log_every, (i + 1) * log_every)``
    (the last window may be shorter). The input model is left unchanged (a new one is
    returned): the step donates a copy of its parameters. ``hook(step, model)`` is called
    after every ``hook_every``-th update (``step`` counts updates; not after the last one
    unless it is a multiple), e.g. to measure an accuracy curve.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        graphdef, params = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), []
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(optim, steps)
    graphdef, state, shardings = create_train_state(model, tx, mesh, seed=0)
    step = TrainStep(make_loss_fn(SFT_SPEC, graphdef), tx, lr_schedule(optim, steps), shardings, mesh)
    losses: list[float] = []
    window_sum, window_count = jnp.zeros(()), jnp.zeros(())
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    with jax.set_mesh(mesh):
        for i in bar:
            state, out = step(state, sft_rows(next(batches)), None)
            s, c = out["ce"]
            window_sum, window_count = window_sum + s, window_count + c
            if (i + 1) % log_every == 0 or i + 1 == steps:
                losses.append(float(window_sum / jnp.maximum(window_count, 1.0)))
                window_sum, window_count = jnp.zeros(()), jnp.zeros(())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if hook is not None and hook_every and (i + 1) % hook_every == 0:
                hook(i + 1, nnx.merge(graphdef, state.params))
    bar.close()
    return nnx.merge(graphdef, state.params), losses
