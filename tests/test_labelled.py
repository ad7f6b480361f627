"""The labelled synthetic task: grammar, styles, planted slips and repairs, and the labeller
on hand-written rollouts (every label kind, malformed rows)."""

import numpy as np
import pytest

from topd_jax.data import labelled as L
from topd_jax.data.synthetic import SyntheticTokenizer, check, generate_problems

PROMPT = "a = 3 ; b = a + 2 ; c = 3 * b ; d = c - 4 ; ? d"  # values 3, 5, 1, 4
P = L.parse_problem(PROMPT)
S, F, R, D, X, B, N = L.SURFACE, L.FORK, L.RECOVERY, L.DERAILED, L.FORCED, L.BAD, L.NONE


def labels_of(text, problem=P, **kw):
    words = text.split()
    return words, L.label_words(problem, words, **kw)


def test_parse_problem_round_trips_generated_prompts():
    for p in generate_problems(200, 5, min_steps=1, max_steps=6):
        assert L.parse_problem(p.prompt) == p
    assert P.values == (3, 5, 1, 4) and P.steps[1].const_first


@pytest.mark.parametrize("bad", ["a = 3 ; b = c + 2 ; ? b", "a = x ; b = a + 2 ; ? b",
                                 "a = 3 ; b = a + 2 ; ? c", "a = 3 ; b = a / 2 ; ? b"])
def test_parse_problem_names_the_bad_part(bad):
    with pytest.raises(ValueError, match="prompt"):
        L.parse_problem(bad)


def test_correct_solution_labels_surface_fork_and_forced():
    words, lab = labels_of("b = 2 + 3 = 5 hence we get c = 5 * 3 = 1 so d = 1 - 4 = 4 ; answer 4 <eos>")
    expected = [X, X, S, X, F, X, F,            # b = 2 + 3 = 5   (first operand of + is free)
                S, X, X,                        # hence we get    (tail words forced)
                X, X, S, X, F, X, F,            # c = 5 * 3 = 1
                S,                              # so
                X, X, F, X, F, X, F,            # d = 1 - 4 = 4   (- is not commutative)
                X, X, F, X]                     # ; answer 4 <eos>
    assert lab.labels.tolist() == expected
    assert lab.correct and not lab.slipped.any() and not lab.repair.any()
    assert not lab.ungrammatical.any() and check(" ".join(words[:-1]), P.answer)


def test_unrepaired_slip_is_followed_by_recovery_then_derailed_until_eos():
    _, lab = labels_of("b = 3 + 2 = 6 then we get c = 6 * 3 = 4 ; answer 4 <eos> <eos>")
    assert lab.slipped.tolist().index(True) == 6 and lab.slipped.sum() == 1
    assert lab.labels[7] == R
    assert (lab.labels[8:21] == D).all()          # through the first eos
    assert lab.labels[21] == N and not lab.correct


def test_repaired_slip_marks_the_repair_and_restores_the_chain():
    text = "b = 3 + 2 = 5 so c = 3 * 5 = 3 wait fix c = 5 * 3 = 1 so d = 1 - 4 = 4 ; answer 4 <eos>"
    words, lab = labels_of(text)
    i = words.index("wait")
    assert lab.slipped[i - 1] and lab.labels[i] == R
    assert lab.repair[i:i + 9].all() and lab.repair.sum() == 9
    assert lab.labels[i + 1:i + 9].tolist() == [X, X, X, S, X, F, X, F]
    assert lab.labels[i + 9] == S and lab.correct and not lab.spurious.any()


def test_wrong_first_operand_is_a_slip_at_a_surface_position():
    words, lab = labels_of("b = 4 + 2 = 6 so c")
    assert lab.labels[2] == S and lab.slipped[2] and lab.labels[3] == R
    assert (lab.labels[4:] == D).all()


def test_wrong_operand_then_wait_repairs_mid_line():
    words, lab = labels_of("b = 4 wait fix b = 3 + 2 = 5 ; answer 5 <eos>",
                           problem=L.parse_problem("a = 3 ; b = a + 2 ; ? b"))
    assert lab.labels[3] == R and lab.repair[3:12].all() and lab.correct


def test_spurious_wait_after_a_correct_value():
    words, lab = labels_of("b = 3 + 2 = 5 wait fix b = 3 + 2 = 5 so c = 5 * 3 = 1 thus d = 1 - 4 = 4 "
                           "; answer 4 <eos>")
    assert lab.spurious[7] and lab.labels[7] == S and not lab.repair.any() and lab.correct


def test_wrong_final_answer_derails_the_rest():
    _, lab = labels_of("b = 3 + 2 = 5 so c = 5 * 3 = 1 so d = 1 - 4 = 4 ; answer 5 <eos>")
    assert lab.labels[-2] == F and lab.slipped[-2] and lab.labels[-1] == D and not lab.correct


@pytest.mark.parametrize("text,first_bad", [
    ("b = 3 + 2 = 5 because c", 7),           # not a connective
    ("b = 3 + 2 = 5 then c = 5", 8),          # 'then' must be followed by 'we get'
    ("b = 3 - 2", 3),                         # wrong operator
    ("b = 3 + 2 = 5 so c = x", 10),           # a word where a number belongs
    ("b = 3 + 2 = 5 so c = 5 * 3 = 1 so d = 1 - 4 = 4 ; answer 4 so", 26),  # junk after the answer
])
def test_ungrammatical_token_makes_every_later_position_bad(text, first_bad):
    words, lab = labels_of(text + " <eos> <pad>")
    assert lab.ungrammatical.tolist().index(True) == first_bad and lab.ungrammatical.sum() == 1
    assert lab.labels[first_bad] != B
    assert (lab.labels[first_bad + 1:len(words) - 1] == B).all() and lab.labels[-1] == N


def test_truncated_and_empty_completions():
    _, lab = labels_of("b = 3 + 2")
    assert lab.labels.tolist() == [X, X, S, X, F] and not lab.correct
    _, lab = labels_of("")
    assert lab.labels.shape == (0,) and not lab.correct
    _, lab = labels_of("<eos> b")
    assert lab.labels.tolist() == [X, N] and lab.ungrammatical[0]


def test_plain_demo_grammar_single_word_connectives():
    words, lab = labels_of("b = 3 + 2 = 5 hence c = 5 * 3 = 1 then d = 1 - 4 = 4 ; answer 4 <eos>",
                           phrases=L.PLAIN_PHRASES)
    assert lab.labels[7] == S and lab.labels[8] == X and lab.correct
    _, lab = labels_of("b = 3 + 2 = 5 then we get c", phrases=L.PLAIN_PHRASES)
    assert lab.ungrammatical[8] and lab.ungrammatical.sum() == 1


def test_phrases_must_have_distinct_first_words():
    with pytest.raises(ValueError, match="distinct first words"):
        L.label_words(P, [], phrases=(("so",), ("so", "we")))
    with pytest.raises(ValueError, match="wait"):
        L.label_words(P, [], phrases=(("wait",),))


def test_generated_solutions_label_as_intended():
    rng = np.random.default_rng(0)
    problems = generate_problems(300, 3, min_steps=3, max_steps=3)
    repaired = slipped = 0
    for p in problems:
        text, trainable = L.teacher_solution(p, rng, slip_rate=0.5)
        lab = L.label_words(p, text.split() + ["<eos>"])
        assert lab.correct and not lab.ungrammatical.any() and check(text, p.answer)
        assert (lab.labels != D).all()
        # the slipped value is exactly the untrained word, and a repair follows it
        assert np.flatnonzero(lab.slipped).tolist() == np.flatnonzero(~np.asarray(trainable)).tolist()
        repaired += lab.repair.any()
        text, _ = L.student_solution(p, rng, slip_rate=0.5)
        lab = L.label_words(p, text.split() + ["<eos>"])
        assert not lab.ungrammatical.any() and not lab.repair.any()
        assert lab.correct == (not lab.slipped.any()) == check(text, p.answer)
        slipped += lab.slipped.any()
    assert 100 < repaired < 200 and 100 < slipped < 200


def test_styles_differ_sharply():
    rng = np.random.default_rng(1)
    p = generate_problems(1, 2, min_steps=3, max_steps=3)[0]
    t = " ".join(L.teacher_solution(p, rng, slip_rate=0.0)[0] for _ in range(300)).split()
    s = " ".join(L.student_solution(p, rng, slip_rate=0.0)[0] for _ in range(300)).split()
    assert t.count("so") > 8 * s.count("so") and s.count("we") > 8 * t.count("we")


def test_tokenizer_encodes_the_labelled_words_and_masked_arrays():
    tok = L.LabelledTokenizer()
    base = SyntheticTokenizer(construction_words=True)
    assert tok.vocab[:base.vocab_size] == base.vocab and tok.vocab_size == 130
    rng = np.random.default_rng(3)
    p = generate_problems(1, 4, min_steps=3, max_steps=3)[0]
    text, trainable = L.render_words(p, rng, L.TEACHER_STYLE, slip_step=1, recover=True)
    text = " ".join(text)
    arr = L.supervised_arrays_masked(tok, [p.prompt], [text], [trainable], prompt_len=32,
                                     completion_len=48)
    n = len(text.split())
    assert arr["loss_mask"][0, 32:32 + n + 1].sum() == n  # n words - 1 slip + eos
    assert not arr["loss_mask"][0, 32 + trainable.index(False)]
    with pytest.raises(ValueError, match="trainable"):
        L.supervised_arrays_masked(tok, [p.prompt], [text], [trainable[:-1]])


def test_label_rollouts_in_trainer_layout():
    tok = L.LabelledTokenizer()
    text = "b = 3 + 2 = 6 so c = 6 * 3 = 4 so d = 4 - 4 = 0 ; answer 0"
    prompt_ids = tok.encode(PROMPT)
    comp = tok.encode(text, add_bos=False) + [tok.eos_id]
    length = len(prompt_ids) + len(comp) + 3
    ids = np.zeros((2, length), np.int32)
    cmask = np.zeros((2, length), bool)
    ids[0, :len(prompt_ids)] = prompt_ids
    ids[0, len(prompt_ids):len(prompt_ids) + len(comp)] = comp
    cmask[0, len(prompt_ids):len(prompt_ids) + len(comp)] = True
    ids[1, 2:2 + len(prompt_ids)] = prompt_ids  # row 1: left padding, empty completion
    out = L.label_rollouts([P, P], ids, cmask, tok.vocab, eos_id=tok.eos_id)
    row = out["labels"][0]
    assert (row[:len(prompt_ids)] == N).all() and (row[len(prompt_ids) + len(comp):] == N).all()
    start = len(prompt_ids)
    assert row[start + 6] == F and out["slipped"][0, start + 6] and row[start + 7] == R
    assert (out["labels"][1] == N).all() and out["correct"].tolist() == [False, False]
    with pytest.raises(ValueError, match="one \\[B, L\\] batch"):
        L.label_rollouts([P], ids, cmask, tok.vocab)


def test_unreduced_slips_are_the_raw_result_or_the_residue_plus_p_and_label_as_slips():
    assert [L.unreduced_slip("+", 5, 6, 7), L.unreduced_slip("*", 3, 5, 7)] == [11, 15]
    assert [L.unreduced_slip("+", 1, 2, 7), L.unreduced_slip("-", 1, 3, 7)] == [10, 12]  # raw == v / raw < 0
    p = L.parse_problem("a = 5 ; b = a + 6 ; c = b * 3 ; ? c")
    words, trainable = L.render_words(p, np.random.default_rng(0), L.TEACHER_STYLE, slip_step=[0, 1],
                                      slip_kind="unreduced", recover=True)
    assert [w for w, t in zip(words, trainable) if not t] == ["11", "12"]  # 5 + 6; 4 * 3
    lab = L.label_words(p, words + [L.EOS])
    assert lab.correct and lab.slipped.sum() == 2 and not lab.spurious.any()


def test_student_confusion_writes_plus_and_times_steps_unreduced_and_derails():
    p = L.parse_problem("a = 5 ; b = a + 6 ; c = b - 3 ; ? c")
    text, _ = L.student_solution(p, np.random.default_rng(0), slip_rate=0.0, confusion=1.0)
    words = text.split()
    assert words[words.index("=", 2) + 1] == "11"  # b = 5 + 6 = 11 (not 4)
    lab = L.label_words(p, words + [L.EOS])
    assert lab.slipped.sum() == 1 and not lab.correct  # the label parser: derailed after 11
    assert text.endswith("answer 1")  # 11 - 3 = 8 = 1 mod 7: congruent, the answer is still right
