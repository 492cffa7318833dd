"""Find the functions a repository's tests exercise, and cut them into prompt and answer.

`diffucode tune` trains on the user's own code: it masks the body of a function (or one line of
it), lets the model fill it in, and scores the answer with the tests. Only functions the tests
actually call can be scored that way, so `covered_functions` runs the test command once in the
sandbox with a tiny profiler loaded through `sitecustomize`, and `find_targets` keeps the
functions (and methods) whose definition it saw run. `split_targets` holds some files out, so
that progress is measured on code the model did not train on.

It knows nothing of models, tokens or rewards: targets are plain text, `before + body + after`
being the file exactly. No torch here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from diffucode.daemon.errors import InputError
from diffucode.tune.sandbox import SKIP_DIRS, Sandbox, TestRun

MODES = ("body", "lines")
MAX_LINES_LIMIT = 1000

# Loaded by every python the test command starts (PYTHONPATH), before the tests: records the
# (file, first line) of each Python function called whose file is under the copy's root, and
# writes them as JSON at exit. Uses sys.monitoring (3.12+, each code object reported once) when
# there is one, else sys.setprofile. Then imports the sitecustomize it shadows, if any.
_SITECUSTOMIZE = r'''
import atexit, json, os, sys, threading

def _diffucode_trace():
    root = os.environ.get("DIFFUCODE_TRACE_ROOT")
    out = os.environ.get("DIFFUCODE_TRACE_OUT")
    if not root or not out:
        return
    seen = set()

    def save():
        real = {}
        found = set()
        for filename, line in list(seen):
            if filename.startswith("<"):  # <frozen ...>, <string>: not files
                continue
            if filename not in real:
                real[filename] = os.path.realpath(filename)
            path = real[filename]
            if path.startswith(root + os.sep):
                found.add((os.path.relpath(path, root).replace(os.sep, "/"), line))
        try:
            with open(os.path.join(out, "trace-%d.json" % os.getpid()), "w") as f:
                json.dump(sorted(found), f)
        except OSError:
            pass

    atexit.register(save)
    mon = getattr(sys, "monitoring", None)
    if mon is not None:
        tool = None
        for t in (mon.COVERAGE_ID, mon.PROFILER_ID, 3, 4):
            try:
                mon.use_tool_id(t, "diffucode-tune")
                tool = t
                break
            except ValueError:
                continue
        if tool is not None:
            def start(code, offset):
                if not code.co_name.startswith("<"):
                    seen.add((code.co_filename, code.co_firstlineno))
                return mon.DISABLE
            mon.register_callback(tool, mon.events.PY_START, start)
            mon.set_events(tool, mon.events.PY_START)
            return

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if not code.co_name.startswith("<"):
                seen.add((code.co_filename, code.co_firstlineno))

    sys.setprofile(profile)
    threading.setprofile(profile)

_diffucode_trace()
del _diffucode_trace

def _diffucode_chain():
    # import the sitecustomize this one shadows (the venv's or the repository's), if any
    import importlib
    here = os.path.dirname(os.path.abspath(__file__))
    mod = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        if mod is not None:
            sys.modules["sitecustomize"] = mod
    finally:
        sys.path[:] = saved

_diffucode_chain()
del _diffucode_chain
'''


def covered_functions(sandbox: Sandbox) -> set[tuple[str, int]]:
    """(repository-relative path, first line) of every Python function of the repository that
    ran while the test command ran once in `sandbox`. The first line is the code object's: the
    `def` line, or the first decorator's for a decorated function. Empty when no Python function
    of the repository ran (a non-Python command, or tests that import an installed copy)."""
    return trace_tests(sandbox)[0]


def trace_tests(sandbox: Sandbox) -> tuple[set[tuple[str, int]], TestRun]:
    """`covered_functions`, with the test run it came from (the baseline pass rate: tests that
    fail on the untouched repository make a noisy reward)."""
    trace_dir = sandbox.scratch / "trace"
    out_dir = sandbox.scratch / "trace-out"
    for d in (trace_dir, out_dir):
        d.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("trace-*.json"):
        old.unlink()
    (trace_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    run = sandbox.run({}, pythonpath=[trace_dir],
                      extra_env={"DIFFUCODE_TRACE_ROOT": os.path.realpath(sandbox.copy),
                                 "DIFFUCODE_TRACE_OUT": str(out_dir)})
    covered: set[tuple[str, int]] = set()
    for f in sorted(out_dir.glob("trace-*.json")):
        try:
            covered.update((str(p), int(n)) for p, n in json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
    return covered, run


@dataclass
class Target:
    """One function to fill in: `before + body + after` is the file's text exactly.

    `body` is the middle the model writes: in mode "body" the function's statements after the
    signature and the docstring (which stay in `before` as context), through the end of the
    function's last line with its newline; in mode "lines" one line of those. `first_line` and
    `last_line` are the 1-based lines of the middle in the file."""

    path: str
    name: str
    before: str
    body: str
    after: str
    first_line: int
    last_line: int

    @property
    def text(self) -> str:
        return self.before + self.body + self.after


@dataclass
class Scan:
    """What `scan_repo` found: the targets, the Python files read, and those skipped because they
    could not be read or parsed (repository-relative paths)."""

    targets: list[Target] = field(default_factory=list)
    files: int = 0
    unparsable: list[str] = field(default_factory=list)


def is_test_file(rel: str) -> bool:
    """Test code and packaging scripts are not targets: test_*.py, *_test.py, conftest.py,
    setup.py, anything under a tests/ or test/ folder."""
    parts = rel.split("/")
    name = parts[-1]
    return (name.startswith("test_") or name.endswith("_test.py") or name in ("conftest.py", "setup.py")
            or any(p in ("tests", "test") for p in parts[:-1]))


def python_files(repo: Path) -> list[str]:
    """Repository-relative paths of the .py files that are not tests, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), repo).replace(os.sep, "/")
                if not is_test_file(rel):
                    found.append(rel)
    return sorted(found)


def _functions(tree: ast.Module):
    """(qualified name, node) of module-level functions and of methods, classes nested in classes
    included; functions defined inside functions are part of their parent's body."""
    def walk(nodes, prefix):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + node.name, node
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, prefix + node.name + ".")
    yield from walk(tree.body, "")


def _start_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno] + [d.lineno for d in decorators])


def _has_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = fn.body[0]
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str))


def _body_span(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int] | None:
    """1-based first and last line of the body without the docstring; None when the body cannot
    be cut by whole lines (only a docstring, or a statement on the `def` or docstring line)."""
    stmts = fn.body[1:] if _has_docstring(fn) else fn.body
    if not stmts:
        return None
    first = _start_line(stmts[0])
    header_end = fn.body[0].end_lineno if _has_docstring(fn) else fn.lineno
    if _has_docstring(fn) and first <= header_end:
        return None
    if not _has_docstring(fn) and first <= fn.lineno:
        return None
    return first, fn.end_lineno


def _line_starts(text: str) -> list[int]:
    """Offset of the start of each line (index 0 is line 1), plus the end of the text."""
    starts = [0]
    pos = text.find("\n")
    while pos != -1:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    if starts[-1] != len(text):
        starts.append(len(text))
    return starts


def _is_code_line(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def scan_repo(repo: Path, covered: set[tuple[str, int]] | None = None, mode: str = "body",
              max_lines: int = 30, seed: int = 0) -> Scan:
    """`find_targets` with the count of files read and the list of those skipped."""
    if mode not in MODES:
        raise InputError(f"target mode {mode!r} is not one of {', '.join(MODES)}")
    if not 1 <= int(max_lines) <= MAX_LINES_LIMIT:
        raise InputError(f"max_lines {max_lines} must be between 1 and {MAX_LINES_LIMIT}")
    repo = Path(repo)
    if not repo.is_dir():
        raise InputError(f"--repo {str(repo)!r} is not a directory")
    scan = Scan()
    for rel in python_files(repo):
        scan.files += 1
        try:
            text = (repo / rel).read_bytes().decode("utf-8")
            tree = ast.parse(text, filename=rel)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
            scan.unparsable.append(rel)
            continue
        if "\r" in text.replace("\r\n", ""):
            scan.unparsable.append(rel)  # old Mac line ends: ast's lines are not ours
            continue
        starts = _line_starts(text)
        for name, fn in _functions(tree):
            if covered is not None and (rel, fn.lineno) not in covered and (rel, _start_line(fn)) not in covered:
                continue
            span = _body_span(fn)
            if span is None or span[1] >= len(starts) or not 1 <= span[1] - span[0] + 1 <= max_lines:
                continue
            first, last = span
            if mode == "lines":
                candidates = [n for n in range(first, last + 1)
                              if _is_code_line(text[starts[n - 1]:starts[n]])]
                if not candidates:
                    continue
                first = last = random.Random(f"{seed}:{rel}:{name}").choice(candidates)
            a, b = starts[first - 1], starts[last]
            scan.targets.append(Target(path=rel, name=name, before=text[:a], body=text[a:b], after=text[b:],
                                       first_line=first, last_line=last))
    scan.targets.sort(key=lambda t: (t.path, t.first_line, t.name))
    return scan


def find_targets(repo: Path, covered: set[tuple[str, int]] | None, mode: str = "body", max_lines: int = 30,
                 seed: int = 0) -> list[Target]:
    """The functions and methods of `repo` (test files skipped) whose body, docstring left out,
    is 1..max_lines lines and, when `covered` is given, whose definition ran under the tests.
    mode "body": the whole body is the middle; "lines": one code line of it, chosen from `seed`.
    Sorted by path and line. Files that do not parse are skipped (`scan_repo` lists them)."""
    return scan_repo(repo, covered, mode=mode, max_lines=max_lines, seed=seed).targets


def _file_key(path: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def split_targets(targets: list[Target], held_out_fraction: float = 0.25,
                  seed: int = 0) -> tuple[list[Target], list[Target]]:
    """(train, held_out), split by file: all the functions of a file go to one side. Files are
    ordered by a hash of (seed, path) and the first round(fraction * files) are held out; with
    two files or more and 0 < fraction < 1 each side gets at least one file."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise InputError(f"held-out fraction {held_out_fraction} must be between 0 and 1")
    files = sorted({t.path for t in targets}, key=lambda p: _file_key(p, seed))
    n = round(held_out_fraction * len(files))
    if len(files) >= 2 and 0.0 < held_out_fraction < 1.0:
        n = min(max(n, 1), len(files) - 1)
    held = set(files[:n])
    return [t for t in targets if t.path not in held], [t for t in targets if t.path in held]
