"""Completion cache with type-through.

An LRU keyed by document and context (the text before and after the cursor, as the model would
see it). Type-through: while the user types the start of a suggestion that is still shown, the
rest of it is served from here without asking the daemon again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Entry:
    uri: str
    before: str
    after: str
    items: list[str]  # completions, best first


class CompletionCache:
    def __init__(self, size: int = 128, key_chars: int = 2000):
        self.size, self.key_chars = size, key_chars
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()

    def _key(self, uri: str, before: str, after: str) -> tuple:
        return uri, before[-self.key_chars:], after[:self.key_chars]

    def put(self, uri: str, before: str, after: str, items: list[str]) -> None:
        key = self._key(uri, before, after)
        self._entries[key] = Entry(uri, before, after, items)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, uri: str, before: str, after: str) -> list[str] | None:
        """Exact hit, or type-through: an entry whose `before` plus the start of one of its
        items is what the user now has before the cursor (same text after it)."""
        key = self._key(uri, before, after)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry.items
        for entry in reversed(self._entries.values()):
            if entry.uri != uri or entry.after[:self.key_chars] != after[:self.key_chars]:
                continue
            if not before.startswith(entry.before) or len(before) == len(entry.before):
                continue
            typed = before[len(entry.before):]
            rest = [item[len(typed):] for item in entry.items if item.startswith(typed) and len(item) > len(typed)]
            if rest:
                return rest
        return None

    def clear(self, uri: str | None = None) -> None:
        if uri is None:
            self._entries.clear()
        else:
            for key in [k for k, e in self._entries.items() if e.uri == uri]:
                del self._entries[key]
