"""One source of truth: a trainer step's loss and gradient equal the loss library's.

For every objective the trainer optimises, the value and the gradient of one ``TrainStep``
(the loop's objective, micro-batches and TOPD's fused main pass included) are compared with
a direct computation on the same batch from the model's logits and ``topd_jax.losses`` alone:
``token_divergence`` + ``opd_loss`` (OPD), + ``suppression_weights`` (OPD + suppression),
``topd_loss`` (TOPD, with guidance), ``clipped_surrogate`` + ``kl_to_reference`` +
``aggregate`` (GRPO, TAPO's two terms). The optimizer is replaced by one that records the
gradient it is given, so the step's gradient is read exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests._train_tiny import tiny_config, tiny_pair_and_prompts
from topd_jax.algorithms import Frozen, build_objective, prepare_batch
from topd_jax.algorithms.rl_objective import RlSpec, add_rl_normalizers, make_rl_loss_fn
from topd_jax.losses import (
    aggregate,
    clipped_surrogate,
    false_alarms,
    kl_to_reference,
    opd_loss,
    safe_log_softmax,
    suppression_weights,
    token_divergence,
    topd_loss,
)
from topd_jax.train.state import create_train_state
from topd_jax.train.step import TrainStep



def gradient_recorder() -> optax.GradientTransformation:
    """An "optimizer" that keeps the gradient it receives (``opt_state["grads"]``) and does
    not move the params."""
    return optax.GradientTransformation(
        lambda params: {"grads": jax.tree.map(jnp.zeros_like, params)},
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), {"grads": grads}))


def token_logits(model, ids, seq_mask):
    """``[R, L, V]`` float32, token-indexed: entry t holds the logits that predict ``ids[:, t]``."""
    logits = model(ids, attention_mask=seq_mask)
    return jnp.pad(logits[:, :-1], ((0, 0), (1, 0), (0, 0)))


def assert_same_step(out, state, want_loss, want_grads):
    assert float(out["skipped"]) == 0
    np.testing.assert_allclose(float(out["loss"]), float(want_loss), rtol=1e-5)
    got = jax.tree.leaves(jax.device_get(state.opt_state["grads"]))
    want = jax.tree.leaves(jax.device_get(want_grads))
    assert len(got) == len(want)
    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def models():
    return tiny_pair_and_prompts()


DISTILLATION = {
    "opd": ([], False),
    # fused main pass (the default with one micro-batch): ℓ_t and its gradient come from prepare
    "opd_suppression": (["topd.suppression=false_alarms", "topd.detector=kl_window",
                         "topd.suppression_weight=0.25"], True),
    "topd": (["algorithm=topd", "topd.detector=kl_window", "topd.guidance_target=student_positions",
              "topd.guidance_decay=0.9", "topd.guidance_weight=0.5", "loss.kd_temperature=2.0"], True),
    # the separate ℓ_t pass, two micro-batches, NLL guidance on the teacher's tokens
    "topd_micro_batches": (["algorithm=topd", "topd.detector=kl_window", "optim.micro_batches=2",
                            "topd.guidance_target=teacher_tokens"], False),
}


@pytest.mark.parametrize("name", list(DISTILLATION))
def test_distillation_step_equals_the_library_loss_and_gradient(models, tmp_path, name):
    mesh, s, t, prompts = models
    overrides, fused = DISTILLATION[name]
    cfg = tiny_config(tmp_path, *overrides)
    assert cfg.fuses_main_pass == fused
    tx = gradient_recorder()
    graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
    params = jax.device_get(state.params)
    frozen = Frozen(t, t.lm_head_weight(), (2,), 0)
    with jax.set_mesh(mesh):
        batch, _, _ = prepare_batch(cfg, nnx.merge(graphdef, state.params), prompts, jax.random.key(3), frozen, {})
        assert (batch.precomputed is not None) == fused
        b = {k: jnp.asarray(v) for k, v in batch.arrays.items()}
        length = b["ids"].shape[1]  # L: these prompts are 6 wide, not data.max_prompt_len
        loss_fn, normalize = build_objective(cfg, graphdef, length)
        step = TrainStep(loss_fn, tx, lambda _: 0.0, shardings, mesh, micro_batches=cfg.optim.micro_batches,
                         normalize=normalize)
        state, out = step(state, batch, frozen.teacher_head)
    mask, top = b["loss_mask"], cfg.topd
    if cfg.uses_detector:  # the classification the batch carries is the library's, over the batch
        regime = "high_divergence" if cfg.suppression == "high_divergence" else "low_divergence"
        np.testing.assert_array_equal(
            false_alarms(b["candidates"], b["divergence"], quantile=top.false_alarm_quantile, regime=regime),
            b["false_alarm"])
        assert 0 < int(b["false_alarm"].sum()) < int(b["candidates"].sum())
    temperature = cfg.loss.kd_temperature

    def direct(params):
        student = nnx.merge(graphdef, params)
        t_logits = jax.lax.stop_gradient(token_logits(t, b["ids"], b["seq_mask"]))
        ell = token_divergence(token_logits(student, b["ids"], b["seq_mask"]), t_logits, mask,
                               temperature=temperature)
        if not cfg.uses_detector:
            total, count = opd_loss(ell, mask)
            return total / count
        if not cfg.uses_guidance:
            w = suppression_weights(b["candidates"], b["divergence"], weight=top.suppression_weight,
                                    false_alarm=b["false_alarm"])
            total, count = opd_loss(ell, mask, w)
            return total / count
        k, cols = top.window, slice(length - 1, length - 1 + top.window)  # positions predicting a_0 .. a_{K-1}
        g_student = student(b["g_ids"], attention_mask=b["g_mask"])[:, cols]
        g_teacher = t(b["g_ids"], attention_mask=b["g_mask"])[:, cols]
        assert g_student.shape[1] == k
        loss, _ = topd_loss(ell, mask, candidates=b["candidates"], divergence=b["divergence"],
                            false_alarm=b["false_alarm"], guidance_student_logits=g_student,
                            guidance_teacher_logits=g_teacher, guidance_mask=b["g_window"],
                            guidance_targets=b["g_targets"], lam=top.guidance_weight,
                            suppression_weight=top.suppression_weight,
                            traj_kind="nll" if top.guidance_target == "teacher_tokens" else "forward_kl",
                            traj_decay=None if top.guidance_decay == 1.0 else top.guidance_decay,
                            traj_temperature=temperature)
        return loss

    with jax.set_mesh(mesh):
        want_loss, want_grads = jax.jit(jax.value_and_grad(direct))(params)
    assert_same_step(out, state, want_loss, want_grads)
    if cfg.uses_guidance:
        assert float(out["traj_loss"][1]) > 0  # the guidance term is in the comparison


def _rl_batch(model, rng, *, terms):
    """Rows as grpo/tapo.prepare make them, with old log-probs off the policy (ratios != 1,
    some clipped), OTS-like weights and uneven (one empty) completions."""
    r, length = len(terms), 10
    ids = rng.integers(0, 128, (r, length)).astype(np.int32)
    seq_mask = np.ones((r, length), bool)
    seq_mask[::3, 0] = False  # some left padding
    lengths = rng.integers(1, 6, r)
    lengths[1] = 0
    loss_mask = (np.arange(length)[None] >= 4) & (np.arange(length)[None] < 4 + lengths[:, None])
    logp = np.asarray(policy_logp(model, jnp.asarray(ids), jnp.asarray(seq_mask), jnp.asarray(loss_mask)))
    return {"ids": ids, "seq_mask": seq_mask, "loss_mask": loss_mask,
            "old_logp": np.where(loss_mask, logp + rng.normal(0, 0.3, (r, length)), 0).astype(np.float32),
            "ref_logp": np.where(loss_mask, logp + rng.normal(0, 0.3, (r, length)), 0).astype(np.float32),
            "advantages": rng.normal(size=r).astype(np.float32),
            "weights": np.where(loss_mask, rng.uniform(0.01, 2.0, (r, length)), 0).astype(np.float32),
            "term": np.asarray(terms, np.int32)}


def policy_logp(model, ids, seq_mask, loss_mask):
    """log π(y_t) ``[R, L]`` from the logits and ``losses.safe_log_softmax``."""
    logp = safe_log_softmax(token_logits(model, ids, seq_mask))
    return jnp.where(loss_mask, jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0], 0.0)


RL = {
    "grpo": (RlSpec(aggregation="token_mean", ref_weight=0.0), [0] * 8),
    # TAPO: G_orig and G_ref (λ = 0.5), a padding row, clip-higher, a k3 KL term, sequence means,
    # two micro-batches
    "tapo": (RlSpec(clip_high=0.28, aggregation="sequence_mean", kl_coef=0.05, kl_estimator="k3",
                    ref_weight=0.5, micro_batches=2), [0, 0, 1, 0, 1, 0, 1, -1]),
}


@pytest.mark.parametrize("name", list(RL))
def test_rl_step_equals_the_library_loss_and_gradient(models, name):
    mesh, s, _, _ = models
    spec, terms = RL[name]
    tx = gradient_recorder()
    graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
    params = jax.device_get(state.params)
    b = {k: jnp.asarray(v) for k, v in _rl_batch(s, np.random.default_rng(1), terms=terms).items()}
    step = TrainStep(make_rl_loss_fn(spec, graphdef), tx, lambda _: 0.0, shardings, mesh,
                     micro_batches=spec.micro_batches, normalize=functools.partial(add_rl_normalizers, spec))
    with jax.set_mesh(mesh):
        state, out = step(state, b, jnp.zeros((1, 1), jnp.float32))
    mask = b["loss_mask"]

    def direct(params):
        logp = policy_logp(nnx.merge(graphdef, params), b["ids"], b["seq_mask"], mask)
        per_token, clipped = clipped_surrogate(logp, b["old_logp"], b["advantages"], mask,
                                               clip_low=spec.clip_low, clip_high=spec.clip_high,
                                               weights=b["weights"])
        if spec.kl_coef > 0:
            per_token = per_token + spec.kl_coef * kl_to_reference(logp, b["ref_logp"], mask,
                                                                   estimator=spec.kl_estimator)
        loss = 0.0
        for k, weight in enumerate((1.0, spec.ref_weight)):
            if weight == 0:  # GRPO: no G_ref rows (0 / 0)
                continue
            total, count = aggregate(per_token, mask & (b["term"] == k)[:, None], spec.aggregation)
            loss = loss + weight * total / count
        return loss, jnp.sum(clipped)

    with jax.set_mesh(mesh):
        (want_loss, clipped), want_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
    assert int(clipped) > 0  # the clipped branch is part of the comparison
    assert_same_step(out, state, want_loss, want_grads)
