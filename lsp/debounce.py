"""Adaptive debounce: how long to wait after a keystroke before asking the model.

Fast typists get a longer pause (a request per keystroke would be cancelled anyway); slow
responses lengthen it (no point queueing work that will be stale); accepted suggestions shorten
it and ignored ones lengthen it. Always within the configured bounds.
"""

from __future__ import annotations

import statistics
import time
from collections import deque


class Debouncer:
    def __init__(self, min_ms: float = 50.0, max_ms: float = 150.0):
        self.min_ms, self.max_ms = min_ms, max_ms
        self.keystrokes: deque[float] = deque(maxlen=20)  # monotonic seconds
        self.latencies: deque[float] = deque(maxlen=20)  # ms
        self.bias = 1.0  # moved by accepted / rejected suggestions

    def keystroke(self, now: float | None = None) -> None:
        self.keystrokes.append(time.monotonic() if now is None else now)

    def latency(self, ms: float) -> None:
        self.latencies.append(ms)

    def accepted(self) -> None:
        self.bias = max(0.5, self.bias * 0.9)

    def rejected(self) -> None:
        self.bias = min(2.0, self.bias * 1.05)

    def delay_ms(self) -> float:
        """The typing interval (median of recent gaps under 1 s) times 1.5, plus a quarter of
        the median model latency, scaled by the feedback bias, clamped to [min, max]."""
        ks = list(self.keystrokes)
        gaps = [(b - a) * 1000 for a, b in zip(ks, ks[1:]) if b - a < 1.0]
        typing = 1.5 * statistics.median(gaps) if gaps else self.min_ms
        model = 0.25 * statistics.median(self.latencies) if self.latencies else 0.0
        return min(self.max_ms, max(self.min_ms, (typing + model) * self.bias))
