"""Optimizer, schedule and gradient accumulation normalised by the global token count.

Losses follow the (sum, count) contract: a loss term is ``(Σ_t w_t ℓ_t, Σ_t w_t)`` over a
micro-batch. The step's loss is ``Σ sums / Σ counts`` over *all* micro-batches — not the
mean of per-micro-batch means, which over-weights micro-batches with few valid tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from topd_jax.config.schema import OptimConfig

PyTree = Any
# loss_fn(params, micro_batch) -> ({term: (sum, count)}, {metric: (sum, count)})
LossFn = Callable[[PyTree, PyTree], tuple[Mapping[str, tuple[jax.Array, jax.Array]],
                                          Mapping[str, tuple[jax.Array, jax.Array]]]]


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up then cosine to ``min_lr``, as a function of the update count ``s``.

    ``W = round(warmup_fraction * total_steps)``; ``lr(s) = lr * (s + 1) / W`` for
    ``s < W`` (the first update is not wasted at lr 0), then cosine from ``lr`` at ``s = W``
    to ``min_lr`` at ``s = total_steps - 1``, and ``min_lr`` after.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warm = min(int(round(cfg.warmup_fraction * total_steps)), total_steps)
    span = max(total_steps - 1 - warm, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm_lr = cfg.lr * (s + 1.0) / max(warm, 1)
        frac = jnp.clip((s - warm) / span, 0.0, 1.0)
        cos_lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(s < warm, warm_lr, cos_lr)

    return schedule


def decay_mask(params: PyTree) -> PyTree:
    """Weight decay on matrices only (ndim >= 2): norms' scales and biases are not decayed."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if ``clip_norm``) then AdamW on the warm-up + cosine schedule."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def split_micro_batches(batch: PyTree, num: int) -> PyTree:
    """``[num * m, ...]`` leaves -> ``[num, m, ...]`` (micro-batch axis first)."""
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch axis {x.shape[0]} (leaf shape {x.shape}) is not "
                             f"divisible by micro_batches={num}")
        return x.reshape(num, x.shape[0] // num, *x.shape[1:])
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params: PyTree, batch: PyTree, num_micro_batches: int,
                         coefs: Mapping[str, float] | None = None):
    """Gradient of ``L = Σ_k coef_k · (Σ_micro sum_k) / (Σ_micro count_k)``.

    ``loss_fn(params, micro_batch)`` returns ``(terms, metrics)``, both ``{name: (sum,
    count)}``; counts must not depend on params (they are masks/weights). Each term keeps
    its own gradient accumulator of sums and is divided once by its global count at the end
    (one accumulator for OPD's single term; two for TOPD's ``opd`` + ``traj``). Micro-batches
    run under ``lax.scan`` so only one micro-batch's activations are live.

    Args:
      batch: leaves ``[num_micro_batches * m, ...]``.
      coefs: weight per term (default 1 each), e.g. ``{"opd": 1.0, "traj": lam}``.
    Returns:
      ``(loss, grads, terms, metrics)``: scalar loss, grads like params, and the summed
      ``{name: (sum, count)}`` of terms and metrics (reduce them with ``sum / count``).
    """
    micro = split_micro_batches(batch, num_micro_batches)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(loss_fn, params, first)
    names = sorted(shapes[0])
    coefs = {k: 1.0 for k in names} if coefs is None else dict(coefs)
    if set(coefs) != set(names):
        raise ValueError(f"coefs keys {sorted(coefs)} != loss terms {names}")

    def term_sums(p, mb):
        terms, metrics = loss_fn(p, mb)
        sums = jnp.stack([terms[k][0] for k in names])  # [K]
        return sums, (terms, metrics)

    def body(carry, mb):
        grads, terms, metrics = carry
        sums, vjp_fn, (t, m) = jax.vjp(lambda p: term_sums(p, mb), params, has_aux=True)
        # One backward pass per term, sharing the forward residuals (K is 1 or 2).
        rows = [vjp_fn(jax.nn.one_hot(k, len(names), dtype=sums.dtype))[0]
                for k in range(len(names))]
        jac = jax.tree.map(lambda *r: jnp.stack(r), *rows)  # leaves [K, *param.shape]
        add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
        return (add(grads, jac), add(terms, t), add(metrics, m)), None

    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    grad0 = jax.tree.map(lambda p: jnp.zeros((len(names),) + p.shape, p.dtype), params)
    (gsum, terms, metrics), _ = jax.lax.scan(
        body, (grad0, zeros(shapes[0]), zeros(shapes[1])), micro)
    # Divide once by the global counts. An empty term (count 0, e.g. no guided points this
    # step) gives loss 0 and gradient 0 instead of NaN; counts may be fractional (Σ w_t).
    denom = {k: jnp.where(terms[k][1] > 0, terms[k][1], 1).astype(jnp.float32) for k in names}
    scale = jnp.stack([coefs[k] / denom[k] for k in names])
    grads = jax.tree.map(lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), gsum)
    loss = sum(coefs[k] * terms[k][0] / denom[k] for k in names)
    return loss, grads, terms, metrics


def select_if_finite(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``ok`` (a scalar bool), else ``old``: a non-finite step is skipped."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
