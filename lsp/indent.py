"""Fill Selection and Refine Function results, made to fit where they go: re-indented to the
block they replace, and checked (Python) for whether the file still parses with them in place.

The model writes each line's indentation itself, and its first line often starts with a token
that carries a space (` value`) after the indentation already there: `     value = 1` in a
4-space block, which no longer parses. So the server moves the result as a whole: its first
non-blank line gets the indentation of the first non-blank line it replaces, every other line
keeps its indentation relative to that one (less than one level of difference on the first line
counts as such a space, not as a deeper block), and indentation is written with tabs or spaces
as the file does. The editor is told when the file with the result
in place does not parse, so that applying it takes an explicit second confirmation.

Pure text functions: this module knows lines and indentation, not the daemon nor the protocol,
and logs nothing (its inputs are document text).
"""

from __future__ import annotations

import ast
import warnings
from collections import Counter

TAB_WIDTH = 4  # columns a tab counts for when measuring indentation (the server sees no editor settings)
BLANK = " \t\r"


def leading(line: str) -> str:
    """The line's indentation: its leading spaces and tabs."""
    return line[:len(line) - len(line.lstrip(" \t"))]


def width(indentation: str, tab: int = TAB_WIDTH) -> int:
    """Columns `indentation` spans, a tab advancing to the next multiple of `tab`."""
    col = 0
    for ch in indentation:
        col = (col // tab + 1) * tab if ch == "\t" else col + 1
    return col


def indent_style(text: str) -> tuple[bool, int]:
    """(tabs, level) of the file: whether it indents with tabs (more of its indented lines start
    with a tab than with a space) and the columns of one level (a tab's TAB_WIDTH; with spaces,
    the most common step between consecutive lines, 4 when there is none)."""
    tabs = spaces = 0
    steps: Counter[int] = Counter()
    last = 0
    for line in text.split("\n"):
        if not line.strip(BLANK):
            continue
        if line.startswith("\t"):
            tabs += 1
        elif line.startswith(" "):
            spaces += 1
        w = width(leading(line))
        if w > last:
            steps[w - last] += 1
        last = w
    if tabs > spaces:
        return True, TAB_WIDTH
    return False, steps.most_common(1)[0][0] if steps else 4


def indentation(columns: int, tabs: bool) -> str:
    """`columns` of indentation in the file's style."""
    columns = max(0, columns)
    return "\t" * (columns // TAB_WIDTH) + " " * (columns % TAB_WIDTH) if tabs else " " * columns


def first_nonblank(lines: list[str]) -> int | None:
    return next((i for i, line in enumerate(lines) if line.strip(BLANK)), None)


def reindent(new: str, replaced: str, line_prefix: str, tabs: bool, level: int = 4) -> str:
    """`new`, the model's text for a range whose text was `replaced`, re-indented to fit.

    `line_prefix` is the document's text from the start of the range's first line to the range
    (empty when the range starts a line). When it is not all blank the range starts after code
    on its line: the first line is no indentation and the others have no line to be measured
    against, so only their style (tabs or spaces) is changed. Otherwise the first non-blank line
    of `line_prefix + new` is moved to the indentation of the first non-blank line of
    `line_prefix + replaced`, the following lines by as many columns, less what that line had
    beyond a whole number of `level`s (a token's leading space), never below column 0.
    Blank lines stay as they are; so does everything when `replaced` is blank (nothing to
    measure against: the model saw the code around it). What the first line gets is what the
    range adds after `line_prefix`, which stays in the document."""
    lines = new.split("\n")
    if not lines:
        return new
    whole = [line_prefix + lines[0]] + lines[1:]  # the first line as it will read in the document
    shift, ref, goal = 0, None, 0
    if not line_prefix.strip(BLANK):
        old = (line_prefix + replaced).split("\n")
        target, ref = first_nonblank(old), first_nonblank(whole)
        if target is not None and ref is not None:
            goal = width(leading(old[target]))
            shift = goal - width(leading(whole[ref])) // max(1, level) * max(1, level)
        else:
            ref = None
    out = []
    for i, line in enumerate(whole):
        if not line.strip(BLANK) or (i == 0 and line_prefix.strip(BLANK)):
            out.append(line)
            continue
        ws = leading(line)
        columns = goal if i == ref else width(ws) + shift
        out.append(indentation(columns, tabs) + line[len(ws):])
    first = out[0]
    if first.startswith(line_prefix):
        out[0] = first[len(line_prefix):]
    else:  # narrower than the blank text already before the range: that text stays, so no indentation
        out[0] = first.lstrip(" \t")
    return "\n".join(out)


def python_parse_error(text: str) -> str | None:
    """Why `text` is not valid Python ("line 5: unexpected indent"), or None when it parses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning (invalid escapes) would go to stderr
            ast.parse(text)
    except (SyntaxError, ValueError) as e:
        line = getattr(e, "lineno", None)
        message = getattr(e, "msg", None) or str(e)
        return f"line {line}: {message}" if line else message
    return None


def parse_check(language_id: str, before: str, after: str) -> tuple[bool | None, str | None]:
    """(parses, why not) for a document whose text goes from `before` to `after` when the
    proposal is applied. (None, None) when it cannot be judged: a language other than Python, or
    a document that did not parse before either (the proposal is not what broke it)."""
    if language_id != "python" or python_parse_error(before) is not None:
        return None, None
    error = python_parse_error(after)
    return error is None, error
