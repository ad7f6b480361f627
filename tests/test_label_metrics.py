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
