"""TOPD assembly: suppression, guidance points, opd/trajectory/topd losses, micro-batching."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from topd_jax.losses import (
    false_alarms,
    opd_loss,
    select_guidance_points,
    suppression_weights,
    token_divergence,
    topd_loss,
    trajectory_guidance_loss,
    trajectory_weights,
)

B, T, V = 4, 12, 9


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_forward_kl(student_logits, teacher_logits):
    ls, lt = np_log_softmax(student_logits), np_log_softmax(teacher_logits)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def batch(seed):
    rng = np.random.default_rng(seed)
    loss = rng.random((B, T)).astype(np.float32)
    mask = rng.random((B, T)) < 0.8
    cand = (rng.random((B, T)) < 0.3) & mask
    div = rng.random((B, T)).astype(np.float32)
    return loss, mask, cand, div


# --- classification ----------------------------------------------------------------


def test_false_alarms_are_candidates_at_or_below_the_batch_quantile():
    loss, mask, cand, div = batch(0)
    div_nan = np.where(cand, div, np.nan)  # D is only read at candidates
    got = np.asarray(jax.jit(false_alarms)(cand, div_nan))
    threshold = np.quantile(div[cand], 0.3)
    np.testing.assert_array_equal(got, cand & (div <= threshold))
    high = np.asarray(false_alarms(cand, div_nan, quantile=0.3, regime="high_divergence"))
    np.testing.assert_array_equal(high, cand & (div >= np.quantile(div[cand], 0.7)))
    # Matched sizes for distinct D (the paper's ablation suppresses a same-size set).
    assert abs(int(high.sum()) - int(got.sum())) <= 1


def test_suppression_weights_are_s_at_false_alarms_and_one_elsewhere():
    _, _, cand, div = batch(1)
    alarm = np.asarray(false_alarms(cand, div))
    for s in (0.0, 0.25):
        w = np.asarray(suppression_weights(cand, div, weight=s))
        np.testing.assert_array_equal(w, np.where(alarm, s, 1.0))
    with pytest.raises(ValueError, match="regime='mid'"):
        false_alarms(cand, div, regime="mid")


def test_suppression_weights_with_a_global_false_alarm_suppress_only_those_candidates():
    _, _, cand, div = batch(1)
    # Classified over a bigger (global) batch: another threshold than this batch's own.
    alarm = cand & (div <= np.quantile(div[cand], 0.6))
    w = np.asarray(suppression_weights(cand, np.full(div.shape, np.nan, np.float32), weight=0.25,
                                       false_alarm=alarm | ~cand))  # non-candidates are never suppressed
    np.testing.assert_array_equal(w, np.where(alarm, 0.25, 1.0))
    with pytest.raises(ValueError, match=r"false_alarm \(2, 3\)"):
        suppression_weights(cand, div, false_alarm=np.zeros((2, 3), bool))


def test_guidance_points_are_the_most_divergent_non_false_alarm_candidate_per_row():
    _, _, cand, div = batch(2)
    divergent = cand & ~np.asarray(false_alarms(cand, div))
    one = np.asarray(select_guidance_points(cand, div))
    for row in range(B):
        if divergent[row].any():
            assert np.flatnonzero(one[row]).tolist() == [int(np.argmax(np.where(divergent[row], div[row], -1)))]
        else:
            assert not one[row].any()
    np.testing.assert_array_equal(select_guidance_points(cand, div, max_per_row=None), divergent)


# --- opd_loss ----------------------------------------------------------------------


def test_opd_loss_is_the_weighted_token_mean_as_sum_and_count():
    loss, mask, cand, div = batch(3)
    w = np.asarray(suppression_weights(cand, div, weight=0.5))
    loss_nan = np.where(mask, loss, np.nan)
    total, count = jax.jit(opd_loss)(loss_nan, mask, w)
    assert float(total) == pytest.approx((w * mask * loss).sum(), rel=1e-6)
    assert float(count) == pytest.approx((w * mask).sum(), rel=1e-6)
    plain_total, plain_count = opd_loss(loss, mask)
    assert float(plain_total / plain_count) == pytest.approx(loss[mask].mean(), rel=1e-6)


def test_micro_batch_accumulation_equals_the_full_batch_in_value_and_gradient():
    rng = np.random.default_rng(4)
    s = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    mask = jnp.asarray(rng.random((B, T)) < np.linspace(0.2, 1.0, B)[:, None])  # unequal counts
    w = jnp.asarray(rng.random((B, T)), jnp.float32)

    def full(s):
        total, count = opd_loss(token_divergence(s, t, mask), mask, w)
        return total / count

    global_count = opd_loss(jnp.zeros((B, T)), mask, w)[1]

    def accumulated(s):
        parts = [opd_loss(token_divergence(s[i : i + 2], t[i : i + 2], mask[i : i + 2]), mask[i : i + 2], w[i : i + 2])[0] for i in (0, 2)]
        return sum(parts) / global_count

    def mean_of_means(s):
        parts = [opd_loss(token_divergence(s[i : i + 2], t[i : i + 2], mask[i : i + 2]), mask[i : i + 2], w[i : i + 2]) for i in (0, 2)]
        return sum(a / c for a, c in parts) / 2

    assert float(accumulated(s)) == pytest.approx(float(full(s)), rel=1e-6)
    assert abs(float(mean_of_means(s)) - float(full(s))) > 1e-3  # the bias being avoided
    np.testing.assert_allclose(jax.grad(accumulated)(s), jax.grad(full)(s), rtol=1e-5, atol=1e-7)


# --- trajectory guidance -----------------------------------------------------------


def guidance(seed, rows=3, seq=7):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(rows, seq, V)).astype(np.float32)
    t = rng.normal(size=(rows, seq, V)).astype(np.float32)
    wmask = np.zeros((rows, seq), bool)
    wmask[0, 2:6] = True
    wmask[1, 1:7] = True  # row 2 is padding (no guided point)
    targets = rng.integers(0, V, size=(rows, seq))
    return s, t, wmask, targets


def test_trajectory_loss_is_the_mean_forward_kl_over_window_tokens():
    s, t, wmask, _ = guidance(5)
    total, count = jax.jit(trajectory_guidance_loss)(s, t, wmask)
    per_token = np_forward_kl(s, t)
    assert float(count) == wmask.sum()
    assert float(total) == pytest.approx(per_token[wmask].sum(), rel=1e-5)


def test_trajectory_loss_decay_weights_the_ith_window_token_by_gamma_to_the_i():
    s, t, wmask, _ = guidance(6)
    total, count = trajectory_guidance_loss(s, t, wmask, decay=0.8)
    index = np.cumsum(wmask, -1) - 1
    weight = np.where(wmask, 0.8**index, 0.0)
    per_token = np_forward_kl(s, t)
    assert float(count) == pytest.approx(weight.sum(), rel=1e-6)
    assert float(total) == pytest.approx((weight * per_token).sum(), rel=1e-5)


def test_trajectory_weights_are_gamma_to_the_i_and_sum_to_the_loss_count():
    s, t, wmask, _ = guidance(6)
    index = np.cumsum(wmask, -1) - 1
    w = np.asarray(trajectory_weights(wmask, decay=0.8))
    np.testing.assert_allclose(w, np.where(wmask, 0.8**index, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(trajectory_weights(wmask), wmask.astype(np.float32))
    assert float(trajectory_guidance_loss(s, t, wmask, decay=0.8)[1]) == pytest.approx(w.sum(), rel=1e-6)


def test_trajectory_nll_uses_the_teacher_tokens_and_needs_them():
    s, _, wmask, targets = guidance(7)
    total, count = trajectory_guidance_loss(s, None, wmask, kind="nll", targets=targets)
    logp = np_log_softmax(s)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert float(total) == pytest.approx(nll[wmask].sum(), rel=1e-5)
    with pytest.raises(ValueError, match="needs targets"):
        trajectory_guidance_loss(s, None, wmask, kind="nll")
    with pytest.raises(ValueError, match="kind='kl'"):
        trajectory_guidance_loss(s, None, wmask, kind="kl")


def test_trajectory_gradient_flows_to_the_student_only_and_matches_finite_differences():
    """Central differences in float64 (x64: float64 inputs compute in float64) at 1e-7."""
    s, t, wmask, _ = guidance(8, rows=2, seq=4)
    f = lambda s, t: trajectory_guidance_loss(s, t, wmask)[0]
    assert not np.any(np.asarray(jax.grad(f, argnums=1)(s, t)))
    for kind in ("forward_kl", "nll"):
        with jax.enable_x64(True):
            s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
            targets = jnp.argmax(t64, axis=-1)
            g = jax.jit(lambda x: trajectory_guidance_loss(x, t64, wmask, kind=kind, targets=targets)[0])
            assert g(s64).dtype == jnp.float64
            check_grads(g, (s64,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


# --- topd_loss -----------------------------------------------------------------------


def test_topd_loss_combines_weighted_opd_and_lambda_times_trajectory_with_metrics():
    loss, mask, cand, div = batch(9)
    s, t, wmask, _ = guidance(9)
    lam = 0.7
    out, metrics = jax.jit(lambda *a: topd_loss(
        a[0], a[1], candidates=a[2], divergence=a[3],
        guidance_student_logits=a[4], guidance_teacher_logits=a[5], guidance_mask=a[6],
        lam=lam, suppression_weight=0.0,
    ))(loss, mask, cand, div, s, t, wmask)
    alarm = np.asarray(false_alarms(cand, div))
    w = np.where(alarm, 0.0, 1.0) * mask
    opd = (w * loss).sum() / w.sum()
    traj = np_forward_kl(s, t)[wmask].mean()
    assert float(out) == pytest.approx(opd + lam * traj, rel=1e-5)
    ratio = {k: float(a) / float(c) for k, (a, c) in metrics.items()}
    assert ratio["token_loss"] == pytest.approx(loss[mask].mean(), rel=1e-6)
    assert ratio["opd_loss"] == pytest.approx(opd, rel=1e-6)
    assert ratio["traj_loss"] == pytest.approx(traj, rel=1e-5)
    assert ratio["candidates_per_rollout"] == pytest.approx(cand.sum() / B)
    assert ratio["false_alarm_fraction"] == pytest.approx(alarm.sum() / cand.sum())
    assert ratio["divergence"] == pytest.approx(div[cand].mean(), rel=1e-6)
    assert ratio["guided_points_per_rollout"] == pytest.approx(2 / B)


def test_topd_loss_passes_temperature_and_beta_to_the_trajectory_term():
    loss, mask, cand, div = batch(9)
    s, t, wmask, _ = guidance(9)
    for kind in ("forward_kl", "jsd"):
        out, metrics = topd_loss(loss, mask, candidates=cand, divergence=div, guidance_student_logits=s,
                                 guidance_teacher_logits=t, guidance_mask=wmask, traj_kind=kind,
                                 traj_temperature=2.0, traj_beta=0.3)
        want = trajectory_guidance_loss(s, t, wmask, kind=kind, temperature=2.0, beta=0.3)
        assert float(metrics["traj_loss"][0]) == pytest.approx(float(want[0]), rel=1e-6)
        plain = trajectory_guidance_loss(s, t, wmask, kind=kind)
        assert abs(float(want[0]) - float(plain[0])) > 1e-3  # the options change the term


def test_topd_without_guidance_or_suppression_is_plain_opd():
    loss, mask, cand, div = batch(10)
    out, metrics = topd_loss(loss, mask, candidates=cand, divergence=div, suppress=False)
    assert float(out) == pytest.approx(loss[mask].mean(), rel=1e-6)
    assert float(metrics["traj_loss"][1]) == 0.0 and float(metrics["false_alarm_fraction"][0]) > 0


def test_topd_micro_batches_with_global_normalizers_sum_to_the_full_loss():
    loss, mask, cand, div = batch(11)
    s, t, wmask, _ = guidance(11, rows=4)
    alarm = false_alarms(cand, div)  # once, over the global batch
    kw = dict(candidates=cand, divergence=div, false_alarm=alarm,
              guidance_student_logits=s, guidance_teacher_logits=t, guidance_mask=wmask)
    full, metrics = topd_loss(loss, mask, **kw)
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        part_kw = {k: v[sl] for k, v in kw.items()}
        parts.append(topd_loss(loss[sl], mask[sl], token_normalizer=metrics["opd_loss"][1],
                               guidance_normalizer=metrics["traj_loss"][1], **part_kw)[0])
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6)


def test_topd_gradient_is_finite_and_matches_finite_differences():
    rng = np.random.default_rng(12)
    s = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    mask = jnp.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], bool)
    cand = jnp.array([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0]], bool)
    div = jnp.array([[0, 0.1, 0, 0, 0.9], [0, 0, 0.5, 0, 0]])
    gs = jnp.asarray(rng.normal(size=(1, 4, 6)), jnp.float32)
    gt = jnp.asarray(rng.normal(size=(1, 4, 6)), jnp.float32)
    gm = jnp.array([[0, 1, 1, 1]], bool)

    def f(s, gs):
        ell = token_divergence(s, t, mask)
        return topd_loss(ell, mask, candidates=cand, divergence=div, guidance_student_logits=gs,
                         guidance_teacher_logits=gt, guidance_mask=gm, traj_decay=0.9)[0]

    f = jax.jit(f)
    grads = jax.grad(f, argnums=(0, 1))(s, gs)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    check_grads(f, (s, gs), order=1, modes=("rev",), eps=1e-3, atol=2e-3, rtol=2e-3)
    with jax.enable_x64(True):  # float64 inputs compute in float64: central differences at 1e-7
        t, div, gt = jnp.asarray(t, jnp.float64), jnp.asarray(div, jnp.float64), jnp.asarray(gt, jnp.float64)
        s64, gs64 = jnp.asarray(s, jnp.float64), jnp.asarray(gs, jnp.float64)
        f64 = jax.jit(lambda s, gs: topd_loss(token_divergence(s, t, mask), mask, candidates=cand, divergence=div,
                                              guidance_student_logits=gs, guidance_teacher_logits=gt,
                                              guidance_mask=gm, traj_decay=0.9)[0])
        assert f64(s64, gs64).dtype == jnp.float64
        check_grads(f64, (s64, gs64), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


def test_losses_package_imports_nothing_else_from_topd_jax_nor_flax():
    code = (
        "import sys, topd_jax.losses; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'ott', 'optax', 'torch') "
        "or (m.startswith('topd_jax.') and not m.startswith('topd_jax.losses'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
