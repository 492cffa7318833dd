"""Context for a completion: the code around the cursor plus snippets from other files.

Snippets come from files the current one imports, recently edited documents and other open
documents, in that order. A workspace index (kept fresh with watchdog) finds imported files on
disk; it skips ignored folders, binary and very large files. The daemon cuts the result to a
token-exact budget (before_tokens / after_tokens), nearest the cursor first, so snippets sit at
the far end of the text before the cursor: they are the first to go when space runs out.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger("diffucode.lsp.context")

SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache",
             ".pytest_cache", "build", "dist", ".idea", ".vscode-test", "target", ".eggs"}
MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 20000
LINE_COMMENT = {"python": "#", "ruby": "#", "shellscript": "#", "yaml": "#", "toml": "#", "r": "#",
                "perl": "#", "makefile": "#", "dockerfile": "#", "elixir": "#"}
PY_IMPORT = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+import|import\s+([\w.]+))", re.M)
JS_IMPORT = re.compile(r"""(?:from\s+|require\(\s*|import\s+)['"](\.{1,2}/[^'"]+)['"]""")
JS_EXTENSIONS = ("", ".ts", ".tsx", ".js", ".jsx", ".mjs", "/index.ts", "/index.js")


def uri_to_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(4096)
    except OSError:
        return True


class WorkspaceIndex:
    """Text files under the workspace roots, by path, kept fresh on disk changes."""

    def __init__(self, roots: list[Path]):
        self.roots = [r.resolve() for r in roots if r.is_dir()]
        self.files: set[Path] = set()
        self.ignore: list[str] = []
        self._lock = threading.Lock()
        self._observer = None
        for root in self.roots:
            self._read_gitignore(root)
            self._scan(root)

    def _read_gitignore(self, root: Path) -> None:
        try:
            lines = (root / ".gitignore").read_text(errors="replace").splitlines()
        except OSError:
            return
        self.ignore += [l.strip().rstrip("/") for l in lines if l.strip() and not l.startswith(("#", "!"))]

    def ignored(self, path: Path) -> bool:
        parts = path.parts
        if any(p in SKIP_DIRS for p in parts):
            return True
        for pattern in self.ignore:
            pattern = pattern.lstrip("/")
            if any(fnmatch.fnmatch(p, pattern) for p in parts) or fnmatch.fnmatch(str(path), f"*/{pattern}"):
                return True
        return False

    def accept(self, path: Path) -> bool:
        try:
            return (path.is_file() and not self.ignored(path) and path.stat().st_size <= MAX_FILE_BYTES
                    and not is_binary(path))
        except OSError:
            return False

    def _scan(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not self.ignored(Path(dirpath) / d)]
            for name in filenames:
                if len(self.files) >= MAX_FILES:
                    return
                path = Path(dirpath) / name
                if self.accept(path):
                    self.files.add(path)

    def watch(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        index = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory or event.event_type in ("opened", "closed_no_write"):
                    return
                for attr in ("src_path", "dest_path"):
                    raw = getattr(event, attr, "")
                    if raw:
                        index.refresh(Path(os.fsdecode(raw)))

        self._observer = Observer()
        for root in self.roots:
            self._observer.schedule(Handler(), str(root), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    def refresh(self, path: Path) -> None:
        with self._lock:
            if self.accept(path):
                self.files.add(path)
            else:
                self.files.discard(path)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()

    def __contains__(self, path: Path) -> bool:
        with self._lock:
            return path in self.files


def imported_paths(path: Path, text: str, language_id: str, index: WorkspaceIndex) -> list[Path]:
    """Workspace files that `text` imports, nearest first."""
    found: list[Path] = []
    if language_id == "python":
        for m in PY_IMPORT.finditer(text):
            module = m.group(1) or m.group(2)
            dots = len(module) - len(module.lstrip("."))
            rel = Path(*module.lstrip(".").split(".")) if module.strip(".") else Path()
            bases = [path.parent.parents[dots - 2] if dots > 1 else path.parent] if dots else \
                [path.parent, *index.roots]
            for base in bases:
                for candidate in (base / rel.with_suffix(".py"), base / rel / "__init__.py"):
                    if candidate != path and candidate in index and candidate not in found:
                        found.append(candidate)
    else:
        for m in JS_IMPORT.finditer(text):
            for ext in JS_EXTENSIONS:
                candidate = (path.parent / (m.group(1) + ext)).resolve()
                if candidate != path and candidate in index and candidate not in found:
                    found.append(candidate)
                    break
    return found


def snippet_block(rel: str, text: str, language_id: str, max_chars: int) -> str:
    comment = LINE_COMMENT.get(language_id, "//")
    body = text[:max_chars]
    if len(text) > max_chars:
        body = body[: body.rfind("\n") + 1]
    return f"{comment} Path: {rel}\n{body.rstrip()}\n\n"


class ContextBuilder:
    """The text before and after the cursor, with snippets, for one completion request."""

    def __init__(self, index: WorkspaceIndex | None = None, max_snippets: int = 3, snippet_chars: int = 1500):
        self.index = index
        self.max_snippets, self.snippet_chars = max_snippets, snippet_chars
        self.edited: dict[str, float] = {}  # uri -> last edit time

    def touched(self, uri: str) -> None:
        self.edited[uri] = time.monotonic()

    def snippets(self, uri: str, text: str, language_id: str, open_docs: dict[str, str]) -> str:
        path = uri_to_path(uri)
        chosen: list[tuple[str, str]] = []  # (display name, text)
        if path is not None and self.index is not None:
            for p in imported_paths(path.resolve(), text, language_id, self.index):
                try:
                    chosen.append((self._rel(p), p.read_text(errors="replace")))
                except OSError:
                    continue
        by_recency = sorted((u for u in open_docs if u != uri), key=lambda u: -self.edited.get(u, 0.0))
        for u in by_recency:
            p = uri_to_path(u)
            name = self._rel(p) if p else u
            if all(name != c[0] for c in chosen):
                chosen.append((name, open_docs[u]))
        return "".join(snippet_block(name, body, language_id, self.snippet_chars)
                       for name, body in chosen[: self.max_snippets])

    def _rel(self, path: Path) -> str:
        for root in (self.index.roots if self.index else []):
            try:
                return str(path.resolve().relative_to(root))
            except ValueError:
                continue
        return path.name
