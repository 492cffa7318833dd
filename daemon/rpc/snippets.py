"""How code from other files is laid out in the text a request sends, before the code itself.

The language server (lsp/context.py) and the daemon's HTTP dialects (serve/dialects.py, for
llama.cpp's `input_extra`) both put snippets of other files at the far end of the text before
the cursor, one block each: a line comment naming the file, then its text. Written once here,
where both rooms may import it (no torch, no engine), so the model sees one layout whichever
client sent the request. The daemon cuts context nearest the cursor first, so these blocks are
the first text to go when the budget runs out.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# languages whose line comment is not `//` (LSP language ids)
LINE_COMMENT = {"python": "#", "ruby": "#", "shellscript": "#", "yaml": "#", "toml": "#", "r": "#",
                "perl": "#", "makefile": "#", "dockerfile": "#", "elixir": "#"}
# file name -> language id, for clients that send file names but no language (llama.cpp's input_extra)
LANGUAGE_OF_SUFFIX = {".py": "python", ".pyi": "python", ".rb": "ruby", ".sh": "shellscript",
                      ".bash": "shellscript", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".r": "r",
                      ".pl": "perl", ".ex": "elixir", ".exs": "elixir"}
LANGUAGE_OF_NAME = {"makefile": "makefile", "dockerfile": "dockerfile"}


def snippet_block(rel: str, text: str, language_id: str, max_chars: int) -> str:
    """One file's snippet: `<comment> Path: rel`, then at most max_chars of its text, cut at a
    line end, then a blank line."""
    comment = LINE_COMMENT.get(language_id, "//")
    body = text[:max_chars]
    if len(text) > max_chars:
        body = body[: body.rfind("\n") + 1]
    return f"{comment} Path: {rel}\n{body.rstrip()}\n\n"


def language_of(filename: str) -> str:
    """The language id a file name suggests ("" when unknown: its snippets get `//` comments)."""
    path = PurePosixPath(filename.replace("\\", "/"))
    return LANGUAGE_OF_NAME.get(path.name.lower()) or LANGUAGE_OF_SUFFIX.get(path.suffix.lower(), "")
