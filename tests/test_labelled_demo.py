"""Labelled-task model preparation: training batches and the gates (with a scripted "model")."""

from pathlib import Path

import numpy as np

from topd_jax.config.loader import load_config

from topd_jax.data import labelled
from topd_jax.data.synthetic import generate_problems
from topd_jax.demos import labelled_demo as LD

TOK = labelled.LabelledTokenizer()
WAIT, FIX = TOK.encode("wait fix", add_bos=False)


RECIPE = dict(teacher_slip_rate=1.0, teacher_max_slips=1, teacher_slip_kind="random", student_slip_rate=0.5, student_confusion=0.0,
              decision_weight=5.0)


def test_batches_mask_the_planted_slip_and_only_the_teacher_repairs():
    problems = generate_problems(32, 0, min_steps=3, max_steps=3)
    t = next(LD.batches(problems, "teacher", 64, 1, prompt_len=25, completion_len=48, **RECIPE))
    s = next(LD.batches(problems, "student", 64, 1, prompt_len=25, completion_len=48, **RECIPE))
    for b in (t, s):
        assert b["input_ids"].shape == (64, 73) and b["input_ids"].max() < TOK.vocab_size
    ids, target = t["input_ids"], t["loss_mask"]
    rows, cols = np.nonzero(ids == WAIT)
    assert len(set(rows)) == 64  # slip_rate 1: every teacher row repairs once
    assert not target[rows, cols - 1].any() and target[rows, cols].all()  # the slip is no target, wait is
    assert not (s["input_ids"] == WAIT).any()
    # the decision after a result value (here: wait) is weighted, nothing else; the student is unweighted
    assert (t["weights"][rows, cols] == 5.0).all() and (s["weights"] == 1.0).all()
    assert set(np.unique(t["weights"])) == {1.0, 5.0}


def test_teacher_batches_plant_repaired_slips_at_the_configured_rate():
    problems = generate_problems(64, 2, min_steps=3, max_steps=3)
    recipe = dict(RECIPE, teacher_slip_rate=0.6, teacher_max_slips=2)
    t = next(LD.batches(problems, "teacher", 2000, 4, prompt_len=25, completion_len=56, **recipe))
    waits = (t["input_ids"] == WAIT).sum(axis=1)  # one repair per planted slip
    assert abs((waits > 0).mean() - 0.6) < 0.04  # binomial sd 0.011
    assert set(np.unique(waits)) == {0, 1, 2}
    assert abs(waits[waits > 0].mean() - 1.5) < 0.06  # 1 or 2 slips, uniform
    # every planted (masked) value is followed by wait: a slip is always repaired
    r, c = np.nonzero(~t["loss_mask"][:, 25:] & t["attention_mask"][:, 25:])
    assert (t["input_ids"][r, 25 + c + 1] == WAIT).all() and len(r) == waits.sum()


def _meta(**gates):
    return {"gates": gates}


def test_check_gates_names_each_failing_gate_with_value_and_target():
    cfg = load_config(Path(__file__).parents[1] / "topd_jax/configs/demo.yaml")  # default gates
    teacher = _meta(greedy_accuracy=0.99, recovery_rate=0.5, spurious_wait_rate=0.01)
    student = dict(_meta(greedy_accuracy=0.4, recovery_rate=0.0), curve=[[500, 0.2], [1000, 0.38], [1500, 0.4]])
    failed = LD.check_gates(cfg, teacher, student)
    assert [f["gate"] for f in failed] == ["teacher_recovery_rate"]
    assert failed[0]["value"] == 0.5 and failed[0]["target"] == ">= 0.9"
    student["curve"] = [[500, 0.1], [1000, 0.4]]  # still climbing: not past its jump
    assert [f["gate"] for f in LD.check_gates(cfg, dict(teacher, gates=dict(teacher["gates"], recovery_rate=0.95)),
                                              student)] == ["student_plateau"]
    assert {f["gate"] for f in LD.check_gates(cfg, None, student)} >= {"teacher_greedy_accuracy",
                                                                     "teacher_recovery_rate"}


def test_gates_score_a_perfect_repairing_model_as_perfect(monkeypatch):
    problems = generate_problems(16, 3, min_steps=2, max_steps=3)
    by_prompt = {p.prompt: p for p in problems}

    def scripted(model, texts, max_new_tokens, length):
        out = []
        for text in texts:
            prompt = text[:text.index("?") + 3]  # "... ? x"
            p = by_prompt[prompt]
            rest = text[len(prompt):].split()
            if not rest:  # from the prompt: a correct teacher solution
                out.append(labelled.render_words(p, np.random.default_rng(0), labelled.TEACHER_STYLE)[0]
                           + [labelled.EOS])
                continue
            # after a wrong value: wait fix + the rest of a repaired solution
            step = sum(w == "=" for w in rest) // 2 - 1
            words, _ = labelled.render_words(p, np.random.default_rng(1), labelled.TEACHER_STYLE,
                                             slip_step=step, recover=True)
            out.append(words[words.index("wait"):] + [labelled.EOS])
        return out

    monkeypatch.setattr(LD, "_greedy_words", scripted)
    g = LD.gates(None, problems, prompt_len=25, completion_len=48)
    assert g == {"greedy_accuracy": 1.0, "spurious_wait_rate": 0.0, "recovery_rate": 1.0, "ungrammatical_rate": 0.0,
                 "recovery_rate_random": 1.0}
