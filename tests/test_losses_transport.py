"""ot_distance (log-domain Sinkhorn) vs exact assignment and ott-jax; margin_w1 vs SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.stats import wasserstein_distance

from topd_jax.losses import cosine_cost, margin_w1, ot_distance, sinkhorn_plan

SETTINGS = settings(max_examples=20, deadline=None)
EPS = 0.05
jit_ot = jax.jit(ot_distance, static_argnames=("epsilon", "max_iters", "tol"))


def windows(seed, shape=(4, 8, 6)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def np_cosine_cost(x, y):
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    return 1.0 - x @ y.T


def exact_ot(x, y):
    """Equal-size windows, uniform marginals: OT is the optimal assignment's mean cost."""
    cost = np_cosine_cost(np.asarray(x, np.float64), np.asarray(y, np.float64))
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].mean()


@SETTINGS
@given(seed=st.integers(0, 2**31), dim=st.sampled_from([3, 6, 32]))
def test_sinkhorn_cost_is_within_the_entropy_gap_of_the_exact_assignment(seed, dim):
    x, y = windows(seed, (4, 8, dim))
    mask = np.ones((4, 8), bool)
    got = np.asarray(jit_ot(x, y, mask, mask, epsilon=EPS))
    exact = np.array([exact_ot(x[i], y[i]) for i in range(4)])
    # ⟨P_ε, C⟩ − OT ∈ [0, ε·log n] (n = 8 tokens); 1e-4 slack for the stopping tolerance.
    assert np.all(got - exact >= -1e-4)
    assert np.all(got - exact <= EPS * np.log(8) + 1e-4)
    # A small ε approaches the exact assignment.
    sharp = np.asarray(jit_ot(x, y, mask, mask, epsilon=0.005, max_iters=20000))
    np.testing.assert_allclose(sharp, exact, atol=0.005 * np.log(8) + 1e-3)


def test_ot_of_identical_windows_is_zero():
    x, _ = windows(1, (3, 10, 64))
    mask = np.random.default_rng(0).random((3, 10)) < 0.8
    np.testing.assert_allclose(jit_ot(x, x, mask, mask), 0.0, atol=1e-5)
    # Same tokens in a different order (a permutation) are also at distance 0.
    np.testing.assert_allclose(jit_ot(x, x[:, ::-1], mask, mask[:, ::-1]), 0.0, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**31))
def test_ot_is_symmetric(seed):
    x, y = windows(seed)
    rng = np.random.default_rng(seed)
    xm, ym = rng.random((4, 8)) < 0.7, rng.random((4, 8)) < 0.7
    np.testing.assert_allclose(jit_ot(x, y, xm, ym), jit_ot(y, x, ym, xm), atol=1e-4)


def test_masked_tokens_are_ignored_and_match_the_subproblem():
    x, y = windows(2, (1, 8, 6))
    xm = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], bool)
    ym = np.array([[1, 0, 1, 1, 1, 1, 0, 0]], bool)
    full = jit_ot(x, y, xm, ym)
    sub = jit_ot(x[:, xm[0]], y[:, ym[0]], np.ones((1, 5), bool), np.ones((1, 5), bool))
    np.testing.assert_allclose(full, sub, rtol=1e-4)
    x2 = np.where(xm[..., None], x, 1e3)  # garbage in masked slots changes nothing
    np.testing.assert_allclose(jit_ot(x2, y, xm, ym), full, rtol=1e-6)
    assert float(full[0]) == pytest.approx(exact_ot(x[0, xm[0]], y[0, ym[0]]), abs=EPS * np.log(5) + 1e-4)


def test_unequal_window_lengths_match_ott_jax():
    from ott.geometry import costs, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    x, y = windows(3, (2, 9, 5))
    xm = np.ones((2, 9), bool)
    ym = np.array([[1] * 6 + [0] * 3, [1] * 9], bool)
    got = np.asarray(jit_ot(x, y, xm, ym))

    @jax.jit
    @jax.vmap
    def ott_cost(x, y, a, b):
        geom = pointcloud.PointCloud(x, y, cost_fn=costs.Cosine(), epsilon=EPS)
        out = sinkhorn.Sinkhorn(threshold=1e-6, max_iterations=5000)(linear_problem.LinearProblem(geom, a, b))
        return jnp.sum(out.matrix * geom.cost_matrix)

    want = ott_cost(x, y, xm / xm.sum(-1, keepdims=True), ym / ym.sum(-1, keepdims=True))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_empty_windows_give_zero_without_nan():
    x, y = windows(4, (2, 5, 4))
    xm = np.array([[0] * 5, [1] * 5], bool)
    ym = np.array([[1] * 5, [0] * 5], bool)
    got = jit_ot(x, y, xm, ym)
    np.testing.assert_array_equal(got, [0.0, 0.0])


def test_sinkhorn_plan_has_the_uniform_marginals():
    x, y = windows(5, (1, 7, 4))
    xm = np.array([1, 1, 1, 0, 1, 1, 1], bool)
    ym = np.array([1, 1, 1, 1, 1, 1, 0], bool)
    solve = jax.jit(lambda c: sinkhorn_plan(c, xm, ym, epsilon=EPS, tol=1e-6))
    plan, err = solve(cosine_cost(x[0], y[0]))
    np.testing.assert_allclose(plan.sum(1), xm / 6, atol=1e-5)
    np.testing.assert_allclose(plan.sum(0), ym / 6, atol=1e-5)
    assert float(err) <= 1e-6


def test_vmap_bfloat16_and_finite_gradients():
    x, y = windows(6, (3, 2, 8, 16))
    mask = np.ones((3, 2, 8), bool)
    mapped = jax.jit(jax.vmap(lambda a, b, m: ot_distance(a, b, m, m)))(x, y, mask)
    np.testing.assert_allclose(mapped, jit_ot(x, y, mask, mask), rtol=1e-5)
    half = jit_ot(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16), mask, mask)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, mapped, atol=1e-2)
    grad = jax.jit(jax.grad(lambda a: ot_distance(a, y, mask, mask).sum()))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


def test_cosine_cost_matches_numpy_and_handles_zero_vectors():
    x, y = windows(7, (5, 3))
    np.testing.assert_allclose(cosine_cost(x, y), np_cosine_cost(x, y), atol=1e-6)
    zero = cosine_cost(np.zeros((1, 3), np.float32), y)
    np.testing.assert_allclose(zero, 1.0)


# --- margin W1 ---------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.sampled_from([1, 4, 7]), m=st.sampled_from([1, 4, 5]))
def test_margin_w1_equals_scipy_wasserstein_distance(seed, n, m):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, n)).astype(np.float32)
    b = (rng.normal(size=(3, m)) + 0.5).astype(np.float32)
    got = jax.jit(margin_w1)(a, b)
    want = [wasserstein_distance(a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if n == m:  # equal sizes: mean |sorted differences|
        np.testing.assert_allclose(got, np.abs(np.sort(a) - np.sort(b)).mean(-1), rtol=1e-5, atol=1e-6)


def test_margin_w1_masks_samples_and_is_zero_for_equal_sets():
    a = np.array([[0.0, 1.0, 2.0, 99.0]], np.float32)
    b = np.array([[0.5, 3.0, -99.0, 7.0]], np.float32)
    am = np.array([[1, 1, 1, 0]], bool)
    bm = np.array([[1, 1, 0, 0]], bool)
    w1 = jax.jit(margin_w1)
    got = w1(a, b, am, bm)
    assert float(got[0]) == pytest.approx(wasserstein_distance([0, 1, 2], [0.5, 3]), rel=1e-6)
    assert float(w1(a, a[:, ::-1], am, am[:, ::-1])[0]) == 0.0
    assert float(w1(a, b, np.zeros_like(am), bm)[0]) == 0.0


def test_margin_w1_gradient_matches_finite_differences():
    from jax.test_util import check_grads

    a = jnp.array([0.1, 0.7, -0.4, 1.3])
    b = jnp.array([0.0, 0.5, 0.9])
    check_grads(lambda x: margin_w1(x, b), (a,), order=1, modes=("rev",), eps=1e-3, atol=2e-3, rtol=2e-3)
    with jax.enable_x64(True):  # float64 inputs compute in float64: central differences at 1e-7
        a64, b64 = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
        assert margin_w1(a64, b64).dtype == jnp.float64
        check_grads(lambda x: margin_w1(x, b64), (a64,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


# ---- exact solver and debiased Sinkhorn divergence (TOPD_REVIEW D3) ----
def near_duplicate_windows(seed, batch=16, k=8, vocab=20, dim=48):
    """Windows over a vocabulary whose embeddings are close (costs ≈ 0.1, the regime of a
    small tied embedding): y is x with one token replaced."""
    rng = np.random.default_rng(seed)
    table = (rng.normal(size=(1, dim)) + 0.3 * rng.normal(size=(vocab, dim))).astype(np.float32)
    xt = rng.integers(0, vocab, (batch, k))
    yt = xt.copy()
    yt[:, k // 2] = rng.integers(0, vocab, batch)
    return table[xt], table[yt]


def replicated_assignment_ot(x, y):
    """Exact OT with uniform marginals for n ≠ m: replicate rows m/g and columns n/g times
    (g = gcd) and solve the square assignment; the mean assigned cost is the OT cost."""
    n, m = len(x), len(y)
    g = np.gcd(n, m)
    cost = np_cosine_cost(np.repeat(np.asarray(x, np.float64), m // g, 0),
                          np.repeat(np.asarray(y, np.float64), n // g, 0))
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].mean()


@SETTINGS
@given(seed=st.integers(0, 2**31))
def test_exact_solver_equals_the_optimal_assignment(seed):
    x, y = windows(seed, (3, 6, 8))
    mask = np.ones((3, 6), bool)
    got = np.asarray(jax.jit(lambda a, b: ot_distance(a, b, mask, mask, solver="exact"))(x, y))
    np.testing.assert_allclose(got, [exact_ot(x[i], y[i]) for i in range(3)], atol=1e-6)


def test_exact_solver_with_unequal_counts_matches_replicated_assignment():
    x, y = windows(3, (2, 6, 5))
    x_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    y_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]], bool)
    got = np.asarray(ot_distance(x, y, x_mask, y_mask, solver="exact"))
    want = [replicated_assignment_ot(x[i][x_mask[i]], y[i][y_mask[i]]) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Under vmap too, and an empty side gives 0.
    empty = np.zeros((2, 6), bool)
    batched = jax.vmap(lambda a, b, am, bm: ot_distance(a, b, am, bm, solver="exact"))
    np.testing.assert_allclose(batched(x, y, x_mask, y_mask), want, atol=1e-6)
    np.testing.assert_array_equal(ot_distance(x, y, empty, y_mask, solver="exact"), 0.0)


def test_sinkhorn_bias_and_its_debiased_divergence_on_near_duplicate_tokens():
    x, y = near_duplicate_windows(0)
    mask = np.ones(x.shape[:2], bool)
    exact = np.array([exact_ot(x[i], y[i]) for i in range(len(x))])
    plain = np.asarray(ot_distance(x, y, mask, mask, epsilon=0.05))
    div = np.asarray(ot_distance(x, y, mask, mask, epsilon=0.05, solver="sinkhorn_divergence"))
    same_plain = np.asarray(ot_distance(x, x, mask, mask, epsilon=0.05))
    same_div = np.asarray(ot_distance(x, x, mask, mask, epsilon=0.05, solver="sinkhorn_divergence"))
    # ⟨P_ε, C⟩ on identical windows is far from 0 here: the entropic bias exceeds the signal.
    assert same_plain.min() > 2 * exact.mean() > 0
    np.testing.assert_allclose(same_div, 0.0, atol=1e-6)
    assert np.all(div >= -1e-6)
    assert np.abs(div - exact).mean() < 0.3 * np.abs(plain - exact).mean()
    # At small ε the divergence approaches exact OT.
    sharp = np.asarray(ot_distance(x, y, mask, mask, epsilon=0.005, max_iters=20000,
                                   solver="sinkhorn_divergence"))
    np.testing.assert_allclose(sharp, exact, atol=2e-3)


def test_divergence_is_symmetric_and_differentiable():
    x, y = near_duplicate_windows(1, batch=4)
    mask = np.ones(x.shape[:2], bool)
    f = lambda a, b: ot_distance(a, b, mask, mask, solver="sinkhorn_divergence")  # noqa: E731
    np.testing.assert_allclose(f(x, y), f(y, x), atol=1e-5)
    g = jax.grad(lambda a: jnp.sum(f(a, y)))(jnp.asarray(x))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_marginal_error_is_reported_and_small_when_converged():
    x, y = windows(4, (3, 8, 6))
    mask = np.ones((3, 8), bool)
    d, err = ot_distance(x, y, mask, mask, with_error=True, tol=1e-6, max_iters=5000)
    assert d.shape == err.shape == (3,) and np.all(np.asarray(err) <= 1e-6)
    _, err = ot_distance(x, y, mask, mask, with_error=True, max_iters=1, tol=0.0)
    assert np.asarray(err).max() > 1e-4  # one iteration is not converged, and says so
    _, err = ot_distance(x, y, mask, mask, with_error=True, solver="exact")
    np.testing.assert_array_equal(err, 0.0)


def test_unknown_solver_is_refused_by_name():
    x, y = windows(5, (1, 4, 3))
    mask = np.ones((1, 4), bool)
    with pytest.raises(ValueError, match="solver='hungarian'"):
        ot_distance(x, y, mask, mask, solver="hungarian")
