"""Labelled-task model preparation: training batches and the gates (with a scripted "model")."""

import numpy as np

from topd_jax.data import labelled
from topd_jax.data.synthetic import generate_problems
from topd_jax.demos import labelled_demo as LD

TOK = labelled.LabelledTokenizer()
WAIT, FIX = TOK.encode("wait fix", add_bos=False)


def test_batches_mask_the_planted_slip_and_only_the_teacher_repairs():
    problems = generate_problems(32, 0, min_steps=3, max_steps=3)
    t = next(LD.batches(problems, "teacher", 64, 1, prompt_len=25, completion_len=48, teacher_slip_rate=1.0))
    s = next(LD.batches(problems, "student", 64, 1, prompt_len=25, completion_len=48))
    for b in (t, s):
        assert b["input_ids"].shape == (64, 73) and b["input_ids"].max() < TOK.vocab_size
    ids, target = t["input_ids"], t["loss_mask"]
    rows, cols = np.nonzero(ids == WAIT)
    assert len(set(rows)) == 64  # slip_rate 1: every teacher row repairs once
    assert not target[rows, cols - 1].any() and target[rows, cols].all()  # the slip is no target, wait is
    assert not (s["input_ids"] == WAIT).any()


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
    assert g == {"greedy_accuracy": 1.0, "spurious_wait_rate": 0.0, "recovery_rate": 1.0, "ungrammatical_rate": 0.0}
