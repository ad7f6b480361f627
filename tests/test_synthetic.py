"""The embedded demo task: determinism, verifiable references, surface freedom, real forks."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from topd_jax.data.synthetic import (CONNECTIVES, STUDENT_STYLE, TEACHER_STYLE, Style,
                                     SyntheticTokenizer, apply_op, check, confused_values, generate_problems, make_splits,
                                     noisy_solution, reference_solution, render_solution,
                                     slipped_values, supervised_arrays, to_records)
from topd_jax.data.synthetic import (CONSTRUCTION_WORDS, construction_target, first_error,
                                     first_error_step, synthetic_synthesis_prompt)

TOK = SyntheticTokenizer()


def test_generation_is_deterministic_in_the_seed():
    a, b = generate_problems(50, 3), generate_problems(50, 3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert [p.prompt for p in generate_problems(50, 4)] != [p.prompt for p in a]
    r1 = [reference_solution(p, np.random.default_rng(9)) for p in a]
    r2 = [reference_solution(p, np.random.default_rng(9)) for p in b]
    assert r1 == r2


def test_values_follow_modular_arithmetic():
    p = generate_problems(1, 0, min_steps=3, max_steps=3)[0]
    vals = [p.start]
    for s in p.steps:
        vals.append(eval(f"{vals[-1]} {s.op} {s.const}") % p.modulus)  # noqa: S307
    assert p.values == tuple(vals) and p.answer == str(vals[-1])


def test_every_reference_solution_verifies():
    rng = np.random.default_rng(0)
    for p in generate_problems(300, 1, min_steps=1, max_steps=6):
        for style in (TEACHER_STYLE, STUDENT_STYLE):
            sol = reference_solution(p, rng, style)
            assert check(sol, p.answer), (p.prompt, sol)


def test_surface_variants_of_one_problem_all_verify_and_differ():
    p = generate_problems(1, 7, min_steps=4, max_steps=4)[0]
    rng = np.random.default_rng(1)
    variants = {reference_solution(p, rng, Style((0.25,) * 4, 0.5)) for _ in range(60)}
    assert len(variants) > 10
    assert all(check(v, p.answer) for v in variants)
    used = {w for v in variants for w in v.split() if w in CONNECTIVES}
    assert used == set(CONNECTIVES)


def test_styles_differ_in_surface_form_only():
    p = generate_problems(1, 2, min_steps=4, max_steps=4)[0]
    t = [reference_solution(p, np.random.default_rng(i), TEACHER_STYLE) for i in range(200)]
    s = [reference_solution(p, np.random.default_rng(i), STUDENT_STYLE) for i in range(200)]
    count = lambda sols, w: sum(x.split().count(w) for x in sols)  # noqa: E731
    assert count(t, "so") > 3 * count(s, "so") and count(s, "then") > 2 * count(t, "then")
    assert all(check(x, p.answer) for x in t + s)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), step_frac=st.floats(0, 0.999))
def test_a_slip_at_any_step_derails_the_answer(seed, step_frac):
    p = generate_problems(1, seed, min_steps=1, max_steps=6)[0]
    step = int(step_frac * len(p.steps))
    rng = np.random.default_rng(seed)
    vals = slipped_values(p, step, rng)
    assert vals[:step + 1] == p.values[:step + 1] and vals[step + 1] != p.values[step + 1]
    sol = render_solution(p, vals, rng)
    assert not check(sol, p.answer)


def test_noisy_solutions_are_mediocre_at_the_requested_rate():
    rng = np.random.default_rng(0)
    probs = generate_problems(400, 5)
    out = [noisy_solution(p, rng, 0.3) for p in probs]
    correct = [ok for _, ok in out]
    assert all(check(s, p.answer) == ok for (s, ok), p in zip(out, probs))
    assert 0.6 < np.mean(correct) < 0.8


def test_the_sign_confusion_writes_minus_as_plus_and_derails_only_problems_with_minus():
    probs = generate_problems(200, 7)
    rng = np.random.default_rng(0)
    for p in probs:
        vals = confused_values(p, rng, 1.0)
        x = p.start
        for s, v in zip(p.steps, vals[1:]):
            assert v == apply_op("+" if s.op == "-" else s.op, x, s.const, p.modulus)
            x = v
        assert (vals == p.values) == all(s.op != "-" for s in p.steps)
        assert confused_values(p, rng, 0.0) == p.values
    # at 0.8 the greedy mode is the confusion: the correct share is the share without '-' plus 0.2^k
    out = [noisy_solution(p, np.random.default_rng(i), 0.0, confusion=0.8) for i, p in enumerate(probs)]
    assert all(check(text, p.answer) == ok for (text, ok), p in zip(out, probs))
    without_minus = np.mean([all(s.op != "-" for s in p.steps) for p in probs])
    assert without_minus <= np.mean([ok for _, ok in out]) < without_minus + 0.25


def test_noisy_solutions_without_confusion_draw_the_same_random_numbers_as_before():
    p = generate_problems(1, 3)[0]
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert noisy_solution(p, a, 0.3) == noisy_solution(p, b, 0.3, confusion=0.0)
    assert a.random() == b.random()


@pytest.mark.parametrize("completion, answer, ok", [
    ("b = 1 + 2 = 3 ; answer 3", "3", True), ("answer 4 then answer 3", "3", True),
    ("b = 1 + 2 = 3 ; answer 4", "3", False), ("b = 1 + 2 = 3", "3", False),
    ("answer 31", "3", False), ("", "0", False)])
def test_check_reads_the_last_answer(completion, answer, ok):
    assert check(completion, answer) is ok


def test_tokenizer_round_trips_and_is_small():
    assert TOK.vocab_size < 128 and len(set(TOK.vocab)) == TOK.vocab_size
    assert TOK.vocab[:3] == ("<pad>", "<bos>", "<eos>")
    rng = np.random.default_rng(0)
    for p in generate_problems(100, 11, max_steps=7, modulus=97):
        for text in (p.prompt, reference_solution(p, rng)):
            ids = TOK.encode(text)
            assert ids[0] == TOK.bos_id and TOK.decode(ids) == text
            assert TOK.decode(ids[1:] + [TOK.eos_id, 5, 6]) == text
    with pytest.raises(ValueError, match="'banana'"):
        TOK.encode("a = banana")


def test_sequences_fit_the_demo_lengths():
    rng = np.random.default_rng(0)
    probs = generate_problems(500, 0, min_steps=2, max_steps=4)
    assert max(len(TOK.encode(p.prompt)) for p in probs) <= 32
    assert max(len(TOK.encode(reference_solution(p, rng), add_bos=False)) + 1
               for p in probs) <= 64


def test_supervised_arrays_layout():
    p = generate_problems(2, 0)
    sols = [reference_solution(x, np.random.default_rng(0)) for x in p]
    arr = supervised_arrays(TOK, [x.prompt for x in p], sols, prompt_len=32, completion_len=64)
    ids, attn, tgt = arr["input_ids"], arr["attention_mask"], arr["loss_mask"]
    assert ids.shape == attn.shape == tgt.shape == (2, 96) and ids.dtype == np.int32
    for i in range(2):
        prompt_ids = TOK.encode(p[i].prompt)
        assert list(ids[i, 32 - len(prompt_ids):32]) == prompt_ids and not attn[i, :32 - len(prompt_ids)].any()
        assert not tgt[i, :32].any() and TOK.decode(ids[i, 32:][tgt[i, 32:]]) == sols[i]
        assert ids[i, 32 + tgt[i].sum() - 1] == TOK.eos_id and (attn[i] >= tgt[i]).all()
    with pytest.raises(ValueError, match="too long"):
        supervised_arrays(TOK, [p[0].prompt], [sols[0]], prompt_len=4)


def test_splits_are_disjoint_and_records_have_the_prompt_schema():
    train, evals = make_splits(500, 50, 3)
    assert len(train) == 500 and len(evals) == 50
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    rec = to_records(evals)[0]
    assert rec == {"id": "synthetic-0", "problem": evals[0].prompt, "answer": evals[0].answer}


def test_bad_generation_parameters_are_rejected():
    with pytest.raises(ValueError, match="prime"):
        generate_problems(1, 0, modulus=12)
    with pytest.raises(ValueError, match="min_steps=3 max_steps=2"):
        generate_problems(1, 0, min_steps=3, max_steps=2)


# ---------------------------------------------------------------- TAPO construction examples
CTOK = SyntheticTokenizer(construction_words=True)


def test_construction_words_extend_the_vocabulary_without_moving_ids():
    base = SyntheticTokenizer().vocab
    assert len(base) == 122 and SyntheticTokenizer(construction_words=False).vocab == base
    assert CTOK.vocab[:122] == base and CTOK.vocab[122:] == CONSTRUCTION_WORDS
    assert CTOK.vocab_size == 128 and len(set(CTOK.vocab)) == 128
    text = "<analysis> b = 3 </analysis> <reconstruction> wait fix </reconstruction>"
    assert CTOK.decode(CTOK.encode(text)) == text
    with pytest.raises(ValueError, match="'wait'"):
        TOK.encode("b = 1 wait")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), step_frac=st.floats(0, 0.999))
def test_first_error_finds_the_slip_from_values_and_from_text(seed, step_frac):
    p = generate_problems(1, seed, min_steps=1, max_steps=6)[0]
    step = int(step_frac * len(p.steps))
    rng = np.random.default_rng(seed)
    vals = slipped_values(p, step, rng)
    assert first_error_step(p, vals) == step and first_error_step(p, p.values) is None
    for style in (TEACHER_STYLE, STUDENT_STYLE):
        assert first_error(p, render_solution(p, vals, rng, style)) == step
        assert first_error(p, reference_solution(p, rng, style)) is None


def test_first_error_is_robust_to_garbage():
    p = generate_problems(1, 0, min_steps=3, max_steps=3)[0]
    wrong_b = (p.values[1] + 1) % p.modulus
    for text in ["", "answer", "= = = 3", "b = = 1 + 2 = 3", "z = 1 + 2 = 3 ; h = 1 + 1 = 5",
                 "b = 1 + 2 =", "bb = 1 + 2 = 9", None, 17]:
        assert first_error(p, text) is None
    assert first_error(p, f"so so b = 1 + 2 = {wrong_b}b ; b = 1 + 2 = {wrong_b}") == 0
    with pytest.raises(ValueError, match="values has 2 entries"):
        first_error_step(p, (1, 2))


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="abc = +*-0123456789;\n", max_size=80))
def test_first_error_never_raises(text):
    p = generate_problems(1, 1, min_steps=2, max_steps=2)[0]
    assert first_error(p, text) in (None, 0, 1)


def test_construction_target_repairs_the_first_slip():
    rng = np.random.default_rng(0)
    for p in generate_problems(50, 9, min_steps=1, max_steps=5):
        step = int(rng.integers(len(p.steps)))
        wrong = render_solution(p, slipped_values(p, step, rng), rng, STUDENT_STYLE)
        target = construction_target(p, wrong, rng)
        words = target.split()
        assert words[:2] == ["<analysis>", p.steps[step].var] and words[-1] == "</reconstruction>"
        recon = target.split("<reconstruction>")[1].split("</reconstruction>")[0].strip()
        head = recon.split(" wait ")[0]
        assert wrong.startswith(head) and first_error(p, head) == step
        assert check(recon, p.answer) and first_error(p, recon.split(" wait ")[1]) is None
        assert len(CTOK.encode(target, add_bos=False)) + 1 <= 64
        prompt = synthetic_synthesis_prompt(p, wrong, reference_solution(p, rng))
        assert prompt.startswith(f"fix {p.prompt} ; {wrong} ; ") and len(CTOK.encode(prompt)) <= 128
    with pytest.raises(ValueError, match="no wrong step line"):
        construction_target(p, reference_solution(p, rng), rng)
