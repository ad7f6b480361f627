"""Issue 13 in the trainer: the tasks' labellers, the per-step label metrics of a run (checked
against a NumPy hand computation on the run's own batch), paired random numbers across arms
(review D9) and the gradient norms of the two loss terms (D11)."""

import numpy as np
import pytest

from topd_jax.config.loader import load_config
from topd_jax.config.schema import ConfigError
from topd_jax.data import labelled
from topd_jax.data.labelled import FORCED, FORK, SURFACE
from topd_jax.data.tasks import LABELLED, MATH, SYNTHETIC, run_task, task_for

TOK = labelled.LabelledTokenizer()
PROMPT = "a = 3 ; b = a + 2 ; c = b * 2 ; ? c"          # b = 5, c = 10 mod 7 = 3
COMPLETION = "b = 3 + 2 = 5 then we get c = 5 * 2 = 3 ; answer 3"


def _rows(prompt: str, completion: str, pad: int = 2):
    """One ``[1, L]`` row: ``pad`` pad columns, the prompt, the completion and eos."""
    p, c = TOK.encode(prompt), TOK.encode(completion, add_bos=False) + [TOK.eos_id]
    ids = np.array([[TOK.pad_id] * pad + p + c], np.int32)
    cmask = np.zeros(ids.shape, bool)
    cmask[0, pad + len(p):] = True
    return ids, cmask, pad + len(p)


def test_labelled_task_labels_a_multi_token_connective_and_the_synthetic_task_does_not():
    ids, cmask, start = _rows(PROMPT, COMPLETION)
    out = LABELLED.labeller([PROMPT], ids, cmask)
    words = COMPLETION.split() + ["<eos>"]
    expect = {"b": FORCED, "c": FORCED, "=": FORCED, "then": SURFACE, "we": FORCED, "get": FORCED, "+": FORCED,
              "*": FORCED, ";": FORCED, "answer": FORCED, "<eos>": FORCED}
    # operand/result values: first operand of + and * is SURFACE, the others FORK
    values = {2: SURFACE, 4: FORK, 6: FORK, 12: SURFACE, 14: FORK, 16: FORK, 19: FORK}
    want = [values.get(i, expect.get(w)) for i, w in enumerate(words)]
    assert out["labels"][0, start:].tolist() == want
    assert (out["labels"][0, :start] == labelled.NONE).all() and out["correct"].tolist() == [True]
    assert not out["ungrammatical"].any()
    # The plain task's connectives are one word: "then we" is ungrammatical at "we".
    plain = SYNTHETIC.labeller([PROMPT], ids, cmask)
    we = start + words.index("we")
    assert plain["ungrammatical"][0].tolist() == [j == we for j in range(ids.shape[1])]
    assert plain["correct"].tolist() == [False] and MATH.labeller is None


def test_the_run_task_labels_at_the_configured_modulus():
    prompt, completion = "a = 3 ; b = a + 6 ; ? b", "b = 3 + 6 = 9 ; answer 9"  # 9 mod 11
    ids, cmask, _ = _rows(prompt, completion)
    cfg = load_config(None, ["data.source=labelled", "data.synthetic.modulus=11", "student.preset=tiny",
                             "teacher.preset=tiny"])
    assert run_task(cfg).labeller([prompt], ids, cmask)["correct"].tolist() == [True]
    assert task_for("labelled").labeller([prompt], ids, cmask)["correct"].tolist() == [False]  # mod 7: 2
    assert run_task(load_config(None, ["data.source=labelled", "student.preset=tiny", "teacher.preset=tiny"])) \
        is LABELLED


def test_labelled_source_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="config key 'data.source'.*grpo.*labelled"):
        load_config(None, ["data.source=labelled", "algorithm=grpo", "student.preset=tiny"])
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=labeled", "student.preset=tiny", "teacher.preset=tiny"])
    with pytest.raises(ValueError, match="data.source must be one of"):
        task_for("labeled")


def test_labelled_source_plans_with_the_labelled_tokenizer(tmp_path):
    from tests._train_tiny import tiny_config
    from topd_jax.train.setup import RunSetupError, plan_run

    vocab = [f"{r}.vocab_size=144" for r in ("student", "teacher")]
    plan = plan_run(tiny_config(tmp_path, "data.source=labelled", *vocab))
    assert plan.text.vocab_size == TOK.vocab_size == 130 and plan.text.eos_ids == (TOK.eos_id,)
    ex = plan.train_examples[0]
    assert list(ex.ids) == TOK.encode(ex.problem) and plan.text.verify("b = 1 ; answer 4", "4")
    with pytest.raises(RunSetupError, match="student: vocab_size=128 < the tokenizer's 130"):
        plan_run(tiny_config(tmp_path, "data.source=labelled"))


# ---- the trainer: label metrics in the history, paired random numbers -------------------------
def _fake_labeller(problems, ids, completion_mask):
    """Deterministic labels from the ids (the random tiny models write no grammatical chains):
    SURFACE, FORK, RECOVERY and FORCED cycle with (id + column), so every kind is frequent."""
    ids, cmask = np.asarray(ids), np.asarray(completion_mask, bool)
    kinds = np.array([SURFACE, FORK, labelled.RECOVERY, FORCED], np.int8)
    labels = np.where(cmask, kinds[(ids + np.arange(ids.shape[1])) % 4], labelled.NONE).astype(np.int8)
    assert len(problems) == ids.shape[0]
    return {"labels": labels, "correct": ids.sum(axis=1) % 2 == 0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The step-0 ``prepare_batch`` of OPD and of TOPD (kl_window, guidance) with one key on the
    tiny pair, and the label metrics of each: ``{algo: (batch, rollouts, pairs, example)}``."""
    import jax

    from tests._train_tiny import tiny_config, tiny_pair_and_prompts
    from topd_jax.algorithms import Frozen, prepare_batch
    from topd_jax.train import labels
    from topd_jax.train.setup import TextIO

    mesh, s, t, prompts = tiny_pair_and_prompts()
    prompts = dict(prompts, problems=["p0", "p1"])
    text = TextIO(encode=None, decode=lambda ids: " ".join(map(str, ids)), verify=None, eos_ids=(2,), pad_id=0,
                  vocab_size=128)
    frozen = Frozen(t, t.lm_head_weight(), (2,), 0, text=text)
    out = {"setup": (mesh, s, t, frozen)}
    with jax.set_mesh(mesh):
        for algo in ("opd", "topd"):
            cfg = tiny_config(tmp_path_factory.mktemp(algo), f"algorithm={algo}", "topd.detector=kl_window",
                              "topd.guidance_weight=0.7", "logging.label_metrics=true")
            assert cfg.fuses_main_pass == (algo == "topd")
            batch, _, gen = prepare_batch(cfg, s, prompts, jax.random.key(3), frozen, {})
            out[algo] = (batch, gen) + labels.label_metrics(cfg, _fake_labeller, prompts, batch, s, frozen)
    return out


def test_opd_and_topd_with_one_step_key_draw_identical_rollouts(prepared):
    """Paired random numbers (review D9): the loop gives every algorithm fold_in(key(seed), step)."""
    (opd_batch, opd_gen, *_), (topd_batch, topd_gen, *_) = prepared["opd"], prepared["topd"]
    np.testing.assert_array_equal(np.asarray(opd_gen.sequences), np.asarray(topd_gen.sequences))
    np.testing.assert_array_equal(np.asarray(opd_batch.arrays["loss_mask"]),
                                  np.asarray(topd_batch.arrays["loss_mask"]))
    assert np.asarray(opd_gen.lengths).sum() > 0


def _share(num, den):
    return num.sum() / den.sum() if den.sum() else np.nan


def numpy_label_metrics(batch) -> dict[str, float]:
    """The label metrics of a TOPD ``PreparedBatch`` under ``_fake_labeller``, by hand."""
    a = {k: np.asarray(v) for k, v in batch.arrays.items()}
    ell, guided = np.asarray(batch.diagnostics["token_loss"]), np.asarray(batch.diagnostics["guided"])
    lab = _fake_labeller(["p"] * len(a["ids"]), a["ids"], a["loss_mask"])
    surf, fork = lab["labels"] == SURFACE, np.isin(lab["labels"], [FORK, labelled.RECOVERY])
    cand, mask = a["candidates"].astype(bool), a["loss_mask"].astype(bool)
    fa = a["false_alarm"].astype(bool) & cand
    pos, neg = -a["divergence"][cand & surf], -a["divergence"][cand & fork]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return {
        "label_true_surface_share": _share(cand & surf, cand), "label_fork_share": _share(cand & fork, cand),
        "label_suppressed_share": _share(fa, cand), "label_false_alarm_precision": _share(fa & surf, fa),
        "label_false_alarm_recall": _share(fa & surf, cand & surf),
        "label_fork_suppressed": _share(fa & fork, cand & fork),
        "label_loss_surface_share": (ell * (surf & mask)).sum() / (ell * mask).sum(),
        "label_guided_fork_precision": _share(guided & fork, guided),
        "label_auroc": pairs.mean() if pairs.size else np.nan, "label_rollout_accuracy": lab["correct"].mean(),
    }


def test_topd_label_metrics_equal_a_numpy_computation(prepared):
    from topd_jax.train.metrics import reduce_pairs

    batch, _, pairs, example = prepared["topd"]
    expect = numpy_label_metrics(batch)
    got = reduce_pairs(pairs)
    assert sorted(got) == sorted(expect)
    np.testing.assert_allclose([got[k] for k in expect], list(expect.values()), rtol=1e-5, err_msg=str(got))
    assert np.isfinite(list(expect.values())).sum() >= 8, expect  # the fake labels give most of them a value
    n = len(example["words"])
    assert n > 0 and all(len(example[k]) == n for k in ("labels", "token_loss", "candidate", "false_alarm", "guided"))
    assert set(example["labels"]) <= set(labelled.LABEL_NAMES) and isinstance(example["correct"], bool)


def test_opd_measures_the_surface_share_of_its_own_high_loss_candidates(prepared):
    from topd_jax.algorithms import topd
    from topd_jax.train.metrics import reduce_pairs

    got = reduce_pairs(prepared["opd"][2])
    assert sorted(got) == ["label_fork_share", "label_loss_surface_share", "label_rollout_accuracy",
                           "label_true_surface_share"]
    # Same params and rollouts as the TOPD arm: OPD's candidates are TOPD's before classification.
    t_batch = prepared["topd"][0]
    mask = np.asarray(t_batch.arrays["loss_mask"])
    cand = np.asarray(topd.candidate_slots(t_batch.diagnostics["token_loss"], mask, mode="top_c", num=2,
                                           min_separation=2, quantile=0.8, rollback=1)[0])
    lab = _fake_labeller(["p"] * 4, t_batch.arrays["ids"], mask)["labels"]
    assert 0 < cand.sum() <= 8
    assert got["label_true_surface_share"] == pytest.approx(_share(cand & (lab == SURFACE), cand), rel=1e-6)
    assert got["label_fork_share"] == pytest.approx(
        _share(cand & np.isin(lab, [FORK, labelled.RECOVERY]), cand), rel=1e-6)


def test_the_eval_key_depends_on_eval_seed_not_on_seed(tmp_path):
    import jax

    from tests._train_tiny import tiny_config
    from topd_jax.train.loop import evaluation_key

    keys = [np.asarray(jax.random.key_data(evaluation_key(tiny_config(tmp_path, *over))))
            for over in (["seed=0"], ["seed=1"], ["seed=0", "eval.seed=1"])]
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).all()


# ---- gradient norms by term (review D11) -------------------------------------------------------
def test_grad_norms_by_term_equal_the_norms_of_each_terms_own_gradient(prepared, tmp_path):
    """TOPD (kl_window, guidance, λ = 0.7): the step's ``grad_norm_opd`` / ``grad_norm_traj`` equal
    the norms of ∇L_OPD_w and ∇(λ·L_traj) computed here with ``jax.grad`` of each term alone, on
    the fused path (PrecomputedGrad) and on the plain one (one extra backward pass). Both steps
    take the fixture's batch (the plain one with the teacher's hidden states instead of ℓ_t)."""
    import functools

    import jax
    import optax
    from flax import nnx

    from tests._train_tiny import tiny_config
    from topd_jax.algorithms import LossSpec, build_opd_term, make_loss_fn
    from topd_jax.algorithms.objective import _guidance_logits, add_normalizers, topd_objective
    from topd_jax.algorithms.prepared import PreparedBatch
    from topd_jax.algorithms.scoring import forward_hidden, hidden_states, token_divergences
    from topd_jax.train.optim import lr_schedule, make_optimizer
    from topd_jax.train.state import create_train_state
    from topd_jax.train.step import TrainStep

    mesh, s, t, frozen = prepared["setup"]
    fused_batch = prepared["topd"][0]
    arrays = {k: v for k, v in fused_batch.arrays.items() if k != "token_loss"}
    arrays["teacher_hidden"] = forward_hidden(t, arrays["ids"], arrays["seq_mask"])
    got = {}
    for fused, batch in ((True, fused_batch), (False, PreparedBatch(arrays))):
        cfg = tiny_config(tmp_path, "algorithm=topd", "topd.detector=kl_window", "topd.guidance_weight=0.7",
                          "logging.grad_norms_by_term=true", f"topd.fused_main_pass={fused}")
        tx = make_optimizer(cfg.optim, 10)
        graphdef, state, shardings = create_train_state(s, tx, mesh, seed=0)
        spec = LossSpec.from_config(cfg, 16)
        step = TrainStep(make_loss_fn(spec, graphdef), tx, lr_schedule(cfg.optim, 10), shardings, mesh,
                         normalize=functools.partial(add_normalizers, spec), grad_norms_by_term=True,
                         opd_term_fn=build_opd_term(cfg, graphdef, 16))
        params = jax.device_get(state.params)
        with jax.set_mesh(mesh):
            _, out = step(state, batch, frozen.teacher_head)
        got[fused] = (float(out["grad_norm_opd"]), float(out["grad_norm_traj"]), float(out["grad_norm"]))
    nb = add_normalizers(spec, arrays)  # the reference: each term differentiated on its own

    def opd_term(p):
        model = nnx.merge(graphdef, p)
        ell = token_divergences(hidden_states(model, nb["ids"], nb["seq_mask"]), model.lm_head_weight(),
                                nb["teacher_hidden"], frozen.teacher_head, nb["loss_mask"],
                                kind="reverse_kl", beta=0.5, temperature=1.0, chunk=None)
        return topd_objective(spec, ell, nb, None, normalizers=None)[0]

    def traj_term(p):  # ℓ_t held constant: only λ·L_traj depends on the params
        model = nnx.merge(graphdef, p)
        logits = _guidance_logits(spec, model, model.lm_head_weight(), nb, frozen.teacher_head)
        return topd_objective(spec, jax.numpy.zeros(nb["loss_mask"].shape), nb, logits, normalizers=None)[0]

    norms = jax.jit(lambda p: (optax.tree.norm(jax.grad(opd_term)(p)), optax.tree.norm(jax.grad(traj_term)(p))))
    ref = tuple(float(x) for x in norms(params))
    assert ref[1] > 0 and ref[0] > 0
    for fused, (g_opd, g_traj, g_all) in got.items():
        np.testing.assert_allclose([g_opd, g_traj], ref, rtol=2e-4, err_msg=f"fused={fused}")
        assert g_all <= g_opd + g_traj + 1e-6  # the triangle inequality: the step's gradient is their sum


def test_without_an_l_traj_term_grad_norm_opd_is_the_gradient_norm_and_traj_is_zero():
    import jax.numpy as jnp

    from topd_jax.train.step import term_grad_norms

    grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}  # norm 13
    out = term_grad_norms(None, None, None, grads, None, opd_term_fn=None, micro_batches=1)
    assert float(out["grad_norm_opd"]) == pytest.approx(13.0) and float(out["grad_norm_traj"]) == 0.0
    with pytest.raises(ConfigError, match="logging.grad_norms_by_term"):
        load_config(None, ["algorithm=warmup", "logging.grad_norms_by_term=true", "student.preset=tiny",
                           "teacher.preset=tiny", "data.source=synthetic"])


def test_the_cli_prepares_the_labelled_models_for_the_labelled_source(monkeypatch):
    from topd_jax.demos import demo, labelled_demo
    from topd_jax.train.__main__ import prepare_embedded_models

    calls = []
    monkeypatch.setattr(labelled_demo, "prepare_labelled_models",
                        lambda cfg, *, progress, log: calls.append(("labelled", progress)) or ("s", "t"))
    monkeypatch.setattr(demo, "prepare_demo_models", lambda cfg: calls.append(("demo",)) or ("ds", "dt"))
    models = ["student.preset=tiny", "teacher.preset=tiny"]
    assert prepare_embedded_models(load_config(None, ["data.source=labelled", "logging.progress_bar=false",
                                                      *models])) == ("s", "t")
    assert prepare_embedded_models(load_config(None, ["data.source=synthetic", *models])) == ("ds", "dt")
    given = load_config(None, ["data.source=labelled", "student.path=/m/s", "teacher.path=/m/t"])
    assert prepare_embedded_models(given) == ("/m/s", "/m/t")
    assert calls == [("labelled", False), ("demo",)]
