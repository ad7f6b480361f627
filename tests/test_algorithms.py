"""Algorithm wiring: token alignment, candidate slots, guidance rows, and a few updates of
every algorithm on a fixed prepared batch (loss finite and decreasing)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests._train_tiny import SMALL, tiny_config, tiny_pair_and_prompts
from topd_jax.algorithms import Frozen, LossSpec, make_loss_fn, prepare_batch
from topd_jax.algorithms.objective import add_normalizers
from topd_jax.algorithms.scoring import forward_hidden, token_divergences, token_logprobs
from topd_jax.algorithms.topd import candidate_slots, student_suffix_rows, suffix_windows
from topd_jax.models import ModelConfig, init_model
from topd_jax.train.optim import lr_schedule, make_optimizer
from topd_jax.train.state import create_train_state
from topd_jax.train.step import TrainStep



def _models():
    s = init_model(ModelConfig(vocab_size=40, hidden_size=16, num_layers=1, **SMALL), seed=0)
    t = init_model(ModelConfig(vocab_size=40, hidden_size=24, num_layers=2, **SMALL), seed=1)
    return s, t


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_t_is_scored_from_the_logits_at_position_t_minus_1():
    s, t = _models()
    ids = np.random.default_rng(0).integers(0, 40, (2, 9)).astype(np.int32)
    seq_mask = np.ones((2, 9), bool)
    loss_mask = np.zeros((2, 9), bool)
    loss_mask[:, 4:] = True  # completion tokens 4..8
    hid = lambda m: forward_hidden(m, ids, seq_mask)  # [2, 9, d] position-indexed
    got = token_divergences(hid(s), s.lm_head_weight(), hid(t), t.lm_head_weight(), jnp.asarray(loss_mask),
                            kind="reverse_kl", beta=0.5, temperature=1.0, chunk=None)
    got_chunked = token_divergences(hid(s), s.lm_head_weight(), hid(t), t.lm_head_weight(),
                                    jnp.asarray(loss_mask), kind="reverse_kl", beta=0.5, temperature=1.0, chunk=3)
    ls = np.asarray(hid(s)) @ np.asarray(s.lm_head_weight())  # [2, 9, V] logits per position
    lt = np.asarray(hid(t)) @ np.asarray(t.lm_head_weight())
    want = np.zeros((2, 9))
    for b in range(2):
        for tok in range(4, 9):  # KL(p_s || p_T) of the next-token distribution given ids[:tok]
            ps, pt = _np_log_softmax(ls[b, tok - 1]), _np_log_softmax(lt[b, tok - 1])
            want[b, tok] = (np.exp(ps) * (ps - pt)).sum()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_chunked, want, atol=1e-5)
    lp = token_logprobs(hid(s), s.lm_head_weight(), jnp.asarray(ids), jnp.asarray(loss_mask))
    lp_chunked = token_logprobs(hid(s), s.lm_head_weight(), jnp.asarray(ids), jnp.asarray(loss_mask), chunk=4)
    want_lp = np.where(loss_mask, 0.0, 0.0)
    for b in range(2):
        for tok in range(4, 9):
            want_lp[b, tok] = _np_log_softmax(ls[b, tok - 1])[ids[b, tok]]
    np.testing.assert_allclose(lp, want_lp, atol=1e-5)
    np.testing.assert_allclose(lp_chunked, want_lp, atol=1e-5)


def test_candidate_slots_are_highest_loss_first_with_masked_padding_slots():
    loss = jnp.array([[0, 0, 0, 0.5, 0.1, 0.9, 0.2, 0.0], [0, 0, 0, 0.3, 0, 0, 0, 0]], jnp.float32)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0, 0]], bool)
    cand, pos, valid, branch_at = candidate_slots(loss, mask, mode="top_c", num=2, min_separation=2,
                                                  quantile=0.8, rollback=2)
    np.testing.assert_array_equal(pos, [[5, 3], [3, 3]])
    np.testing.assert_array_equal(valid, [[True, True], [True, False]])
    np.testing.assert_array_equal(branch_at, [[4, 3], [3, 3]])  # t - rollback + 1, never in the prompt
    assert cand.sum() == 3


def test_student_suffix_rows_put_the_prefix_before_t_then_the_next_k_tokens():
    ids = jnp.array([[0, 7, 8, 9, 10, 11, 12]], jnp.int32)
    seq_mask = jnp.array([[0, 1, 1, 1, 1, 1, 1]], bool)
    loss_mask = jnp.array([[0, 0, 0, 1, 1, 1, 1]], bool)
    rows = {"ids": ids, "seq_mask": seq_mask, "loss_mask": loss_mask}
    g = student_suffix_rows(rows, jnp.array([[4]]), 3, pad_id=0)
    # c_t = columns < 4 left-aligned in the L = 7 prefix columns, then y_4 .. y_6
    np.testing.assert_array_equal(g["g_ids"], [[0, 0, 0, 0, 7, 8, 9, 10, 11, 12]])
    np.testing.assert_array_equal(g["g_mask"][0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(g["g_targets"], [[10, 11, 12]])
    tok, m = suffix_windows(ids, loss_mask, jnp.array([[5]]), 3)
    np.testing.assert_array_equal(tok, [[11, 12, 12]])
    np.testing.assert_array_equal(m, [[True, True, False]])  # past the end of the row


VARIANTS = {
    "opd": [],
    # OPD + suppression, with the sampled-token estimator (ℓ_t for the detector is full-vocab)
    "opd_sampled_token_suppression": ["loss.estimator=sampled_token", "topd.suppression=false_alarms",
                                      "topd.detector=kl_window"],
    "topd_ot": ["algorithm=topd"],
    "topd_kl_window": ["algorithm=topd", "topd.detector=kl_window", "topd.guidance_decay=0.9"],
    "topd_margin_w1": ["algorithm=topd", "topd.detector=margin_w1", "topd.guidance_target=teacher_tokens"],
    "topd_quantile_suffix": ["algorithm=topd", "topd.reuse_student_suffix=true", "topd.candidate_mode=quantile",
                             "topd.guidance_target=student_positions", "topd.max_guided_points=none"],
    # the paper's ablation: high-divergence suppression, no guidance (guidance + it: config error)
    "opd_high_divergence": ["topd.suppression=high_divergence", "topd.detector=kl_window"],
    "warmup": ["algorithm=warmup"],
}


@pytest.fixture(scope="module")
def setup():
    return tiny_pair_and_prompts()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_updates_on_a_fixed_batch_decrease_the_loss(setup, tmp_path, name):
    mesh, s, t, prompts = setup
    # Repeated updates on one prepared batch: TOPD's fused OPD term would carry the first
    # params' gradient (it belongs to the params it was prepared with), so use the plain pass.
    cfg = tiny_config(tmp_path, *VARIANTS[name], "optim.lr=1e-2", "optim.clip_norm=none",
                      "topd.fused_main_pass=false")
    tx = make_optimizer(cfg.optim, 10)
    graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
    frozen = Frozen(t, t.lm_head_weight(), (2,), 0)
    seq_len = 6 + 10
    spec = LossSpec.from_config(cfg, seq_len)
    step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(cfg.optim, 10), shardings, mesh,
                     normalize=functools.partial(add_normalizers, spec))
    with jax.set_mesh(mesh):
        prepared, metrics, gen = prepare_batch(cfg, nnx.merge(graphdef, state.params), prompts,
                                               jax.random.key(3), frozen, {})
        assert prepared.precomputed is None
        batch = prepared.arrays
        losses = []
        for _ in range(4):
            state, out = step(state, batch, frozen.teacher_head)
            losses.append(float(out["loss"]))
    assert np.all(np.isfinite(losses)), losses
    if cfg.loss.estimator == "sampled_token":  # a policy-gradient surrogate: no monotone value
        assert np.isfinite(float(out["token_kl"][0])) and float(out["token_kl"][1]) > 0
        assert "teacher_hidden" not in batch and "teacher_logp" in batch
    else:
        assert losses[-1] < losses[0], losses
    if spec.guidance:
        assert "g_ids" in batch and batch["g_ids"].shape[1] == seq_len + cfg.topd.window
        assert float(out["traj_loss"][1]) > 0  # some guided continuation tokens
    if cfg.uses_detector:
        assert metrics["candidates_per_rollout"][0] > 0
        assert "weights" not in batch  # topd_loss weighs the tokens from the classification
        assert not np.any(np.asarray(batch["false_alarm"]) & ~np.asarray(batch["candidates"]))
        if cfg.suppression != "none":
            assert float(jnp.sum(batch["false_alarm"])) == metrics["suppressed_fraction"][0]


@pytest.mark.parametrize("extra", [["algorithm=topd"], ["topd.suppression=false_alarms"]],
                         ids=["topd", "opd_suppression"])
def test_fused_main_pass_step_equals_the_separate_detector_pass(setup, tmp_path, extra):
    """``topd.fused_main_pass``: ℓ_t from the OPD term's own forward, its gradient from the kept
    residuals; one step must equal the step with a separate no-gradient ℓ_t pass."""
    mesh, s, t, prompts = setup
    results = []
    for fused in (False, True):
        cfg = tiny_config(tmp_path, *extra, "optim.lr=1e-2", f"topd.fused_main_pass={fused}")
        assert cfg.fuses_main_pass == fused
        tx = make_optimizer(cfg.optim, 10)
        graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
        frozen = Frozen(t, t.lm_head_weight(), (2,), 0)
        spec = LossSpec.from_config(cfg, 16)
        step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(cfg.optim, 10), shardings, mesh,
                         normalize=functools.partial(add_normalizers, spec))
        with jax.set_mesh(mesh):
            batch, metrics, _ = prepare_batch(cfg, nnx.merge(graphdef, state.params), prompts,
                                              jax.random.key(3), frozen, {})
            assert (batch.precomputed is not None) == fused
            state, out = step(state, batch, frozen.teacher_head)
        results.append((batch.arrays, metrics, out, jax.device_get(state.params)))
    (b0, m0, o0, p0), (b1, m1, o1, p1) = results
    for key in ("candidates", "false_alarm"):  # same detector
        np.testing.assert_array_equal(np.asarray(b0[key]), np.asarray(b1[key]))
    assert "teacher_hidden" not in b1 and "token_loss" in b1  # the fused step reads ℓ_t
    np.testing.assert_allclose(float(o1["loss"]), float(o0["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(o1["grad_norm"]), float(o0["grad_norm"]), rtol=1e-4)
    # Adam's first update is ~lr * sign(g): float-rounding differences of near-zero gradient
    # entries move a few parameters by up to ~1e-6 (lr = 1e-2), hence the absolute tolerance.
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for key in ("token_kl", "opd_loss"):
        np.testing.assert_allclose(float(o1[key][0]) / float(o1[key][1]), float(o0[key][0]) / float(o0[key][1]),
                                   rtol=1e-5)
