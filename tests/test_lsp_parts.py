"""The language server's parts on their own: settings, cache, debounce, functions, context."""

import time

from diffucode.lsp.cache import CompletionCache
from diffucode.lsp.context import ContextBuilder, WorkspaceIndex, imported_paths
from diffucode.lsp.debounce import Debouncer
from diffucode.lsp.functions import enclosing_function
from diffucode.lsp.settings import Settings, parse


def test_settings_parse_nested_and_dotted_with_problems_named():
    s, problems = parse({"daemon": {"socket": "/tmp/x.sock", "spawn": False}, "maxNewTokens": 64,
                         "debounce.minMs": 10, "enabledLanguages": {"*": False, "python": True},
                         "temperature": -1, "unknown": 3})
    assert s.daemon_socket == "/tmp/x.sock" and s.daemon_spawn is False and s.max_new_tokens == 64
    assert s.debounce_min_ms == 10.0 and s.temperature == Settings().temperature
    assert s.language_enabled("python") and not s.language_enabled("rust")
    assert problems == ["setting diffucode.temperature = -1 is not a valid float"]
    s, problems = parse({"debounce": {"minMs": 900, "maxMs": 100}})
    assert s.debounce_min_ms == 100 and "exceeds debounce.maxMs" in problems[0]


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
