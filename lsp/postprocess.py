"""Post-processing of a raw middle into what the editor shows as ghost text.

What users of every completion tool complain about is what this fixes (editor.md): text that
repeats the code after the cursor, wrong indentation, brackets closed that the completion did
not open, completions that run past the end of the current block, trailing whitespace, and
empty items. And what a small model adds: a tail it was unsure of (cut at the first token below
a confidence threshold, benchmarks/confidence_cut.py measured it), degenerate repetition
(`value, value, value, value`), and suggestions too small to see. Pure string functions, tested
with golden files (tests/golden/postprocess/).
"""

from __future__ import annotations

import re

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


def brackets(text: str):
    """(index, bracket) for each bracket of `text` outside string literals and comments."""
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
        elif ch in OPENERS or ch in CLOSERS:
            yield i, ch
        i += 1


def first_unmatched_closer(text: str) -> int | None:
    """Index of the first bracket in text that closes something opened before the text
    (outside string literals), or None."""
    stack: list[str] = []
    for i, ch in brackets(text):
        if ch in OPENERS:
            stack.append(ch)
        elif not stack or stack[-1] != PAIRS[ch]:
            return i
        else:
            stack.pop()
    return None


def unclosed(text: str) -> int:
    """How many brackets `text` opens and leaves open (closers of brackets opened before the text
    are not counted)."""
    stack: list[str] = []
    for _, ch in brackets(text):
        if ch in OPENERS:
            stack.append(ch)
        elif stack and stack[-1] == PAIRS[ch]:
            stack.pop()
    return len(stack)


# --- the model's confidence -------------------------------------------------------------------

def cut_at_confidence(raw: str, tokens: list[str] | None, confidence: list[float] | None, threshold: float,
                      whole_words: bool = True) -> str:
    """`raw` cut before its first token whose confidence is below `threshold` (whitespace-only
    tokens do not count: post-processing rewrites whitespace, and a line break is judged by what
    follows it). whole_words: a cut inside a word (`self._get` + `_mock`) goes back to the word's
    start, so no half identifier is offered. The tokens must join to `raw` (they do: the daemon's
    answer is its tokens' text); when they do not (a character split across tokens), raw is
    returned uncut."""
    if threshold <= 0 or not tokens or not confidence or len(tokens) != len(confidence) or "".join(tokens) != raw:
        return raw
    pos = 0
    for token, conf in zip(tokens, confidence):
        if conf < threshold and token.strip():
            kept = raw[:pos]
            if whole_words and re.match(r"\w", token) and re.search(r"\w$", kept):
                kept = re.sub(r"\w+$", "", kept)
            return kept
        pos += len(token)
    return raw


# --- degenerate repetition --------------------------------------------------------------------

UNIT = re.compile(r"\w+|[^\w\s]")
LITERALS = {"None", "True", "False", "null", "nil", "true", "false", "undefined"}
MAX_PERIOD = 6  # the longest n-gram (in units: words and punctuation marks) looked for
# consecutive occurrences that make a repetition degenerate: a word or two (`value, value, ...`:
# `tuple[int, int, int]` is code, so three of them are not enough unless they run to the end of
# the answer: the model never stopped), or a longer n-gram
MIN_REPEATS_SHORT, MIN_REPEATS_AT_END, MIN_REPEATS_LONG = 4, 3, 3


def is_word(unit: str) -> bool:
    """A unit whose repetition is degenerate: an identifier or word of 2 characters or more (not a
    number, not a literal such as None: `[0, 0, 0, 0]` and `(None, None, None, None)` are code;
    not one letter: `"%s, %s, %s, %s"` is code too). Punctuation repeats (`# ======`) are fine."""
    return len(unit) >= 2 and not unit[0].isdigit() and any(c.isalpha() for c in unit) and unit not in LITERALS


def repetition_cut(text: str) -> int | None:
    """Where to cut `text` before its first degenerate repetition, or None when it has none:
    - an n-gram of units (words, punctuation marks; whitespace ignored) with a word in it that
      occurs MIN_REPEATS_* times in a row: cut after its first occurrence (`sum(0, value, value,
      value` -> `sum(0, value`); 0 when the text starts with it (nothing but repetition);
    - a line (two units or more, a word among them) written twice in a row: cut before the second."""
    found = list(UNIT.finditer(text))
    units = [m.group() for m in found]
    best: int | None = None
    for i in range(len(units)):
        for p in range(1, MAX_PERIOD + 1):
            gram = units[i:i + p]
            if len(gram) < p or not any(is_word(u) for u in gram):
                continue
            repeats = 1
            while units[i + repeats * p:i + (repeats + 1) * p] == gram:
                repeats += 1
            rest = units[i + repeats * p:]
            at_end = rest == gram[:len(rest)]  # nothing after the run but the start of one more
            if repeats >= (MIN_REPEATS_LONG if p > 2 else MIN_REPEATS_AT_END if at_end else MIN_REPEATS_SHORT):
                best = 0 if i == 0 else found[i + p].start()
                break
        if best is not None:
            break
    offset = 0
    lines = text.split("\n")
    for k, line in enumerate(lines):
        if best is not None and offset >= best:
            break
        units_ = UNIT.findall(line)
        if k and line.strip() == lines[k - 1].strip() and len(units_) >= 2 and any(map(is_word, units_)):
            return offset
        offset += len(line) + 1
    return best


# --- the whole -------------------------------------------------------------------------------

def overlap_with(text: str, code_after: str) -> int:
    """Characters at the end of `text` (trailing whitespace aside) that repeat the start of
    `code_after` (leading whitespace aside): the longest such overlap, unless removing it would
    leave a bracket of the text open that the overlap closed."""
    t, a = text.rstrip(), code_after.strip()
    for k in range(min(len(t), len(a)), 0, -1):
        if t.endswith(a[:k]) and unclosed(t[:-k]) == unclosed(t):
            return len(text) - len(t) + k
    return 0


def postprocess(raw: str, before: str, after: str, tokens: list[str] | None = None,
                confidence: list[float] | None = None, min_confidence: float = 0.0) -> str | None:
    """The text to insert at the cursor, or None when nothing worth showing is left. `tokens` and
    `confidence`: the answer's tokens (joining to `raw`) and their confidences; with
    `min_confidence` > 0 the answer is cut before the first token less confident than that."""
    line_before = before.rsplit("\n", 1)[-1]
    line_after = after.split("\n", 1)[0]
    mid_line = line_after.strip() != ""
    text = cut_at_confidence(raw, tokens, confidence, min_confidence)

    # Degenerate repetition, looked for in the whole answer: cut before it, the first occurrence
    # kept (without a comma left at its end).
    cut = repetition_cut(raw)
    if cut is not None and cut < len(text):
        text = text[:cut].rstrip().rstrip(",").rstrip()
    text = text.replace("\r\n", "\n")

    # Indentation: the user has typed the indentation of this line; do not add it twice.
    if line_before.strip() == "":
        text = text.lstrip(" \t") if text[:1] in " \t" else text

    if mid_line:
        text = text.split("\n", 1)[0]

    if mid_line:
        # the model often writes the rest of the line again, or its start: drop what the line already has
        k = overlap_with(text, line_after)
        if k:
            text = text[:len(text) - k]

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
    # a last whole line that is the start of the next line of code (`for item in` before
    # `for item in items:`): the model began to write it again
    last = kept[-1].strip() if kept else ""
    if last and repeat and not mid_line and (len(kept) > 1 or line_before.strip() == "") and repeat.startswith(last):
        kept.pop()
    text = "\n".join(l.rstrip() for l in kept).rstrip()

    # The completion ends by repeating the text right after the cursor.
    if after.strip() and text.strip() and after.lstrip().startswith(text.strip()) and mid_line is False:
        return None
    # One visible character is not worth a suggestion: Tab costs what typing it does, and drawn as
    # one grey glyph right at the caret it is easily missed (a block caret covers it). One that
    # only repeats the character after the cursor was dropped above (the overlap, the prefix).
    if len(text.strip()) <= 1:
        return None
    return text
