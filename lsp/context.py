"""Context for a completion: the code around the cursor plus snippets from other files.

Snippets come from files the current one imports, recently edited documents and other open
documents, in that order. A workspace index (kept fresh with watchdog) finds imported files on
disk; it skips what git ignores (every .gitignore, read by pathspec as git reads it: `!`, `**`,
anchored and folder-only patterns, nested files relative to their folder), well-known tool
folders, binary and very large files. The daemon cuts the result to a token-exact budget
(before_tokens / after_tokens), nearest the cursor first, so snippets sit at the far end of the
text before the cursor: they are the first to go when space runs out.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from pathspec import GitIgnoreSpec

from diffucode.daemon.rpc.snippets import snippet_block  # shared with the HTTP dialects (llama.cpp input_extra)

log = logging.getLogger("diffucode.lsp.context")

SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache",
             ".pytest_cache", "build", "dist", ".idea", ".vscode-test", "target", ".eggs"}
MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 20000
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
        self.gitignores: dict[Path, GitIgnoreSpec] = {}  # folder -> the rules of its .gitignore
        self._lock = threading.Lock()
        self._observer = None
        for root in self.roots:
            self._scan(root)

    def _read_gitignore(self, folder: Path) -> None:
        try:
            lines = (folder / ".gitignore").read_text(errors="replace").splitlines()
        except OSError:
            self.gitignores.pop(folder, None)
            return
        self.gitignores[folder] = GitIgnoreSpec.from_lines(lines)

    def _matched(self, path: Path, is_dir: bool) -> bool:
        """What the .gitignore files say about `path` itself: the nearest one with a rule for it
        decides (within a file the last matching rule wins, so `!` re-includes)."""
        for folder in path.parents:
            spec = self.gitignores.get(folder)
            if spec is not None:
                rel = path.relative_to(folder).as_posix() + ("/" if is_dir else "")
                verdict = spec.check_file(rel).include
                if verdict is not None:
                    return verdict
            if folder in self.roots:
                break
        return False

    def ignored(self, path: Path, is_dir: bool = False) -> bool:
        """Whether git would ignore `path`: a tool folder, a match, or inside an ignored folder
        (as in git, no rule re-includes a file whose folder is ignored)."""
        root = next((r for r in self.roots if path.is_relative_to(r)), None)
        rel = path.relative_to(root) if root is not None else path
        if any(p in SKIP_DIRS for p in rel.parts):
            return True
        if root is None:
            return False
        folders = [root.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
        return any(self._matched(f, True) for f in folders) or self._matched(path, is_dir)

    def accept(self, path: Path) -> bool:
        return not self.ignored(path) and self._text_file(path)

    def _scan(self, top: Path) -> None:
        """Index the files under `top` (not itself ignored); ignored folders are not entered,
        so their files need no check of their own."""
        for dirpath, dirnames, filenames in os.walk(top):
            folder = Path(dirpath)
            self._read_gitignore(folder)
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not self._matched(folder / d, True)]
            for name in filenames:
                if len(self.files) >= MAX_FILES:
                    return
                path = folder / name
                if not self._matched(path, False) and self._text_file(path):
                    self.files.add(path)

    @staticmethod
    def _text_file(path: Path) -> bool:
        try:
            return path.is_file() and path.stat().st_size <= MAX_FILE_BYTES and not is_binary(path)
        except OSError:
            return False

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
            if path.name == ".gitignore":  # new rules: drop what they ignore, add what they let in
                self._read_gitignore(path.parent)
                self.files = {f for f in self.files if not self.ignored(f)}
                if not self.ignored(path.parent, True):
                    self._scan(path.parent)
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
