"""Algorithm wiring: token alignment, candidate slots, guidance rows, and a few updates of
every algorithm on a fixed prepared batch (loss finite and decreasing)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests._train_tiny import SMALL, tiny_config, tiny_pair_and_prompts
from topd_jax.algorithms import Frozen, LossSpec, build_opd_term, make_loss_fn, prepare_batch
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
    residuals; one step must equal the step with a separate no-gradient ℓ_t pass. Both log the
    gradient norms by term (``logging.grad_norms_by_term``, D11): the fused step's are the norms
    of the separately computed ∇L_OPD_w (the PrecomputedGrad) and ∇(λ·L_traj) (the rest); the
    plain step's come from one extra backward of L_OPD_w alone and the difference."""
    mesh, s, t, prompts = setup
    results = []
    for fused in (False, True):
        cfg = tiny_config(tmp_path, *extra, "optim.lr=1e-2", f"topd.fused_main_pass={fused}",
                          "logging.grad_norms_by_term=true")
        assert cfg.fuses_main_pass == fused
        tx = make_optimizer(cfg.optim, 10)
        graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
        frozen = Frozen(t, t.lm_head_weight(), (2,), 0)
        spec = LossSpec.from_config(cfg, 16)
        step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(cfg.optim, 10), shardings, mesh,
                         normalize=functools.partial(add_normalizers, spec), grad_norms_by_term=True,
                         opd_term_fn=build_opd_term(cfg, graphdef, 16))
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
    norms = [[float(o[k]) for k in ("grad_norm_opd", "grad_norm_traj", "grad_norm")] for o in (o1, o0)]
    np.testing.assert_allclose(norms[1], norms[0], rtol=2e-4)
    g_opd, g_traj, g_all = norms[0]
    assert g_opd > 0 and g_all <= g_opd + g_traj + 1e-6  # the step's gradient is their sum
    if "algorithm=topd" in extra:
        assert g_traj > 0.01 * g_opd
    else:  # OPD + suppression: no L_traj, the whole gradient is L_OPD_w's
        assert g_traj == 0.0 and g_opd == pytest.approx(g_all, rel=1e-6)


# ---- issue 13 on the same tiny pair: paired rollouts (D9) and the per-step label metrics --------
@pytest.fixture(scope="module")
def labelled_steps(setup, tmp_path_factory):
    """The step-0 ``prepare_batch`` of OPD and of TOPD (kl_window, guidance) with one key, and
    ``train.labels.label_metrics`` of each under ``_fake_labeller``: ``{algo: (batch, rollouts,
    pairs, example)}``."""
    from tests.test_label_metrics import _fake_labeller
    from topd_jax.train import labels
    from topd_jax.train.setup import TextIO

    mesh, s, t, prompts = setup
    prompts = dict(prompts, problems=["p0", "p1"])
    text = TextIO(encode=None, decode=lambda ids: " ".join(map(str, ids)), verify=None, eos_ids=(2,), pad_id=0,
                  vocab_size=128)
    frozen = Frozen(t, t.lm_head_weight(), (2,), 0, text=text)
    out = {}
    for algo in ("opd", "topd"):
        # The student placed and the plain ℓ_t pass, as in the VARIANTS above: their compiled
        # programs serve here.
        cfg = tiny_config(tmp_path_factory.mktemp(algo), f"algorithm={algo}", "topd.detector=kl_window",
                          "topd.fused_main_pass=false", "logging.label_metrics=true")
        graphdef, state, _ = create_train_state(s, make_optimizer(cfg.optim, 10), mesh, seed=0)
        with jax.set_mesh(mesh):
            model = nnx.merge(graphdef, state.params)
            batch, _, gen = prepare_batch(cfg, model, prompts, jax.random.key(3), frozen, {})
            out[algo] = (batch, gen) + labels.label_metrics(cfg, _fake_labeller, prompts, batch, model, frozen)
    return out


def test_opd_and_topd_with_one_step_key_draw_identical_rollouts(labelled_steps):
    """Paired random numbers (review D9): the loop gives every algorithm fold_in(key(seed), step)."""
    (opd_batch, opd_gen, *_), (topd_batch, topd_gen, *_) = labelled_steps["opd"], labelled_steps["topd"]
    np.testing.assert_array_equal(np.asarray(opd_gen.sequences), np.asarray(topd_gen.sequences))
    np.testing.assert_array_equal(np.asarray(opd_batch.arrays["loss_mask"]),
                                  np.asarray(topd_batch.arrays["loss_mask"]))
    assert np.asarray(opd_gen.lengths).sum() > 0


def test_topd_label_metrics_equal_a_numpy_computation(labelled_steps):
    from tests.test_label_metrics import numpy_label_pairs
    from topd_jax.data import labelled

    batch, _, pairs, example = labelled_steps["topd"]
    expect = numpy_label_pairs(batch)  # (sum, count) each
    assert sorted(pairs) == sorted(expect)
    np.testing.assert_allclose([pairs[k] for k in expect], list(expect.values()), rtol=1e-5, err_msg=str(pairs))
    assert sum(c > 0 for _, c in expect.values()) >= 9, expect  # the fake labels give most of them a value
    n = len(example["words"])
    assert n > 0 and all(len(example[k]) == n for k in ("labels", "token_loss", "candidate", "false_alarm", "guided"))
    assert set(example["labels"]) <= set(labelled.LABEL_NAMES) and isinstance(example["correct"], bool)


def test_opd_label_metrics_measure_the_surface_share_of_its_own_high_loss_candidates(labelled_steps):
    from tests.test_label_metrics import _fake_labeller, _share
    from topd_jax.data.labelled import FORK, RECOVERY, SURFACE
    from topd_jax.train.metrics import reduce_pairs

    got = reduce_pairs(labelled_steps["opd"][2])
    assert sorted(got) == ["label_fork_share", "label_loss_surface_share", "label_rollout_accuracy",
                           "label_true_surface_share"]
    # Same params and rollouts as the TOPD arm: OPD's candidates are TOPD's before classification.
    t_batch = labelled_steps["topd"][0]
    mask = np.asarray(t_batch.arrays["loss_mask"])
    cand = np.asarray(candidate_slots(t_batch.diagnostics["token_loss"], mask, mode="top_c", num=2,
                                      min_separation=2, quantile=0.8, rollback=1)[0])
    lab = _fake_labeller(["p"] * 4, t_batch.arrays["ids"], mask)["labels"]
    assert 0 < cand.sum() <= 8
    assert got["label_true_surface_share"] == pytest.approx(_share(cand & (lab == SURFACE), cand), rel=1e-6)
    assert got["label_fork_share"] == pytest.approx(_share(cand & np.isin(lab, [FORK, RECOVERY]), cand), rel=1e-6)
