"""Golden cases for post-processing: each file holds the raw middle and the source with the
cursor and the expected completion marked as ⟪expected⟫ (⟪⟫: no item)."""

from pathlib import Path

import pytest

from diffucode.lsp.postprocess import first_unmatched_closer, postprocess

CASES = sorted((Path(__file__).parent / "golden" / "postprocess").glob("*.txt"))


def load(path: Path):
    text = path.read_text()
    raw = text.split("=== raw\n", 1)[1].split("\n=== source\n", 1)[0]
    source = text.split("\n=== source\n", 1)[1]
    before, rest = source.split("⟪", 1)
    expected, after = rest.split("⟫", 1)
    return raw, before, after, expected or None


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden(case):
    raw, before, after, expected = load(case)
    assert postprocess(raw, before, after) == expected


def test_there_are_golden_cases():
    assert len(CASES) >= 10


def test_unmatched_closer():
    assert first_unmatched_closer("f(x)]") == 4
    assert first_unmatched_closer("f('(')") is None
    assert first_unmatched_closer("a = [1, (2)] # )") is None
