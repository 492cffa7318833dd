"""Golden cases for post-processing: each file holds the raw middle and the source with the
cursor and the expected completion marked as ⟪expected⟫ (⟪⟫: no item). A file may hold the raw
middle's tokens with their confidences, one a line ("0.91 " then the token as JSON), under a
header "=== tokens: ... cut below T" that names the threshold (lsp/settings.py min_confidence)."""

import json
import re
from pathlib import Path

import pytest

from diffucode.lsp.postprocess import cut_at_confidence, first_unmatched_closer, postprocess, repetition_cut

CASES = sorted((Path(__file__).parent / "golden" / "postprocess").glob("*.txt"))


def load(path: Path):
    text = path.read_text()
    raw = text.split("=== raw\n", 1)[1].split("\n=== ", 1)[0]
    source = text.split("\n=== source\n", 1)[1]
    before, rest = source.split("⟪", 1)
    expected, after = rest.split("⟫", 1)
    tokens = confidence = None
    threshold = 0.0
    if "\n=== tokens" in text:
        header, rows = text.split("\n=== tokens", 1)[1].split("\n=== source\n", 1)[0].split("\n", 1)
        threshold = float(re.search(r"cut below ([0-9.]+)", header).group(1))
        pairs = [row.split(" ", 1) for row in rows.split("\n")]
        confidence, tokens = [float(c) for c, _ in pairs], [json.loads(t) for _, t in pairs]
        assert "".join(tokens) == raw, path.name  # what the daemon sends: the answer is its tokens' text
    return raw, before, after, expected or None, tokens, confidence, threshold


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden(case):
    raw, before, after, expected, tokens, confidence, threshold = load(case)
    assert postprocess(raw, before, after, tokens, confidence, threshold) == expected


def test_there_are_golden_cases():
    assert len(CASES) >= 10


def test_unmatched_closer():
    assert first_unmatched_closer("f(x)]") == 4
    assert first_unmatched_closer("f('(')") is None
    assert first_unmatched_closer("a = [1, (2)] # )") is None


def test_confidence_cut_needs_tokens_that_join_to_the_text():
    tokens, conf = ["x", " = ", "1"], [0.9, 0.9, 0.1]
    assert cut_at_confidence("x = 1", tokens, conf, 0.5) == "x = "
    assert cut_at_confidence("x = 1", tokens, conf, 0.0) == "x = 1"  # 0: no cut
    assert cut_at_confidence("x = 1", tokens, conf, 0.05) == "x = 1"  # all at least that confident
    assert cut_at_confidence("x = 2", tokens, conf, 0.5) == "x = 2"  # tokens of another text: uncut
    assert cut_at_confidence("s = '\u20ac'", ["s = '", "\ufffd", "\ufffd'"], [0.9, 0.1, 0.9], 0.5) == "s = '\u20ac'"
    assert cut_at_confidence("foo_bar", ["foo", "_bar"], [0.9, 0.1], 0.5) == ""  # back to the word's start
    assert cut_at_confidence("foo_bar", ["foo", "_bar"], [0.9, 0.1], 0.5, whole_words=False) == "foo"
    assert postprocess("x = 1", "", "", tokens, conf, 0.5) == "x ="
    assert postprocess("x = 1", "", "") == "x = 1"  # no confidences: no cut


def test_repetition_is_degenerate_only_with_words_enough_times():
    assert repetition_cut("f(a, b)") is None
    assert repetition_cut("[0, 0, 0, 0, 0, 0]") is None  # numbers
    assert repetition_cut("(None, None, None, None)") is None  # literals
    assert repetition_cut('"%s, %s, %s, %s" % t') is None  # one letter
    assert repetition_cut("# ----------------") is None  # punctuation
    assert repetition_cut("x = 0xFFFFFF") is None  # a number, though its digits repeat
    assert repetition_cut("os.path.join(os.path.join(a, b), c)") is None  # twice is not degenerate
    assert repetition_cut("pass\npass\npass\npass") == 0
    assert repetition_cut("tuple[int, int, int]") is None  # three, and the answer goes on
    assert repetition_cut("x = f(1, value, value, value") == len("x = f(1, value")  # three to the end
    text = "# the list of the list of the list of the"  # a longer n-gram: 3 times
    assert text[:repetition_cut(text)] == "# the list of "
