"""The language server's parts on their own: settings, cache, debounce, functions, context, the
re-indentation of proposals."""

import dataclasses
import json
import time
from pathlib import Path

from lsprotocol import types as lsp
from pygls.workspace import TextDocument
from pygls.workspace.position_codec import PositionCodec

from diffucode.lsp.cache import CompletionCache
from diffucode.lsp.context import ContextBuilder, WorkspaceIndex, imported_paths
from diffucode.lsp.debounce import Debouncer
from diffucode.lsp.decoding import reindent_tokens
from diffucode.lsp.functions import body_start, enclosing_function
from diffucode.lsp.indent import indent_style, parse_check, reindent
from diffucode.lsp.server import client_columns, offset_at
from diffucode.lsp.settings import KEYS, Settings, parse

PACKAGE_JSON = Path(__file__).resolve().parent.parent / "extension" / "package.json"


def extension_settings() -> dict:
    """The "diffucode.*" settings the VS Code extension declares, by key without the prefix."""
    properties = json.loads(PACKAGE_JSON.read_text())["contributes"]["configuration"]["properties"]
    return {k.removeprefix("diffucode."): v for k, v in properties.items()}


def test_settings_parse_nested_and_dotted_with_problems_named():
    s, problems = parse({"daemon": {"socket": "/tmp/x.sock", "spawn": False}, "maxNewTokens": 64,
                         "debounce.minMs": 10, "enabledLanguages": {"*": False, "python": True},
                         "temperature": -1, "unknown": 3})
    assert s.daemon_socket == "/tmp/x.sock" and s.daemon_spawn is False and s.max_new_tokens == 64
    assert s.debounce_min_ms == 10.0 and s.temperature == Settings().temperature
    assert s.language_enabled("python") and not s.language_enabled("rust")
    assert problems == ["setting diffucode.temperature = -1 is not a number >= 0 or null"]
    s, problems = parse({"debounce": {"minMs": 900, "maxMs": 100}})
    assert s.debounce_min_ms == 100 and "exceeds debounce.maxMs" in problems[0]
    s, problems = parse({"context": {"afterTokens": 0}, "steps": None, "maxNewTokens": 2.5, "model": 3})
    assert s.after_tokens == 0 and s.steps is None and s.max_new_tokens == Settings().max_new_tokens
    assert problems == ["setting diffucode.maxNewTokens = 2.5 is not an integer >= 1",
                        "setting diffucode.model = 3 is not a string"]


def test_settings_defaults_and_minimums_are_the_extensions():
    declared = extension_settings()
    defaults = Settings()
    for key, attr in KEYS.items():
        assert declared[key]["default"] == getattr(defaults, attr), key
        if "minimum" in declared[key]:  # the least value the settings UI allows is accepted, one less is not
            least = declared[key]["minimum"]
            s, problems = parse({key: least})
            assert getattr(s, attr) == least and not [p for p in problems if f".{key} =" in p], key
            assert parse({key: least - 1})[1], key
    assert {f.name for f in dataclasses.fields(Settings)} == set(KEYS.values())


def test_cache_exact_hit_type_through_and_lru():
    c = CompletionCache(size=2)
    c.put("u", "def f(", ")", ["a, b", "x"])
    assert c.get("u", "def f(", ")") == ["a, b", "x"]
    assert c.get("u", "def f(a", ")") == [", b"]  # typed "a": the rest of the matching item
    assert c.get("u", "def f(q", ")") is None
    assert c.get("u", "def f(a, b", ")") is None  # fully typed: nothing left to show
    assert c.get("v", "def f(a", ")") is None and c.get("u", "def f(a", "]") is None
    c.put("u", "1", "", ["x"])
    c.put("u", "2", "", ["y"])
    assert c.get("u", "def f(", ")") is None  # evicted
    c.clear("u")
    assert c.get("u", "2", "") is None


def test_debounce_adapts_within_bounds():
    d = Debouncer(min_ms=50, max_ms=600)
    assert d.delay_ms() == 50
    for i in range(10):
        d.keystroke(now=i * 0.2)  # 200 ms between keys
    assert round(d.delay_ms()) == 300
    d.latency(800)
    assert round(d.delay_ms()) == 500
    for _ in range(20):
        d.rejected()
    assert d.delay_ms() == 600
    for _ in range(50):
        d.accepted()
    assert 50 <= d.delay_ms() < 300


def test_enclosing_function_python_and_braces():
    py = "import os\n\n@decorator\ndef f(x):\n    y = x\n    return y\n\nz = 1\n"
    assert enclosing_function(py, 4, "python") == (2, 5)
    assert enclosing_function(py, 7, "python") is None
    broken = "def f(x):\n    y = (x\n    return y\n\nz = 1\n"  # mid-edit: no parse
    assert enclosing_function(broken, 1, "python") == (0, 2)
    js = "const a = 1;\nfunction add(a, b) {\n  if (a) {\n    return a + b;\n  }\n}\n"
    assert enclosing_function(js, 3, "javascript") == (1, 5)
    assert enclosing_function(js, 0, "javascript") is None
    # what Refine rewrites: the body, not the signature (decorators and a signature over two lines included)
    two = "@cache\ndef g(a,\n      b):\n    c = a\n    return c\n"
    assert enclosing_function(two, 4, "python") == (0, 4) and body_start(two, 0, 4, "python") == 3
    assert body_start("def h(): return 1\n", 0, 0, "python") == 0  # one line: all of it
    assert body_start(js, 1, 5, "javascript") == 2


def test_positions_in_the_negotiated_encoding():
    text = "x = 'é😀' + y\nnext\n"  # é: 2 UTF-8 bytes, 1 UTF-16 unit; 😀: 4 bytes, 2 units
    cursor = text.index(" + y")
    columns = {"utf-8": 12, "utf-16": 9, "utf-32": 8}
    for encoding, column in columns.items():
        doc = TextDocument("file:///x.py", text, position_codec=PositionCodec(encoding))
        assert offset_at(doc, lsp.Position(line=0, character=column)) == cursor, encoding
        assert client_columns(doc, text[:cursor]) == column, encoding
        assert offset_at(doc, lsp.Position(line=5, character=0)) == len(text)  # past the end: the end


def test_workspace_index_reads_gitignore_as_git_does(tmp_path):
    files = {
        ".gitignore": "*.log\n!keep.log\n**/generated/\n/top_only.py\nout/\n!out/keep.py\n",
        "a.log": "", "keep.log": "", "top_only.py": "", "src/top_only.py": "", "out/keep.py": "",
        "src/generated/x.py": "", "src/deep/generated/y.py": "",
        "src/.gitignore": "local.py\n!special.log\n/anchored.py\n",
        "src/local.py": "", "local.py": "", "src/special.log": "", "src/anchored.py": "",
        "src/deep/anchored.py": "", "src/deep/main.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text or "x = 1\n")
    index = WorkspaceIndex([tmp_path])
    names = {p.relative_to(tmp_path).as_posix() for p in index.files}
    assert names == {".gitignore", "keep.log", "src/top_only.py", "src/.gitignore", "local.py",
                     "src/special.log", "src/deep/anchored.py", "src/deep/main.py"}
    # what watchdog reports is judged the same way: a file in an ignored folder stays out
    for name in ("out/keep.py", "src/generated/x.py", "src/local.py"):
        index.refresh(tmp_path / name)
        assert tmp_path / name not in index, name
    # a new nested .gitignore takes effect: its folder's files are judged again
    (tmp_path / "src" / "deep" / ".gitignore").write_text("main.py\n!generated/\n")
    index.refresh(tmp_path / "src" / "deep" / ".gitignore")
    assert tmp_path / "src" / "deep" / "main.py" not in index
    assert tmp_path / "src" / "deep" / "generated" / "y.py" in index  # the nearer rule wins
    assert tmp_path / "src" / "deep" / "anchored.py" in index


def test_workspace_index_imports_and_freshness(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "util.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.js").write_text("x")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    (tmp_path / "big.py").write_text("x = 1\n" * 100000)
    (tmp_path / ".gitignore").write_text("secret/\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "keys.py").write_text("KEY = 1\n")
    main = tmp_path / "main.py"
    main.write_text("from pkg.util import helper\nimport os\n")
    index = WorkspaceIndex([tmp_path])
    names = {p.relative_to(tmp_path).as_posix() for p in index.files}
    assert names == {"pkg/__init__.py", "pkg/util.py", "main.py", ".gitignore"}
    assert imported_paths(main, main.read_text(), "python", index) == [tmp_path / "pkg" / "util.py"]
    index.watch()
    try:
        new = tmp_path / "pkg" / "fresh.py"
        new.write_text("VALUE = 2\n")
        deadline = time.monotonic() + 10
        while new not in index:
            assert time.monotonic() < deadline, "watchdog did not report the new file"
            time.sleep(0.05)
        new.unlink()
        while new in index:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        index.stop()
    builder = ContextBuilder(index)
    text = builder.snippets(main.as_uri(), main.read_text(), "python", {"file:///other.py": "y = 2\n"})
    assert text.startswith("# Path: pkg/util.py\ndef helper():") and "# Path: other.py\ny = 2" in text


def test_text_before_the_cursor_starts_at_a_stable_line_start():
    from diffucode.lsp.server import START_STRIDE, stable_start

    text = "".join(f"value_{i} = compute({i}, {i * 7})\n" for i in range(400))
    assert stable_start(text, 500, 4000) == 0
    starts = set()
    for offset in range(9000, 9000 + START_STRIDE // 2):  # typing at the cursor
        start = stable_start(text, offset, 6000)
        assert offset - 6000 <= start <= offset and text[start - 1] == "\n"
        starts.add(start)
    assert len(starts) <= 2  # it moves at most once in half a stride (only when the grid is crossed)
    one_line = "x" * 10000
    assert stable_start(one_line, 9000, 6000) % START_STRIDE == 0  # no line start: the grid alone


def test_reindent_moves_the_result_to_the_block_it_replaces():
    block = "    total = a + b\n    return total"
    # issue 19: a first token's space made `     value = 1` in a 4-space block; the next lines were right
    assert reindent("     value = 1\n    return value", block, "", False) == "    value = 1\n    return value"
    # the selection started after the indentation, which stays in the document
    assert reindent(" value = 1\n    return value", block.lstrip(), "    ", False) == "value = 1\n    return value"
    # a whole block one level too deep moves as a whole, relative indentation kept
    deeper = "        if x:\n            y()\n        z()"
    assert reindent(deeper, block, "", False) == "    if x:\n        y()\n    z()"
    # tabs where the file uses them (a model's 4 spaces are one tab); blank lines stay as they are
    assert reindent("    x = 1\n\n        y()", "\tz = 2", "", True) == "\tx = 1\n\n\t\ty()"
    # after code on the line: nothing to measure against, the first line is left alone
    assert reindent(" foo(1)\n\tbar()", "x", "y = ", False) == " foo(1)\n    bar()"
    # a blank selection: the model saw the code around it, its indentation is kept
    assert reindent("   x = 1", "\n", "", False) == "   x = 1"
    # never below column 0; a first line that is blank measures from the next one
    assert reindent("\n    a\n  b\nc", "old", "", False) == "\na\nb\nc"
    assert reindent("", block, "", False) == ""


def test_indent_style_and_parse_check():
    assert indent_style("def f():\n  if x:\n    y\n") == (False, 2)
    assert indent_style("def f():\n\tx\n\tif y:\n\t\tz\n") == (True, 4)
    assert indent_style("x = 1\n") == (False, 4)
    before = "def f():\n    return 1\n"
    assert parse_check("python", before, before.replace("    return", "    x = 1\n     return")) == (
        False, "line 3: unexpected indent")
    assert parse_check("python", before, before) == (True, None)
    assert parse_check("python", "def f(:\n", "def f(:\n    x") == (None, None)  # broken before: not judged
    assert parse_check("javascript", "f(", "f((") == (None, None)


def test_reindented_tokens_join_to_the_new_text():
    tokens, order = ["    ", " value", " =", " 1", "\n", "    ", "return", " value"], list(range(8))
    new = reindent("".join(tokens), "    total = a + b\n    return total", "", False)
    assert reindent_tokens(tokens, order, new) == (
        ["    value", " =", " 1", "\n", "    return", " value"], [1, 2, 3, 4, 6, 7])
    assert reindent_tokens(["\tx", "\n", "\t\ty"], [0, 1, 2], "    x\n        y") == (
        ["    x", "\n", "        y"], [0, 1, 2])
    # not a re-indentation: cut to the text as a suggestion is
    assert reindent_tokens(["ab", "cd"], [0, 1], "aX") == (["a"], [0])
