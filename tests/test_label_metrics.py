"""Issue 13 in the trainer: the tasks' labellers, the labelled source's config and plan, the
evaluation key (review D9) and the gradient norms of a loss without L_traj (D11).

The tests that need prepared batches share the compiled tiny pair of tests/test_algorithms.py
(paired step-0 rollouts, the label metrics against ``numpy_label_metrics``, OPD's surface share;
the term gradient norms in its fused-vs-plain step test) and the TOPD run of
tests/test_train_loop.py (the history row and metrics.jsonl); their helpers live here."""

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


# ---- helpers of the label-metric tests in test_algorithms.py and test_train_loop.py ------------
def _fake_labeller(problems, ids, completion_mask):
    """Deterministic labels from the ids (the random tiny models write no grammatical chains):
    SURFACE, FORK, RECOVERY and FORCED cycle with (id + column), so every kind is frequent."""
    ids, cmask = np.asarray(ids), np.asarray(completion_mask, bool)
    kinds = np.array([SURFACE, FORK, labelled.RECOVERY, FORCED], np.int8)
    labels = np.where(cmask, kinds[(ids + np.arange(ids.shape[1])) % 4], labelled.NONE).astype(np.int8)
    assert len(problems) == ids.shape[0]
    return {"labels": labels, "correct": ids.sum(axis=1) % 2 == 0}


def _share(num, den):
    return num.sum() / den.sum() if den.sum() else np.nan


def numpy_label_pairs(batch) -> dict[str, tuple[float, float]]:
    """The label metrics of a TOPD ``PreparedBatch`` under ``_fake_labeller`` as (sum, count), by hand."""
    a = {k: np.asarray(v) for k, v in batch.arrays.items()}
    ell, guided = np.asarray(batch.diagnostics["token_loss"]), np.asarray(batch.diagnostics["guided"])
    lab = _fake_labeller(["p"] * len(a["ids"]), a["ids"], a["loss_mask"])
    surf, fork = lab["labels"] == SURFACE, np.isin(lab["labels"], [FORK, labelled.RECOVERY])
    cand, mask = a["candidates"].astype(bool), a["loss_mask"].astype(bool)
    fa = a["false_alarm"].astype(bool) & cand
    pos, neg = -a["divergence"][cand & surf], -a["divergence"][cand & fork]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    n = lambda x, y: (float(x.sum()), float(y.sum()))  # noqa: E731
    return {
        "label_true_surface_share": n(cand & surf, cand), "label_fork_share": n(cand & fork, cand),
        "label_suppressed_share": n(fa, cand), "label_false_alarm_precision": n(fa & surf, fa),
        "label_false_alarm_recall": n(fa & surf, cand & surf), "label_fork_suppressed": n(fa & fork, cand & fork),
        "label_loss_surface_share": (float((ell * (surf & mask)).sum()), float((ell * mask).sum())),
        "label_guided_fork_precision": n(guided & fork, guided),
        "label_auroc": (float(pairs.mean()), 1.0) if pairs.size else (0.0, 0.0),
        "label_rollout_accuracy": n(lab["correct"], np.ones_like(lab["correct"])),
    }


def numpy_label_metrics(batch) -> dict[str, float]:
    """``numpy_label_pairs`` reduced: sum / count (NaN for count 0)."""
    return {k: s / c if c else np.nan for k, (s, c) in numpy_label_pairs(batch).items()}


def test_the_eval_key_depends_on_eval_seed_not_on_seed(tmp_path):
    import jax

    from tests._train_tiny import tiny_config
    from topd_jax.train.loop import evaluation_key

    keys = [np.asarray(jax.random.key_data(evaluation_key(tiny_config(tmp_path, *over))))
            for over in (["seed=0"], ["seed=1"], ["seed=0", "eval.seed=1"])]
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).all()


# ---- gradient norms by term (review D11) -------------------------------------------------------
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


def test_the_cli_checks_the_labelled_source_with_the_vocabulary_its_models_get(tmp_path):
    from tests._train_tiny import tiny_config
    from topd_jax.demos.labelled_demo import VOCAB_SIZE
    from topd_jax.train.__main__ import validation_config

    cfg = tiny_config(tmp_path, "data.source=labelled")  # vocab_size 128 < the 130 words
    checked = validation_config(cfg)
    assert checked.student.vocab_size == checked.teacher.vocab_size == VOCAB_SIZE >= TOK.vocab_size
    assert checked.data == cfg.data and validation_config(tiny_config(tmp_path)).student.vocab_size == 128


def test_the_example_rollout_is_the_one_that_shows_a_false_alarm_then_a_surface_candidate():
    from topd_jax.train.labels import example_row
    S, F = SURFACE, FORK
    labels = np.array([[F, F, F], [S, F, F], [S, F, F], [F, F, F]])
    cand = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], bool)
    false_alarm = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], bool)
    labelled_mask = (labels == S) | (labels == F)
    # row 0 has the most labelled candidates, row 1 a surface one, row 2 a false alarm: row 2 wins
    assert example_row(cand, false_alarm, None, labels, labelled_mask) == 2
    assert example_row(cand, np.zeros_like(false_alarm), None, labels, labelled_mask) == 1
    guided = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0]], bool)
    no_fa, no_surface = np.zeros_like(false_alarm), np.full_like(labels, F)
    assert example_row(cand, no_fa, guided, no_surface, np.ones_like(cand)) == 3  # guided beats count
    assert example_row(cand, no_fa, None, no_surface, np.ones_like(cand)) == 0    # then the count


def test_label_metrics_reuse_the_oracles_labels_instead_of_parsing_the_rollouts_again(tmp_path):
    from types import SimpleNamespace
    from topd_jax.algorithms.prepared import PreparedBatch
    from topd_jax.train.labels import label_metrics
    cfg = load_config(None, [f"output_dir={tmp_path}", "algorithm=topd", "topd.detector=oracle", "rollout.n=1", "student.preset=tiny", "teacher.preset=tiny",
                             "data.source=synthetic"])
    labels = np.array([[0, SURFACE, FORK, FORCED], [0, FORK, SURFACE, FORCED]], np.int8)
    cand = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], bool)
    arrays = {"ids": np.full((2, 4), 5, np.int32), "loss_mask": np.array([[0, 1, 1, 1]] * 2, bool),
              "candidates": cand, "false_alarm": cand & (labels == SURFACE),
              "divergence": np.where(labels == SURFACE, 0.0, 1.0).astype(np.float32)}
    diag = {"token_loss": np.ones((2, 4), np.float32), "labels": labels, "correct": np.array([True, False])}

    def must_not_parse(*args):
        raise AssertionError("the rollouts were labelled twice")

    frozen = SimpleNamespace(text=SimpleNamespace(decode=lambda ids: "w"), eos_ids=(2,))
    metrics, _ = label_metrics(cfg, must_not_parse, {"problems": ["p0", "p1"]},
                               PreparedBatch(arrays, None, diag), None, frozen)
    assert metrics["label_true_surface_share"] == (1.0, 3.0)
    assert metrics["label_false_alarm_precision"] == (1.0, 1.0)
    assert metrics["label_rollout_accuracy"] == (1.0, 2.0)
