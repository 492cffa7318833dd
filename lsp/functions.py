"""Finding the function around a position, for diffucode/refineFunction.

Python through `ast` (decorators included, exact end lines); other languages by braces, falling
back to indentation. Lines are 0-based; the result is [first, last] inclusive.
"""

from __future__ import annotations

import ast
import re

FUNCTION_START = re.compile(r"^\s*(export\s+)?(async\s+)?(def|function|fn|func|fun|sub|public|private|protected|static)\b"
                            r"|^\s*(?!(if|for|while|switch|catch|else|return|do)\b)[\w<>\[\],*&:]+(\s+[\w<>\[\],*&:]+)*"
                            r"\s+\**\w+\s*\([^;]*\)\s*(const\s*)?\{?\s*$")


def python_function(source: str, line: int) -> tuple[int, int] | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            last = node.end_lineno - 1
            if first <= line <= last and (best is None or first >= best[0]):
                best = (first, last)  # the innermost function holding the line
    return best


def brace_function(lines: list[str], line: int) -> tuple[int, int] | None:
    """The nearest line at or above `line` that starts a function and opens a brace block that
    contains `line`."""
    for start in range(line, -1, -1):
        if not FUNCTION_START.search(lines[start]):
            continue
        depth, opened = 0, False
        for end in range(start, len(lines)):
            for ch in lines[end]:
                if ch == "{":
                    depth, opened = depth + 1, True
                elif ch == "}":
                    depth -= 1
            if opened and depth <= 0:
                if end >= line:
                    return start, end
                break
    return None


def indent_function(lines: list[str], line: int) -> tuple[int, int] | None:
    """Indentation languages without a parser: the nearest function-like line above, through
    the last line indented deeper than it."""
    for start in range(line, -1, -1):
        if FUNCTION_START.search(lines[start]):
            base = len(lines[start]) - len(lines[start].lstrip())
            end = start
            for i in range(start + 1, len(lines)):
                text = lines[i]
                if text.strip() and len(text) - len(text.lstrip()) <= base:
                    break
                if text.strip():
                    end = i
            return (start, end) if end >= line else None
    return None


def body_start(source: str, first: int, last: int, language_id: str = "") -> int:
    """The first line of a function's body, [first, last] being the whole function: what Refine
    rewrites, so that the signature (decorators, a signature over several lines) is kept. Python
    through `ast`; elsewhere the line after the first. A function on one line is all body."""
    if language_id == "python":
        try:
            tree = ast.parse(source)
        except SyntaxError:
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - 1 == last \
                    and min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1 == first:
                start = node.body[0].lineno - 1
                return start if start > node.lineno - 1 else first
    return first + 1 if last > first else first


def enclosing_function(source: str, line: int, language_id: str = "") -> tuple[int, int] | None:
    if language_id == "python":
        try:
            ast.parse(source)
        except SyntaxError:  # mid-edit: fall back to indentation
            lines = source.split("\n")
            return indent_function(lines, line) if 0 <= line < len(lines) else None
        return python_function(source, line)
    lines = source.split("\n")
    if not 0 <= line < len(lines):
        return None
    return brace_function(lines, line) or indent_function(lines, line)
