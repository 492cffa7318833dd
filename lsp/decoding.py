"""The last decoding per document: what the editor replays when the user asks to see the order in
which the model wrote a suggestion or a proposal (`diffucode/lastDecoding`, lsp/methods.py).

The daemon reports, for every answer, its tokens as text, the denoising step that revealed each
(-1: kept from before, as most of a refinement is) and the order's AR-ness. What the user was
shown is not always that text: post-processing cuts a suggestion, strips its leading indentation
and trailing spaces. `fit_tokens` keeps the tokens that survive, cut to the shown text, so that
the replay shows exactly what was suggested; a proposal re-indented to its block (lsp/indent.py)
has its tokens re-indented with it (`reindent_tokens`). This module knows text and positions, not
the daemon's messages, and logs nothing (the tokens are completion text).
"""

from __future__ import annotations

from collections import OrderedDict

DROPPABLE = " \t\r"  # what post-processing removes inside the text it keeps (indentation, trailing spaces)
REPLACEMENT = "\ufffd"  # a token holding part of a multi-byte character decodes to this on its own


def fit_tokens(tokens: list[str], order: list[int], shown: str) -> tuple[list[str], list[int]]:
    """The tokens (and their steps) that make up `shown`, the text the user saw, which is the
    tokens' text with some spaces and tabs removed and its end cut. Each token is cut to the
    characters of it that were shown; tokens of which nothing was shown are left out. The walk
    stops at the first character that neither matches nor could have been removed, so the
    result always joins to a prefix of `shown` (all of it when the tokens are the raw text)."""
    out_tokens: list[str] = []
    out_order: list[int] = []
    j = 0
    for token, step in zip(tokens, order):
        piece: list[str] = []
        stopped = False
        for ch in token:
            if j < len(shown) and shown[j] == ch:
                piece.append(ch)
                j += 1
            elif ch == REPLACEMENT and j < len(shown) and not shown[j].isascii():
                piece.append(shown[j])  # this token's share of a character split across tokens
                j += 1
            elif ch not in DROPPABLE and ch != REPLACEMENT:
                stopped = True
                break
        if piece:
            out_tokens.append("".join(piece))
            out_order.append(step)
        if stopped or j >= len(shown):
            break
    return out_tokens, out_order


def reindent_tokens(tokens: list[str], order: list[int], text: str) -> tuple[list[str], list[int]]:
    """The tokens (and their steps) of an answer whose lines were re-indented into `text`
    (lsp/indent.py): each line's old indentation is dropped and `text`'s given to the token that
    starts the line, so that the tokens join to `text`. Tokens left empty are left out. When the
    lines do not match up (not a re-indentation), the answer is cut to `text` by `fit_tokens`."""
    lines = text.split("\n")
    pieces: list[list[str]] = [[] for _ in tokens]
    line, at_start = 0, True
    for k, token in enumerate(tokens):
        for ch in token:
            if at_start and ch in " \t":
                continue  # the old indentation
            if at_start:
                if line >= len(lines):
                    return fit_tokens(tokens, order, text)
                body = lines[line].lstrip(" \t")
                pieces[k].append(lines[line][:len(lines[line]) - len(body)])
                at_start = False
            pieces[k].append(ch)
            if ch == "\n":
                line, at_start = line + 1, True
    if at_start and tokens and line < len(lines):
        pieces[-1].append(lines[line])  # a last line of indentation only
    out = [("".join(p), step) for p, step in zip(pieces, order) if p]
    new_tokens, new_order = [t for t, _ in out], [s for _, s in out]
    if REPLACEMENT not in "".join(tokens) and "".join(new_tokens) != text:  # (a split character cannot match)
        return fit_tokens(tokens, order, text)
    return new_tokens, new_order


def end_position(start: tuple[int, int], text: str, columns) -> tuple[int, int]:
    """(line, character) where `text` ends when it is placed at `start`; `columns(s)` counts a
    line's columns in the client's position encoding."""
    lines = text.split("\n")
    if len(lines) == 1:
        return start[0], start[1] + columns(text)
    return start[0] + len(lines) - 1, columns(lines[-1])


class LastDecodings:
    """The last decoding shown per document (a suggestion, or a fill / refine proposal), for the
    few documents last used: each is the JSON that `diffucode/lastDecoding` answers."""

    def __init__(self, size: int = 64):
        self.size = size
        self._by_uri: OrderedDict[str, dict] = OrderedDict()

    def put(self, uri: str, kind: str, tokens: list[str], order: list[int], steps: int,
            ar_ness: dict | None, where: dict) -> None:
        """`where`: {"position": ...} for a suggestion, {"range": ...} for a proposal (the
        range the new text covers once applied)."""
        self._by_uri[uri] = {"kind": kind, "tokens": list(tokens), "order": list(order), "steps": int(steps),
                             "ar_ness": dict(ar_ness) if ar_ness else None, **where}
        self._by_uri.move_to_end(uri)
        while len(self._by_uri) > self.size:
            self._by_uri.popitem(last=False)

    def get(self, uri: str) -> dict | None:
        return self._by_uri.get(uri)

    def forget(self, uri: str) -> None:
        self._by_uri.pop(uri, None)
