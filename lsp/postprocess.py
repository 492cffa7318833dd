"""Post-processing of a raw middle into what the editor shows as ghost text.

What users of every completion tool complain about is what this fixes (editor.md): text that
repeats the code after the cursor, wrong indentation, brackets closed that the completion did
not open, completions that run past the end of the current block, trailing whitespace, and
empty items. Pure string functions, tested with golden files (tests/golden/postprocess/).
"""

from __future__ import annotations

OPENERS, CLOSERS = "([{", ")]}"
PAIRS = dict(zip(CLOSERS, OPENERS))


def indent_of(line: str) -> int:
    """Columns of leading whitespace (a tab counts 4)."""
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width += 4
        else:
            break
    return width


def first_unmatched_closer(text: str) -> int | None:
    """Index of the first bracket in text that closes something opened before the text
    (outside string literals), or None."""
    stack: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote or ch == "\n":
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t\n"):
            while i < len(text) and text[i] != "\n":  # a comment: skip to the end of the line
                i += 1
            continue
        elif ch in OPENERS:
            stack.append(ch)
        elif ch in CLOSERS:
            if not stack or stack[-1] != PAIRS[ch]:
                return i
            stack.pop()
        i += 1
    return None


def postprocess(raw: str, before: str, after: str) -> str | None:
    """The text to insert at the cursor, or None when nothing worth showing is left."""
    line_before = before.rsplit("\n", 1)[-1]
    line_after = after.split("\n", 1)[0]
    mid_line = line_after.strip() != ""
    text = raw.replace("\r\n", "\n")

    # Indentation: the user has typed the indentation of this line; do not add it twice.
    if line_before.strip() == "":
        text = text.lstrip(" \t") if text[:1] in " \t" else text

    if mid_line:
        text = text.split("\n", 1)[0]
        # the model often writes the rest of the line again: drop what the line already has
        tail = line_after.strip()
        if tail and text.rstrip().endswith(tail):
            text = text.rstrip()[: len(text.rstrip()) - len(tail)]

    # Brackets: close only what the completion opened.
    cut = first_unmatched_closer(text)
    if cut is not None:
        text = text[:cut]

    # The current block: after a line that opens one, deeper than that line; else as deep as
    # the cursor's line. A completion line dedented below it ends the completion.
    opens_block = line_before.rstrip().endswith((":", "{", "(", "["))
    base = indent_of(line_before) + (1 if opens_block else 0)
    next_lines = [l.strip() for l in after.split("\n")[1:] if l.strip()][:2]
    repeat = line_after.strip() or (next_lines[0] if next_lines else None)
    kept: list[str] = []
    for i, line in enumerate(text.split("\n")):
        stripped = line.strip()
        whole_line = i > 0 or line_before.strip() == ""
        if stripped and whole_line:
            if i > 0 and indent_of(line) < base:
                break
            if stripped == repeat:  # repeats the code after the cursor: stop before it
                break
        kept.append(line)
    text = "\n".join(l.rstrip() for l in kept).rstrip()

    # The completion ends by repeating the text right after the cursor.
    if after.strip() and text.strip() and after.lstrip().startswith(text.strip()) and mid_line is False:
        return None
    return text if text.strip() else None
