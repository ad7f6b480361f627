"""The jitted update: gradients accumulated over micro-batches, AdamW, non-finite skip.

    step = TrainStep(loss_fn, tx, schedule, shardings, mesh, micro_batches=4, coefs=..., updates=1)
    state, metrics = step(state, batch, teacher_head)   # state donated; batch: PreparedBatch or rows

``loss_fn(params, micro_batch, teacher_head) -> (terms, metrics)`` with ``{name: (sum,
count)}`` values (``algorithms.objective``). The loss is ``Σ_k coef_k Σ sum_k / Σ count_k``
over the whole batch (global token counts, ``optim.accumulate_gradients``). A step whose
loss or gradient norm is not finite keeps the old params and optimizer state (``skipped``
= 1 in the metrics); ``step`` still advances so the data stream moves on.

Shardings are explicit: the state in and out by ``shardings`` (logical rules), batch rows
over ``("data", "fsdp")`` (``act_batch``), the teacher head as it lies, metrics replicated.

A ``PreparedBatch`` may carry a ``PrecomputedGrad`` (TOPD's fused main pass): the gradient of
the loss through batch arrays that the loss reads as constants, computed before the step. It
is added to the gradient (not to the loss: the loss already counts those arrays' value) and
needs one update on the whole batch (``micro_batches=1``, ``updates=1``).

Gradient norms by term (``logging.grad_norms_by_term``, review D11): the metrics also carry
``grad_norm_opd`` = ‖∇L_OPD_w‖ and ``grad_norm_traj`` = ‖∇(λ·L_traj)‖ (their sum is the step's
gradient; both before clipping). With the fused main pass they come apart for free (the
``PrecomputedGrad`` is ∇L_OPD_w, the differentiated part ∇(λ·L_traj)); otherwise ``opd_term_fn``,
the loss restricted to L_OPD_w, costs one extra forward and backward pass over the batch and
∇(λ·L_traj) is the difference. Without an L_traj term (plain OPD, OPD + suppression)
``grad_norm_opd`` = ``grad_norm`` and ``grad_norm_traj`` = 0, at no cost.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from topd_jax.algorithms.prepared import PrecomputedGrad, PreparedBatch
from topd_jax.sharding import logical_to_spec
from topd_jax.train.optim import accumulate_gradients, select_if_finite, split_micro_batches
from topd_jax.train.state import TrainState, replicated


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Rows (axis 0) of every batch array over the ``act_batch`` mesh axes when they divide."""
    out = {}
    for name, x in batch.items():
        axes = ("act_batch",) + (None,) * (x.ndim - 1)
        out[name] = NamedSharding(mesh, logical_to_spec(axes, x.shape, dict(mesh.shape)))
    return out


def term_grad_norms(state: TrainState, batch, teacher_head, differentiated, precomputed: PrecomputedGrad | None,
                    *, opd_term_fn: Callable | None, micro_batches: int) -> dict[str, jax.Array]:
    """``grad_norm_opd`` and ``grad_norm_traj`` (module doc). ``differentiated``: the gradient of
    the step's loss function over the (normalised) ``batch``, without ``precomputed``."""
    if precomputed is not None:  # fused: ∇L_OPD_w came precomputed, the loss differentiated λ·L_traj
        g_opd, g_traj = precomputed.grads, differentiated
    elif opd_term_fn is None:  # the loss is L_OPD_w alone
        g_opd, g_traj = differentiated, None
    else:
        _, g_opd, _, _ = accumulate_gradients(lambda p, mb: opd_term_fn(p, mb, teacher_head), state.params, batch,
                                              micro_batches)
        g_traj = jax.tree.map(jnp.subtract, differentiated, g_opd)
    zero = jnp.zeros((), jnp.float32)
    return {"grad_norm_opd": optax.tree.norm(g_opd),
            "grad_norm_traj": zero if g_traj is None else optax.tree.norm(g_traj)}


def _apply_update(state: TrainState, batch, teacher_head, *, loss_fn: Callable, tx, schedule,
                  micro_batches: int, coefs: Mapping[str, float] | None, normalize: Callable | None,
                  precomputed: PrecomputedGrad | None = None, grad_norms_by_term: bool = False,
                  opd_term_fn: Callable | None = None):
    """Gradient over ``batch`` and one optimizer update (traced): ``(params, opt_state, ok, metrics)``.
    ``precomputed``: gradient through constants of the loss, added to the differentiated one."""
    if normalize is not None:
        batch = normalize(batch)
    loss, grads, terms, metrics = accumulate_gradients(
        lambda p, mb: loss_fn(p, mb, teacher_head), state.params, batch, micro_batches, coefs)
    by_term = {}
    if grad_norms_by_term:
        by_term = term_grad_norms(state, batch, teacher_head, grads, precomputed, opd_term_fn=opd_term_fn,
                                  micro_batches=micro_batches)
    if precomputed is not None:
        grads = jax.tree.map(jnp.add, grads, precomputed.grads)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Non-finite gradients would poison Adam's moments even if the update were dropped:
    # compute the update from zeros there, then select the old state anyway.
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, opt_state = select_if_finite(ok, (params, opt_state), (state.params, state.opt_state))
    out = dict(metrics)
    for name, (s, c) in terms.items():
        out[f"{name}_loss"] = (s, c)
    out.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.opt_steps),
               skipped=(~ok).astype(jnp.float32), **by_term)
    return params, opt_state, ok, out


def update_impl(state: TrainState, batch, teacher_head, precomputed: PrecomputedGrad | None = None, *,
                loss_fn: Callable, tx, schedule, micro_batches: int, coefs: Mapping[str, float],
                normalize: Callable | None = None, updates: int = 1, grad_norms_by_term: bool = False,
                opd_term_fn: Callable | None = None):
    """One step (traced): ``updates`` optimizer updates on as many consecutive row
    mini-batches of ``batch`` (PPO-style; 1: one update on the whole batch). ``normalize(b)``
    may add param-independent arrays computed over the (mini-)batch (global counts).
    Returns ``(new_state, metrics)``; ``step`` advances by 1, ``opt_steps`` by the number of
    finite updates. With several updates, ``(sum, count)`` metrics add up, scalars are
    averaged and ``skipped`` is the fraction of skipped updates."""
    kw = dict(loss_fn=loss_fn, tx=tx, schedule=schedule, micro_batches=micro_batches, coefs=coefs,
              normalize=normalize, grad_norms_by_term=grad_norms_by_term, opd_term_fn=opd_term_fn)
    if precomputed is not None and (updates != 1 or micro_batches != 1):
        raise ValueError(f"a PrecomputedGrad needs one update on the whole batch, got updates={updates}, "
                         f"micro_batches={micro_batches}")
    if updates == 1:
        params, opt_state, ok, out = _apply_update(state, batch, teacher_head, precomputed=precomputed, **kw)
        opt_steps = state.opt_steps + ok.astype(jnp.int32)
    else:
        def body(carry, mini):
            params, opt_state, opt_steps = carry
            s = state.replace(params=params, opt_state=opt_state, opt_steps=opt_steps)
            p, o, ok, out = _apply_update(s, mini, teacher_head, **kw)
            return (p, o, opt_steps + ok.astype(jnp.int32)), out

        (params, opt_state, opt_steps), outs = jax.lax.scan(
            body, (state.params, state.opt_state, state.opt_steps), split_micro_batches(batch, updates))
        out = {k: (tuple(jnp.sum(x) for x in v) if isinstance(v, tuple) else jnp.mean(v))
               for k, v in outs.items()}
    new = state.replace(step=state.step + 1, opt_steps=opt_steps, params=params, opt_state=opt_state)
    return new, out


class TrainStep:
    """Compiles ``update_impl`` once per batch structure with explicit shardings."""

    def __init__(self, loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable,
                 shardings: TrainState, mesh: Mesh, *, micro_batches: int = 1,
                 coefs: Mapping[str, float] | None = None, normalize: Callable | None = None,
                 updates: int = 1, grad_norms_by_term: bool = False, opd_term_fn: Callable | None = None):
        self._kw = dict(loss_fn=loss_fn, tx=tx, schedule=schedule, micro_batches=micro_batches,
                        coefs=dict(coefs) if coefs is not None else None, normalize=normalize,
                        updates=updates, grad_norms_by_term=grad_norms_by_term, opd_term_fn=opd_term_fn)
        self.shardings, self.mesh = shardings, mesh
        self._compiled: dict[tuple, Callable] = {}

    def compiled(self, batch: PreparedBatch, teacher_head):
        """``(jitted fn(state, arrays, head, precomputed), arrays' shardings, head sharding)`` for
        the structure of ``batch`` (abstract arrays are fine: ``--plan`` lowers it)."""
        arrays, pre = batch.arrays, batch.precomputed
        through = None if pre is None else pre.through
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in arrays.items())) + (through,)
        if key not in self._compiled:
            b_sh = batch_shardings(arrays, self.mesh)
            head_sh = getattr(teacher_head, "sharding", None)
            if not isinstance(head_sh, NamedSharding):
                head_sh = replicated(self.mesh)

            def fn(state, arrays, head, precomputed):
                return update_impl(state, arrays, head, precomputed, **self._kw)

            pre_sh = None if pre is None else PrecomputedGrad(self.shardings.params, through=through)
            self._compiled[key] = (jax.jit(fn, in_shardings=(self.shardings, b_sh, head_sh, pre_sh),
                                           out_shardings=(self.shardings, replicated(self.mesh)),
                                           donate_argnums=0), b_sh, head_sh)
        return self._compiled[key]

    def __call__(self, state: TrainState, batch: PreparedBatch | Mapping[str, Any],
                 teacher_head) -> tuple[TrainState, dict]:
        """One step on ``batch``: a ``PreparedBatch`` (rows and an optional ``PrecomputedGrad``,
        see the module docstring), or a mapping of rows alone."""
        if not isinstance(batch, PreparedBatch):
            batch = PreparedBatch(dict(batch))
        fn, b_sh, head_sh = self.compiled(batch, teacher_head)
        arrays = {k: jax.device_put(v, b_sh[k]) for k, v in batch.arrays.items()}
        return fn(state, arrays, jax.device_put(teacher_head, head_sh), batch.precomputed)
