"""TAPO construction: DCS selection, synthesis prompt, parser, splicing, synthetic end to end."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.algorithms.tapo_construct import (
    FAILURE_REASONS,
    TAGS,
    Failure,
    Pair,
    Parsed,
    Selection,
    Spliced,
    common_prefix_len,
    parse_construction,
    select_pairs,
    splice,
    splice_text,
)
from topd_jax.data import synthetic as S
from topd_jax.data.templates import math_synthesis_prompt as synthesis_prompt

SETTINGS = settings(max_examples=200, deadline=None)
TOK = S.SyntheticTokenizer(construction_words=True)


def group(*rows: str) -> np.ndarray:
    """'RRWWWW' -> [True, True, False, ...] per row."""
    return np.array([[c == "R" for c in r] for r in rows], bool)


# --- difficulty-aware candidate selection ---------------------------------------------


def test_dcs_gate_at_the_exact_boundaries():
    correct = group("RRWWWW", "RWWWWW", "RRRWWW", "RRRRRR", "WWWWWW", "RRRRWW")
    sel = select_pairs(correct, np.random.default_rng(0), n_pos=2, n_neg=4, m_max=4)
    assert sel.gate_passed.tolist() == [True, False, False, False, False, False]
    assert sel.gate_fraction == pytest.approx(1 / 6)
    assert sorted(p.wrong for p in sel.pairs) == [2, 3, 4, 5] and {p.prompt for p in sel} == {0}
    assert all(p.right in (0, 1) for p in sel.pairs)


def test_all_right_and_all_wrong_groups_give_no_pairs():
    sel = select_pairs(group("RRRRRRRR", "WWWWWWWW"), np.random.default_rng(0))
    assert len(sel) == 0 and not sel.gate_passed.any() and sel.gate_fraction == 0.0


def test_m_max_caps_the_pairs_and_draws_distinct_wrong_rollouts():
    correct = group("RRRWWWWWWW")  # 7 wrong
    seen = set()
    for seed in range(40):
        sel = select_pairs(correct, np.random.default_rng(seed), m_max=4)
        wrong = [p.wrong for p in sel]
        assert len(wrong) == 4 and len(set(wrong)) == 4 and wrong == sorted(wrong)
        assert all(not correct[0, p.wrong] and correct[0, p.right] for p in sel)
        seen.update(wrong)
    assert seen == set(range(3, 10)), "every wrong rollout should be drawn sometimes"
    assert len(select_pairs(correct, np.random.default_rng(0), m_max=0)) == 0
    assert len(select_pairs(correct, np.random.default_rng(0), m_max=20)) == 7


def test_selection_is_deterministic_in_the_generator():
    correct = np.random.default_rng(3).random((16, 8)) < 0.4
    a = select_pairs(correct, np.random.default_rng(7), n_pos=1, n_neg=1)
    b = select_pairs(correct, np.random.default_rng(7), n_pos=1, n_neg=1)
    assert a.pairs == b.pairs and isinstance(a.pairs[0], Pair) and list(a) == list(a.pairs)


@settings(max_examples=100, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=24, max_size=24), seed=st.integers(0, 99),
       n_pos=st.integers(1, 4), n_neg=st.integers(1, 4), m_max=st.integers(0, 5))
def test_selection_properties_on_random_groups(bits, seed, n_pos, n_neg, m_max):
    correct = np.array(bits).reshape(3, 8)
    sel = select_pairs(correct, np.random.default_rng(seed), n_pos=n_pos, n_neg=n_neg, m_max=m_max)
    for p in range(3):
        gate = correct[p].sum() >= n_pos and (~correct[p]).sum() >= n_neg
        assert sel.gate_passed[p] == gate
        mine = [q for q in sel.pairs if q.prompt == p]
        assert len(mine) == (min(m_max, (~correct[p]).sum()) if gate else 0)
        assert len({q.wrong for q in mine}) == len(mine)
        assert all(not correct[p, q.wrong] and correct[p, q.right] for q in mine)


def test_selection_rejects_bad_input_naming_it():
    with pytest.raises(ValueError, match="int64"):
        select_pairs(np.zeros((2, 4), int), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(8,\)"):
        select_pairs(np.zeros(8, bool), np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_pos=0"):
        select_pairs(np.zeros((2, 4), bool), np.random.default_rng(0), n_pos=0)


# --- synthesis prompt -------------------------------------------------------------------


def test_synthesis_prompt_carries_the_inputs_and_asks_for_the_format():
    text = synthesis_prompt("  What is $1+1$?\n", "1+1=3, so \\boxed{3}", "1+1=2, so \\boxed{2}")
    assert "What is $1+1$?\n\n" in text and "\\boxed{3}" in text and "\\boxed{2}" in text
    pos = [text.index(t) for t in TAGS]
    assert pos == sorted(pos) and "\\boxed{answer}" in text
    assert "{" not in text.replace("\\boxed{", "").replace("{answer}", "").replace("}", "")


# --- parser -----------------------------------------------------------------------------

GOOD = "<analysis>Step 2 adds wrongly.</analysis>\n<reconstruction>\n 1+1 = 3. Wait, 1+1 = 2. \\boxed{2}\n</reconstruction>\n"


def test_parser_reads_a_well_formed_construction():
    out = parse_construction(GOOD)
    assert out == Parsed("Step 2 adds wrongly.", "1+1 = 3. Wait, 1+1 = 2. \\boxed{2}",
                         out.reconstruction_span)
    start, end = out.reconstruction_span
    assert GOOD[start:end] == out.reconstruction


@pytest.mark.parametrize("text", [
    "<analysis>x</analysis><reconstruction>y</reconstruction>",
    "Sure! Here it is.\n<think>hm</think>\n<analysis> x </analysis>\n\n<reconstruction>y</reconstruction>  \n\t",
    "<analysis>π ≠ 3 — 日本語 ✓</analysis><reconstruction>∑ é\u200b z</reconstruction>",
])
def test_parser_tolerates_whitespace_preambles_and_unicode(text):
    assert isinstance(parse_construction(text), Parsed)


@pytest.mark.parametrize("text, reason", [
    ("no tags at all", "missing_analysis"),
    ("<analysis>x</analysis>", "missing_reconstruction"),
    ("<reconstruction>y</reconstruction>", "missing_analysis"),
    ("<analysis>x<reconstruction>y</reconstruction>", "missing_analysis"),
    ("<analysis>x</analysis><reconstruction>y and the generation was truncated", "unterminated"),
    ("<analysis>x</analysis><analysis>x</analysis><reconstruction>y</reconstruction>", "duplicate_tag"),
    ("<analysis>x</analysis><reconstruction>y</reconstruction><reconstruction>z</reconstruction>", "duplicate_tag"),
    ("<analysis>quoting <analysis> here</analysis><reconstruction>y</reconstruction>", "duplicate_tag"),
    ("<analysis>x<reconstruction>y</reconstruction></analysis>", "nested_tags"),
    ("<reconstruction>y<analysis>x</analysis></reconstruction>", "nested_tags"),
    ("<analysis>x<reconstruction>y</analysis></reconstruction>", "nested_tags"),
    ("<reconstruction>y</reconstruction><analysis>x</analysis>", "wrong_order"),
    ("</analysis>x<analysis><reconstruction>y</reconstruction>", "wrong_order"),
    ("<analysis>x</analysis>so<reconstruction>y</reconstruction>", "text_between_blocks"),
    ("<analysis>x</analysis><reconstruction>y</reconstruction> Hope this helps!", "trailing_text"),
    ("<analysis> \n </analysis><reconstruction>y</reconstruction>", "empty_analysis"),
    ("<analysis>x</analysis><reconstruction>\n\t</reconstruction>", "empty_reconstruction"),
    ("<ANALYSIS>x</ANALYSIS><reconstruction>y</reconstruction>", "missing_analysis"),
])
def test_parser_names_why_a_construction_is_dropped(text, reason):
    assert parse_construction(text) == Failure(reason)
    assert reason in FAILURE_REASONS


@pytest.mark.parametrize("value", [None, b"<analysis>x</analysis>", 42, ["a"]])
def test_parser_never_raises_on_non_text(value):
    assert parse_construction(value) == Failure("not_text")


def test_parser_handles_huge_inputs():
    big = "word " * 400_000  # 2 MB
    out = parse_construction(f"<analysis>{big}</analysis><reconstruction>{big}</reconstruction>")
    assert isinstance(out, Parsed) and len(out.reconstruction) == len(big) - 1
    assert parse_construction(big + "<analysis>") == Failure("missing_analysis")
    assert parse_construction("<" * 1_000_000) == Failure("missing_analysis")


_PIECES = st.sampled_from(list(TAGS) + ["x", " ", "\n", "é", "<", ">", "/", "analysis",
                                        "</reconstruction", "\x00", "\\boxed{1}"])


@SETTINGS
@given(pieces=st.lists(_PIECES, max_size=14))
def test_parser_never_crashes_and_a_parse_satisfies_the_rules(pieces):
    text = "".join(pieces)
    out = parse_construction(text)
    assert isinstance(out, (Parsed, Failure))
    if isinstance(out, Failure):
        assert out.reason in FAILURE_REASONS
        return
    assert out.analysis and out.reconstruction
    assert out.analysis == out.analysis.strip() and not any(t in out.reconstruction for t in TAGS)
    start, end = out.reconstruction_span
    assert text[start:end] == out.reconstruction
    assert not text[text.index(TAGS[3]) + len(TAGS[3]):].strip()


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=300))
def test_parser_never_crashes_on_arbitrary_unicode(text):
    assert isinstance(parse_construction(text), (Parsed, Failure))


# --- splicing ---------------------------------------------------------------------------


def test_splice_keeps_the_shared_prefix_and_appends_the_new_tokens():
    out = splice([5, 6, 7, 8, 9], [5, 6, 7, 1, 2])
    assert out == Spliced((5, 6, 7, 1, 2), 3) and out.new_tokens == 2
    assert splice(np.array([5, 6]), np.array([5, 6, 4]), min_prefix=2) == Spliced((5, 6, 4), 2)


def test_a_prefix_that_does_not_match_is_dropped_unless_the_text_is_trusted():
    assert splice([5, 6, 7, 8], [5, 9, 9], min_prefix=2) == Failure("prefix_mismatch")
    assert splice([5, 6, 7, 8], [9, 9], min_prefix=1) == Failure("prefix_mismatch")
    assert splice([5, 6, 7, 8], [5, 9, 9], mode="text", min_prefix=2) == Spliced((5, 9, 9), 1)


def test_splice_failures_for_empty_and_repeated_reconstructions():
    assert splice([1, 2], []) == Failure("empty_reconstruction")
    assert splice([1, 2, 3], [1, 2]) == Failure("no_new_tokens")
    assert splice([1, 2], [1, 2], mode="text") == Failure("no_new_tokens")
    with pytest.raises(ValueError, match="'retype'"):
        splice([1], [2], mode="retype")


ids_st = st.lists(st.integers(0, 4), max_size=12)


@SETTINGS
@given(wrong=ids_st, recon=ids_st, min_prefix=st.integers(0, 5),
       mode=st.sampled_from(["splice", "text"]))
def test_splice_never_crashes_and_starts_with_the_wrong_prefix(wrong, recon, min_prefix, mode):
    out = splice(wrong, recon, mode=mode, min_prefix=min_prefix)
    n = common_prefix_len(wrong, recon)
    if isinstance(out, Failure):
        assert out.reason in ("empty_reconstruction", "no_new_tokens", "prefix_mismatch")
        return
    assert out.prefix_len == n and list(out.ids[:n]) == wrong[:n] and out.new_tokens > 0
    assert list(out.ids) == recon
    assert mode == "text" or n >= min_prefix


class PieceTokenizer:
    """A toy subword tokenizer: greedy longest match over multi-character pieces, so the
    same text has several tokenizations (like BPE)."""
    pieces = ("abc", "ab", "a", "b", "c", " ", "x", "y", "z", "wait")

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            for j, p in sorted(enumerate(self.pieces), key=lambda t: -len(t[1])):
                if text.startswith(p, i):
                    out.append(j)
                    i += len(p)
                    break
            else:
                raise ValueError(f"no piece for {text[i]!r}")
        return out

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_splice_text_keeps_the_policys_own_tokenization_of_the_prefix():
    tok = PieceTokenizer()
    wrong_ids = [2, 3, 4, 5, 6, 5]  # "abc x " sampled as a|b|c, not the canonical "abc"
    recon = "abc x wait y"
    out = splice_text(wrong_ids, recon, decode=tok.decode, encode=tok.encode, min_prefix=4)
    assert out.ids[:6] == tuple(wrong_ids) and out.prefix_len == 6
    assert tok.decode(out.ids) == recon and tok.encode(recon)[:1] == [0]
    assert splice(wrong_ids, tok.encode(recon), min_prefix=1) == Failure("prefix_mismatch")
    assert splice_text(wrong_ids, "zz", decode=tok.decode, encode=tok.encode,
                       min_prefix=1) == Failure("prefix_mismatch")
    assert splice_text(wrong_ids, "abc ", decode=tok.decode, encode=tok.encode) == Failure("no_new_tokens")
    assert splice_text(wrong_ids, " \n", decode=tok.decode, encode=tok.encode) == Failure("empty_reconstruction")


def test_splice_text_backs_off_a_token_cut_mid_word_and_a_skipped_eos():
    wrong_ids = TOK.encode("b = 1 + 9 = 1 ; answer 1", add_bos=False) + [TOK.eos_id, 5]
    recon = "b = 1 + 9 = 10 wait"  # "1" is a string prefix of "10", not a token prefix
    enc = lambda t: TOK.encode(t, add_bos=False)  # noqa: E731
    out = splice_text(wrong_ids, recon, decode=TOK.decode, encode=enc)
    assert out.prefix_len == 6 and TOK.decode(out.ids) == recon  # "b = 1 + 9 ="
    out = splice_text(wrong_ids, "b = 1 + 9 = 1 ; answer 1 wait", decode=TOK.decode, encode=enc)
    assert out.prefix_len == 10 and TOK.eos_id not in out.ids
    lossy = lambda t: TOK.encode(t.replace("wait", ""), add_bos=False)  # noqa: E731
    assert splice_text(wrong_ids, recon, decode=TOK.decode, encode=lossy) == Failure("retokenize_mismatch")
    assert splice_text(wrong_ids, None, decode=TOK.decode, encode=enc) == Failure("not_text")


@SETTINGS
@given(wrong=st.lists(st.integers(0, 9), max_size=10),
       recon=st.text(alphabet="abcxyz ", min_size=0, max_size=15))
def test_splice_text_never_crashes_and_decodes_to_the_reconstruction(wrong, recon):
    tok = PieceTokenizer()
    out = splice_text(wrong, recon, decode=tok.decode, encode=tok.encode)
    if isinstance(out, Spliced):
        assert list(out.ids[:out.prefix_len]) == wrong[:out.prefix_len]
        assert tok.decode(out.ids) == recon


# --- the synthetic task, end to end -------------------------------------------------------


def test_synthetic_construction_words_are_the_parser_tags():
    assert set(TAGS) <= set(S.CONSTRUCTION_WORDS)


@pytest.mark.parametrize("seed", range(6))
def test_synthetic_constructions_parse_splice_and_verify(seed):
    rng = np.random.default_rng(seed)
    for problem in S.generate_problems(20, seed, min_steps=1, max_steps=5):
        step = int(rng.integers(len(problem.steps)))
        wrong = S.render_solution(problem, S.slipped_values(problem, step, rng), rng, S.STUDENT_STYLE)
        right = S.reference_solution(problem, rng, S.STUDENT_STYLE)
        TOK.encode(S.synthetic_synthesis_prompt(problem, wrong, right))  # in the vocabulary
        target = S.construction_target(problem, wrong, rng)
        parsed = parse_construction(TOK.decode(TOK.encode(target)))
        assert isinstance(parsed, Parsed), target
        assert parsed.analysis.split()[0] == problem.steps[step].var
        wrong_ids = TOK.encode(wrong, add_bos=False) + [TOK.eos_id]
        recon_ids = TOK.encode(parsed.reconstruction, add_bos=False) + [TOK.eos_id]
        out = splice(wrong_ids, recon_ids, min_prefix=1)
        # the shared prefix is exactly the wrong solution up to and including its slip
        n_error = 8 * (step + 1) - 1  # "x = p op c = v" (7 words) + a connective between lines
        assert out.prefix_len == n_error, (wrong, parsed.reconstruction)
        assert TOK.decode(out.ids[n_error:]).split()[0] == "wait"
        assert S.check(TOK.decode(out.ids), problem.answer) and not S.check(wrong, problem.answer)
        assert S.first_error(problem, TOK.decode(out.ids)) == step  # the slip is kept verbatim
        via_text = splice_text(wrong_ids, parsed.reconstruction, decode=TOK.decode,
                               encode=lambda t: TOK.encode(t, add_bos=False))
        assert via_text.ids == out.ids[:-1] and via_text.prefix_len == n_error
