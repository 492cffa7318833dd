"""The last decoding kept for the editor's replay (lsp/decoding.py): tokens cut to what was shown."""

from diffucode.lsp.decoding import LastDecodings, end_position, fit_tokens
from diffucode.lsp.postprocess import postprocess


def test_tokens_are_cut_to_the_post_processed_suggestion():
    # the model repeats the indentation the user typed and runs past the closing bracket
    tokens = ["    ", "return", " a", " +", " b", ")", "\n", "x"]
    order = [3, 0, 1, 2, 4, 5, 6, 7]
    shown = postprocess("".join(tokens), "def f(a, b):\n    ", "\n")
    assert shown == "return a + b"
    assert fit_tokens(tokens, order, shown) == (["return", " a", " +", " b"], [0, 1, 2, 4])


def test_trailing_spaces_and_crlf_removed_inside_the_text_are_skipped():
    tokens = ["x = 1", "  ", "\r\n", "    y", " = 2"]
    shown = postprocess("".join(tokens), "def f():\n    ", "")
    assert shown == "x = 1\n    y = 2"
    assert fit_tokens(tokens, [0, 1, 2, 3, 4], shown) == (["x = 1", "\n", "    y", " = 2"], [0, 2, 3, 4])


def test_a_token_cut_in_the_middle_keeps_its_shown_part_and_the_walk_stops_at_a_mismatch():
    assert fit_tokens(["foo", "(bar", ")"], [1, 0, 2], "foo(ba") == (["foo", "(ba"], [1, 0])
    assert fit_tokens(["ab", "cd"], [0, 1], "aX") == (["a"], [0])
    assert fit_tokens(["ab"], [0], "") == ([], [])


def test_a_character_split_across_tokens_is_given_to_the_token_that_starts_it():
    assert fit_tokens(["s = '", "\ufffd", "\ufffd'"], [0, 1, 2], "s = '€'") == (["s = '", "€", "'"], [0, 1, 2])


def test_end_position_counts_lines_and_client_columns():
    assert end_position((4, 2), "abc", len) == (4, 5)
    assert end_position((4, 2), "abc\n  de", len) == (5, 4)
    assert end_position((0, 0), "x\n", len) == (1, 0)


def test_the_store_keeps_the_last_per_document_and_forgets():
    store = LastDecodings(size=2)
    store.put("a", "suggestion", ["x"], [0], 1, {"local": 1.0, "global": 1.0}, {"position": {"line": 0, "character": 0}})
    store.put("a", "fill", ["y"], [0], 1, None, {"range": {}})
    assert store.get("a")["kind"] == "fill" and store.get("a")["ar_ness"] is None
    store.put("b", "fill", [], [], 1, None, {"range": {}})
    store.put("c", "fill", [], [], 1, None, {"range": {}})
    assert store.get("a") is None and store.get("c") is not None  # the least recently used went
    store.forget("c")
    assert store.get("c") is None
