"""\\boxed{} extraction: last top-level box, nested and escaped braces, unterminated boxes."""

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.rewards.boxed import extract_boxed, scan_boxes


def test_last_box_wins_over_earlier_drafts():
    text = r"First try \boxed{12}. Wait, that is wrong. The answer is \boxed{13}."
    assert extract_boxed(text) == "13"
    assert scan_boxes(text).boxes == ("12", "13")


def test_nested_braces_are_kept_whole():
    assert extract_boxed(r"so \boxed{\frac{1}{2^{10}}} done") == r"\frac{1}{2^{10}}"
    assert extract_boxed(r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}") == (
        r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"
    )


def test_escaped_braces_do_not_change_nesting():
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    # an unbalanced escaped brace inside a box is still one box
    assert extract_boxed(r"\boxed{\left\{ x \right.} tail") == r"\left\{ x \right."
    # "\\{" is a line break followed by a real brace: that brace opens a group
    assert extract_boxed(r"\boxed{a \\{b} c}") == r"a \\{b} c"


def test_box_inside_box_is_one_top_level_box():
    assert extract_boxed(r"\boxed{\boxed{5}}") == r"\boxed{5}"
    assert scan_boxes(r"\boxed{\boxed{5}} and \boxed{6}").boxes == (r"\boxed{5}", "6")


def test_fbox_and_space_before_brace_count_as_boxes():
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"\boxed {8}") == "8"


def test_content_is_stripped():
    assert extract_boxed(r"\boxed{  42 }") == "42"


def test_no_box_gives_none():
    assert extract_boxed("The answer is 42.") is None
    assert extract_boxed("") is None
    assert extract_boxed(r"\boxed 42") is None  # brace-less form is not a box here


def test_unterminated_last_box_gives_none_even_after_a_closed_box():
    text = r"Draft \boxed{3}. Final: \boxed{\frac{1}{2}"
    scan = scan_boxes(text)
    assert scan.unterminated and scan.boxes == ("3",)
    assert extract_boxed(text) is None


def test_stray_closing_braces_outside_boxes_are_ignored():
    assert extract_boxed(r"}}} \boxed{9} }}") == "9"


def test_megabyte_of_open_boxes_is_linear_and_unterminated():
    text = r"\boxed{" * 150_000  # ~1 MB; a quadratic scan would not finish
    assert extract_boxed(text) is None
    assert scan_boxes(text).unterminated


_SAFE = st.text(alphabet=string.ascii_letters + string.digits + " +-*/^_=,.()[]", max_size=30)


@st.composite
def _balanced(draw, depth=0):
    """Random LaTeX-ish content with balanced braces."""
    parts = draw(st.lists(_SAFE, min_size=1, max_size=3))
    if depth < 3 and draw(st.booleans()):
        parts.insert(1, "{" + draw(_balanced(depth + 1)) + "}")
    return "".join(parts)


@given(prefix=_SAFE, content=_balanced(), suffix=_SAFE)
@settings(max_examples=200, deadline=None)
def test_any_balanced_content_round_trips(prefix, content, suffix):
    assert extract_boxed(prefix + r"\boxed{" + content + "}" + suffix) == content.strip()


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_raises(text):
    result = extract_boxed(text)
    assert result is None or isinstance(result, str)
