"""Optimal-transport distances between two short futures (TOPD §3 detectors).

``ot_distance`` is a small log-domain Sinkhorn written here rather than ott-jax's
solver: importing ott pulls in Flax, Matplotlib, SciPy, equinox and lineax (≈ 1.4 s),
which a dependency-free loss library must not do; our windows are tiny (K ≈ 50), masks
are explicit, and the detector needs no implicit differentiation, low-rank or
annealing. The tests cross-check it against ott-jax and an exact assignment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from topd_jax.losses.divergence import compute_dtype

OT_SOLVERS = ("sinkhorn", "sinkhorn_divergence", "exact")


def cosine_cost(x: jax.Array, y: jax.Array) -> jax.Array:
    """1 − cos(x_i, y_j): ``[..., K, D], [..., L, D] -> [..., K, L]`` float32 in [0, 2].

    Zero vectors are treated as orthogonal to everything (cost 1) instead of NaN.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    x = x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
    y = y * lax.rsqrt(jnp.maximum(jnp.sum(y * y, axis=-1, keepdims=True), 1e-24))
    return 1.0 - jnp.einsum("...kd,...ld->...kl", x, y)


def _masked_logsumexp(z: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """logsumexp over ``axis`` of the entries where ``mask``; assumes ≥ 1 valid entry."""
    z = jnp.where(mask, z, -jnp.inf)
    top = jnp.max(z, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(z - top), 0.0), axis=axis, keepdims=True)
    return jnp.squeeze(top + jnp.log(jnp.maximum(total, 1e-38)), axis)


def sinkhorn_plan(
    cost: jax.Array,
    x_mask: jax.Array,
    y_mask: jax.Array,
    *,
    epsilon: float = 0.05,
    max_iters: int = 2000,
    tol: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Entropic OT plan between uniform marginals over the valid rows / columns.

    Log-domain Sinkhorn on the dual potentials (f, g), stable for small ε. Iterates until
    the L1 error of the row marginal is below ``tol`` (columns are exact after each
    g-update) or ``max_iters``. Not reverse-differentiable (``while_loop``): the plan is
    a constant for autodiff; see ``ot_distance`` for gradients.

    Args:
      cost: ``[K, L]`` float cost matrix.
      x_mask: ``[K]``, y_mask: ``[L]`` valid tokens; each must have ≥ 1 valid entry.
      epsilon: absolute entropic regularisation (not relative to the mean cost).

    Returns:
      ``(plan [K, L], marginal_error [])``; the plan sums to 1 and is 0 on masked
      rows/columns.
    """
    cost = cost.astype(jnp.float32)
    x_valid, y_valid = x_mask.astype(bool), y_mask.astype(bool)
    pair_valid = x_valid[:, None] & y_valid[None, :]
    log_a = -jnp.log(jnp.maximum(jnp.sum(x_valid), 1).astype(jnp.float32))
    log_b = -jnp.log(jnp.maximum(jnp.sum(y_valid), 1).astype(jnp.float32))
    a = jnp.where(x_valid, jnp.exp(log_a), 0.0)

    def update_f(g):
        lse = _masked_logsumexp((g[None, :] - cost) / epsilon, pair_valid, axis=1)
        return jnp.where(x_valid, epsilon * (log_a - lse), 0.0)

    def update_g(f):
        lse = _masked_logsumexp((f[:, None] - cost) / epsilon, pair_valid, axis=0)
        return jnp.where(y_valid, epsilon * (log_b - lse), 0.0)

    def body(state):
        f, g, _, it = state
        f_new = update_f(g)
        # Row sums of the current plan are a_i · exp((f_i − f_new_i) / ε).
        err = jnp.sum(a * jnp.abs(jnp.expm1(jnp.where(x_valid, (f - f_new) / epsilon, 0.0))))
        return f_new, update_g(f_new), err, it + 1

    def keep_going(state):
        _, _, err, it = state
        return (err > tol) & (it < max_iters)

    f0 = jnp.zeros(cost.shape[0], jnp.float32)
    g0 = update_g(f0)
    f, g, err, _ = lax.while_loop(keep_going, body, (f0, g0, jnp.float32(jnp.inf), 0))
    log_plan = (f[:, None] + g[None, :] - cost) / epsilon
    plan = jnp.where(pair_valid, jnp.exp(jnp.where(pair_valid, log_plan, 0.0)), 0.0)
    return plan, err


def _entropic_objective(plan: jax.Array, cost: jax.Array, x_valid: jax.Array, y_valid: jax.Array,
                        epsilon: float) -> jax.Array:
    """OT_ε = ⟨P, C⟩ + ε·KL(P ‖ a⊗b) of a plan ``[K, L]`` (0·log 0 = 0)."""
    log_ab = (-jnp.log(jnp.maximum(jnp.sum(x_valid), 1).astype(jnp.float32))
              - jnp.log(jnp.maximum(jnp.sum(y_valid), 1).astype(jnp.float32)))
    positive = plan > 0
    kl = jnp.sum(jnp.where(positive, plan * (jnp.log(jnp.where(positive, plan, 1.0)) - log_ab), 0.0))
    return jnp.sum(plan * cost) + epsilon * kl


def _exact_plans_host(cost: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray) -> np.ndarray:
    """Exact OT plans, uniform marginals over the valid rows/columns, on the host (SciPy):
    an assignment problem for equal counts, a linear program (HiGHS) otherwise.
    ``[N, K, L], [N, K], [N, L] -> [N, K, L]`` float32; all-zero where a side is empty."""
    from scipy.optimize import linear_sum_assignment, linprog  # host-only, lazily

    cost, x_valid, y_valid = np.asarray(cost, np.float64), np.asarray(x_valid, bool), np.asarray(y_valid, bool)
    plans = np.zeros(cost.shape, np.float32)
    for i in range(cost.shape[0]):
        rows, cols = np.flatnonzero(x_valid[i]), np.flatnonzero(y_valid[i])
        n, m = len(rows), len(cols)
        if n == 0 or m == 0:
            continue
        c = cost[i][np.ix_(rows, cols)]
        if n == m:
            r, k = linear_sum_assignment(c)
            plans[i, rows[r], cols[k]] = 1.0 / n
            continue
        # P [n, m] >= 0 with row sums 1/n and column sums 1/m.
        a_eq = np.zeros((n + m, n * m))
        for j in range(n):
            a_eq[j, j * m:(j + 1) * m] = 1.0
        for k in range(m):
            a_eq[n + k, k::m] = 1.0
        b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
        res = linprog(c.reshape(-1), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
        if res.status != 0:
            raise RuntimeError(f"exact OT linear program failed: {res.message}")
        plans[i][np.ix_(rows, cols)] = res.x.reshape(n, m)
    return plans


def exact_plan(cost: jax.Array, x_mask: jax.Array, y_mask: jax.Array) -> jax.Array:
    """Exact (unregularised) OT plan between uniform marginals over the valid tokens.

    Solved on the host by SciPy through ``jax.pure_callback`` (works under jit and vmap;
    a constant for autodiff): an optimal assignment (``linear_sum_assignment``) when both
    sides have the same number of valid tokens, a linear program (HiGHS) otherwise.
    Meant for detector windows (K ≲ 50 tokens, tens to hundreds of windows per step).

    Args:
      cost: ``[..., K, L]``; x_mask ``[..., K]``, y_mask ``[..., L]``.

    Returns:
      ``[..., K, L]`` float32 plan summing to 1 (all zero where a side has no valid token).
    """
    batch = cost.shape[:-2]
    k, l = cost.shape[-2:]
    flat = lambda a, tail: a.reshape((-1,) + tail)
    out = jax.pure_callback(
        _exact_plans_host, jax.ShapeDtypeStruct((int(np.prod(batch, dtype=int)), k, l), jnp.float32),
        flat(lax.stop_gradient(cost).astype(jnp.float32), (k, l)), flat(x_mask.astype(bool), (k,)),
        flat(y_mask.astype(bool), (l,)), vmap_method="sequential")
    return out.reshape(cost.shape)


def ot_distance(
    x: jax.Array,
    y: jax.Array,
    x_mask: jax.Array,
    y_mask: jax.Array,
    *,
    epsilon: float = 0.05,
    max_iters: int = 2000,
    tol: float = 1e-5,
    solver: str = "sinkhorn",
    with_error: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Transport distance between two token windows, cosine cost, uniform marginals.

    Args:
      x: ``[..., K, D]`` embeddings of one continuation (e.g. teacher's, L2-normalised or
        not: the cost normalises), y: ``[..., L, D]`` the other's.
      x_mask: ``[..., K]``, y_mask: ``[..., L]`` valid tokens (uniform mass over them).
      epsilon: Sinkhorn ε (absolute; TOPD default 0.05). max_iters, tol: see
        ``sinkhorn_plan``.
      solver:
        * ``"sinkhorn"`` (default): ⟨P_ε, C⟩, the transport cost of the entropic plan --
          not the entropic objective, so identical windows give ≈ 0. It is ≥ the exact OT
          cost and exceeds it by at most ε·log(min(n_x, n_y)) (n = valid counts; the
          entropy gap): 0.10 at K = 8, 0.20 at K = 50 with ε = 0.05, the size of the signal.
        * ``"sinkhorn_divergence"``: the debiased Sinkhorn divergence
          S_ε = OT_ε(x, y) − ½·OT_ε(x, x) − ½·OT_ε(y, y) with OT_ε = ⟨P, C⟩ + ε·KL(P ‖ a⊗b)
          the entropic objective (Feydy et al. 2019): ≥ 0, exactly 0 for identical windows,
          and the entropic bias cancels to first order. Three Sinkhorn solves.
        * ``"exact"``: the unregularised OT cost (``exact_plan``: SciPy on the host; an
          assignment for equal counts). ``epsilon``, ``max_iters`` and ``tol`` are unused.
      with_error: also return the L1 error of the Sinkhorn row marginal ``[...]`` (the
        largest of the three solves for the divergence; 0 for ``exact``).

    Returns:
      ``[...]`` float32 (and the error when ``with_error``). 0 when either window has no
      valid token. Gradients flow through the cost matrix with the plan(s) held fixed
      (envelope theorem: exact for the entropic objective and for exact OT).
    """
    if solver not in OT_SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {OT_SOLVERS}")
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"windows x {x.shape} and y {y.shape} must share batch dims and D")
    if x_mask.shape != x.shape[:-1] or y_mask.shape != y.shape[:-1]:
        raise ValueError(
            f"masks {x_mask.shape}, {y_mask.shape} do not match windows {x.shape}, {y.shape}"
        )
    x_valid, y_valid = x_mask.astype(bool), y_mask.astype(bool)
    nonempty = jnp.any(x_valid, axis=-1) & jnp.any(y_valid, axis=-1)
    # An empty side would make the marginals undefined; solve a dummy all-valid problem
    # there and zero the result, so no NaN is ever produced.
    x_solve = x_valid | ~nonempty[..., None]
    y_solve = y_valid | ~nonempty[..., None]
    batch_ndim = x.ndim - 2

    def batched(fn):
        for _ in range(batch_ndim):
            fn = jax.vmap(fn)
        return fn

    def entropic(cost, xm, ym):
        """OT_ε per window (plan fixed for autodiff) and the marginal error."""
        plan, err = batched(lambda c, a, b: sinkhorn_plan(c, a, b, epsilon=epsilon, max_iters=max_iters,
                                                          tol=tol))(lax.stop_gradient(cost), xm, ym)
        plan = lax.stop_gradient(plan)
        value = batched(lambda p, c, a, b: _entropic_objective(p, c, a, b, epsilon))(plan, cost, xm, ym)
        return plan, value, err

    cost = cosine_cost(x, y)  # [..., K, L]
    if solver == "exact":
        plan = lax.stop_gradient(exact_plan(cost, x_solve, y_solve))
        value, err = jnp.sum(plan * cost, axis=(-2, -1)), jnp.zeros(nonempty.shape, jnp.float32)
    elif solver == "sinkhorn":
        plan, _, err = entropic(cost, x_solve, y_solve)
        value = jnp.sum(plan * cost, axis=(-2, -1))
    else:
        _, v_xy, e_xy = entropic(cost, x_solve, y_solve)
        _, v_xx, e_xx = entropic(cosine_cost(x, x), x_solve, x_solve)
        _, v_yy, e_yy = entropic(cosine_cost(y, y), y_solve, y_solve)
        value = v_xy - 0.5 * (v_xx + v_yy)
        err = jnp.maximum(e_xy, jnp.maximum(e_xx, e_yy))
    value = jnp.where(nonempty, value, 0.0)
    if with_error:
        return value, jnp.where(nonempty, err, 0.0)
    return value


def margin_w1(
    teacher_margins: jax.Array,
    student_margins: jax.Array,
    teacher_mask: jax.Array | None = None,
    student_mask: jax.Array | None = None,
) -> jax.Array:
    """1-D Wasserstein-1 distance between two sets of scalar samples.

    The authors' prototype detector: each side draws N continuations, each with margin
    m = mean over its tokens of (log p_T − log p_θ); D_t = W1 between the two sets. For
    equal sizes this is mean |sort(a) − sort(b)|; in general ∫ |F_a(z) − F_b(z)| dz
    (computed exactly from the two empirical CDFs, as ``scipy.stats.wasserstein_distance``).

    Args:
      teacher_margins: ``[..., N]``; student_margins: ``[..., M]``.
      teacher_mask, student_mask: optional ``[..., N]`` / ``[..., M]`` valid samples.

    Returns:
      ``[...]`` float32 (float64 for float64 inputs); 0 when either side has no valid sample.
    """
    dtype = compute_dtype(teacher_margins, student_margins)  # float32; float64 stays float64
    a = teacher_margins.astype(dtype)
    b = student_margins.astype(dtype)
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"teacher_margins {a.shape} and student_margins {b.shape} batch dims differ")
    a_valid = jnp.ones(a.shape, bool) if teacher_mask is None else teacher_mask.astype(bool)
    b_valid = jnp.ones(b.shape, bool) if student_mask is None else student_mask.astype(bool)
    if a_valid.shape != a.shape or b_valid.shape != b.shape:
        raise ValueError(f"masks {a_valid.shape}, {b_valid.shape} do not match {a.shape}, {b.shape}")
    z = jnp.concatenate([a, b], axis=-1)
    z_valid = jnp.concatenate([a_valid, b_valid], axis=-1)
    # Masked samples become copies of the largest valid one: zero-length CDF segments.
    top = jnp.max(jnp.where(z_valid, z, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    z = jnp.sort(jnp.where(z_valid, z, top), axis=-1)
    n_a = jnp.sum(a_valid, axis=-1, keepdims=True)
    n_b = jnp.sum(b_valid, axis=-1, keepdims=True)
    # Empirical CDFs at every breakpoint: [..., N+M] via [..., N+M, N] comparisons.
    cdf_a = jnp.sum((a[..., None, :] <= z[..., :, None]) & a_valid[..., None, :], axis=-1)
    cdf_b = jnp.sum((b[..., None, :] <= z[..., :, None]) & b_valid[..., None, :], axis=-1)
    cdf_gap = jnp.abs(cdf_a / jnp.maximum(n_a, 1) - cdf_b / jnp.maximum(n_b, 1))
    w1 = jnp.sum(cdf_gap[..., :-1] * jnp.diff(z, axis=-1), axis=-1)
    return jnp.where((n_a[..., 0] > 0) & (n_b[..., 0] > 0), w1, 0.0)
