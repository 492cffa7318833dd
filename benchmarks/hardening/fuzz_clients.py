"""Who talks to the daemon while fuzz.py runs: the fuzzer (its weighted mix of frames, and the
connections it sends them on: one per stream frame, one long-lived for decodable messages,
crowds, slowloris) and the well-behaved clients whose latency it measures meanwhile.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter, defaultdict

import msgpack
from common import SMALL_INFILL, Daemon
from conn import Conn, error_name
from fuzz_frames import (
    BASE,
    MESSAGE_KINDS,
    STREAM_KINDS,
    WEIGHTS,
    hostile_params,
    huge_valid_frames,
    packb,
)

# --- sending -----------------------------------------------------------------------------------

def stream_frame(daemon: Daemon, data: bytes, timeout: float = 20.0) -> list[str]:
    """Send data on a fresh connection, half-close it, read every reply until the daemon closes.
    Returns the error names of the replies ("ok" for results; "(no reply)" when none came)."""
    try:
        s = daemon.open_socket(timeout)
    except OSError as e:
        return [f"(connect failed: {type(e).__name__})"]
    names: list[str] = []
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            names.append("(reset while sending)")
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                names.append("(reset)")
                break
            except TimeoutError:
                names.append("(not closed in time)")
                break
            if not chunk:
                break
            unpacker.feed(chunk)
            for msg in unpacker:
                names.append(error_name(msg[2]) if isinstance(msg, list) and len(msg) == 4 and msg[0] == 1
                             else "(notification)")
    finally:
        s.close()
    return names or ["(no reply)"]


class MessageChannel:
    """One long-lived connection for decodable messages. Each message is followed by a `status`
    request (the sentinel): replies the message caused at once come before the sentinel's; the
    replies to requests that run later are awaited by id."""

    SENTINEL_BASE = 10**15

    def __init__(self, daemon: Daemon, timeout: float):
        self.daemon, self.timeout = daemon, timeout
        self.conn: Conn | None = None
        self.messages: list[str] = []
        self.sentinel = self.SENTINEL_BASE
        self.reconnects = 0

    def exchange(self, data: bytes, expect: set) -> list[str]:
        if self.conn is None:
            self.conn = Conn(self.daemon.open_socket(self.timeout))
            self.reconnects += 1
        self.sentinel += 1
        sentinel, waiting, names = self.sentinel, set(expect), []
        self.messages = []  # the error messages of this exchange
        try:
            self.conn.send_raw(data + packb([0, sentinel, "status", {}]))
            seen_sentinel = False
            deadline = time.monotonic() + self.timeout
            while not seen_sentinel or waiting:
                self.conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
                msg = self.conn.read()
                if msg is None:
                    names.append("(closed)")
                    self.conn = None
                    break
                if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == 1):
                    continue  # progress notifications
                if msg[1] == sentinel:
                    seen_sentinel = True
                    continue
                waiting.discard(msg[1])
                names.append(error_name(msg[2]))
                if isinstance(msg[2], dict):
                    self.messages.append(str(msg[2].get("message")))
        except TimeoutError:
            names.append(f"(no reply in {self.timeout:g} s)")
            self.conn.close()
            self.conn = None
        except (BrokenPipeError, ConnectionResetError):
            names.append("(reset)")
            self.conn = None
        return names or ["(no reply)"]


def many_connections(daemon: Daemon, n: int) -> list[str]:
    """Open n connections at once, each sends `status`; the first reply of each, by name."""
    socks, names = [], []
    for _ in range(n):
        try:
            socks.append(daemon.open_socket(20))
        except OSError as e:
            names.append(f"(connect failed: {type(e).__name__})")
    for s in socks:
        try:
            s.sendall(packb([0, 1, "status", {}]))
        except OSError:
            pass
    for s in socks:
        conn = Conn(s)
        try:
            msg = conn.read()
            names.append("(closed)" if msg is None else error_name(msg[2]))
        except OSError:
            names.append("(no reply)")
    for s in socks:
        s.close()
    return names


SLOW_MODES = ("half", "drip_text", "drip_items")


def slowloris(daemon: Daemon, mode: str, wait_s: float, out: list) -> None:
    """A frame begun and never finished: half of it then silence ("half"), or one byte every
    0.25 s of a frame holding a long string ("drip_text") or 1,000 one-byte items
    ("drip_items"). Appends (mode, reply name, seconds from the first byte until the reply)."""
    if mode == "drip_items":
        frame = packb([0, 1, "status", [1] * 1000])
    else:
        frame = packb([0, 1, "infill", {**BASE, "before": "x" * 1000}])
    try:
        s = daemon.open_socket(wait_s)
    except OSError as e:
        out.append((mode, f"(connect failed: {type(e).__name__})", 0.0))
        return
    conn = Conn(s)
    name = "(no reply)"
    started = time.monotonic()
    try:
        if mode == "half":
            s.sendall(frame[:len(frame) // 2])
            msg = conn.read()
            name = "(closed)" if msg is None else error_name(msg[2])
        else:
            s.settimeout(0.25)
            for i in range(len(frame) - 1):
                s.sendall(frame[i:i + 1])
                try:
                    msg = conn.read()
                    name = "(closed)" if msg is None else error_name(msg[2])
                    break
                except TimeoutError:
                    if time.monotonic() - started > wait_s:
                        name = "(not closed in time)"
                        break
    except TimeoutError:
        name = "(not closed in time)"
    except (BrokenPipeError, ConnectionResetError):
        name = "(reset)"
    finally:
        s.close()
    out.append((mode, name, time.monotonic() - started))


class WellBehaved(threading.Thread):
    """A request in a loop on its own connection (the small infill; or `status`, which only the
    event loop answers): latency (ms) of each, error names."""

    def __init__(self, daemon: Daemon, method: str = "infill", params: dict | None = None, pause_s: float = 0.0):
        super().__init__(daemon=True, name=f"well-behaved-{method}")
        self.daemon_, self.method, self.pause_s = daemon, method, pause_s
        self.params = SMALL_INFILL if params is None else params
        self.conn = daemon.connect(timeout=60)
        self.latencies: list[float] = []
        self.samples: list[tuple[float, float]] = []  # (sent, monotonic; ms)
        self.names: Counter = Counter()
        self.stopping = threading.Event()

    def one(self) -> None:
        t0 = time.monotonic()
        try:
            err, _ = self.conn.reply(self.conn.request(self.method, self.params))
        except (ConnectionError, OSError) as e:
            self.names[f"(disconnected: {type(e).__name__})"] += 1
            self.conn = self.daemon_.connect(timeout=60)
            return
        self.names[error_name(err)] += 1
        if err is None:
            ms = (time.monotonic() - t0) * 1000
            self.latencies.append(ms)
            self.samples.append((t0, ms))

    def run(self) -> None:
        while not self.stopping.is_set() and self.daemon_.alive():
            self.one()
            self.stopping.wait(self.pause_s)


def pinger(daemon: Daemon) -> WellBehaved:
    """`status` every 20 ms: how long the event loop takes to answer (a stall shows here)."""
    return WellBehaved(daemon, "status", {}, pause_s=0.02)


# --- the mix: frames of every kind, and what each drew -----------------------------------------

class Fuzzer:
    """The hostile side of the run: frames in a weighted mix, huge frames, crowds and slowloris at
    intervals; keeps every reply by category and when each frame was sent, so that the report can
    say what was being sent while a well-behaved request was slow."""

    def __init__(self, daemon: Daemon, args):
        self.daemon, self.args = daemon, args
        self.rng = random.Random(args.seed)
        self.channel = MessageChannel(daemon, timeout=args.reply_timeout)
        self.hostile = hostile_params()
        self.huge = huge_valid_frames()
        self.by_category: dict[str, Counter] = defaultdict(Counter)
        self.frames: Counter = Counter()
        self.hostile_outcomes: dict[str, Counter] = defaultdict(Counter)
        self.hostile_ms: dict[str, float] = defaultdict(float)
        self.hostile_messages: dict[str, str] = {}  # label -> the first error message
        self.slow_results: list = []
        self.slow_threads: list[threading.Thread] = []
        self.next_id = 1000
        self.crowds = 0
        self.timeline: list[tuple[float, float, str]] = []  # (sent, answered, what): to explain stalls
        only = set(args.only.split(",")) if args.only else None
        self.kinds = {k: w for k, w in WEIGHTS.items() if only is None or k in only}
        self.specials = {k for k in ("huge_valid_frames", "many_connections", "slowloris") if only is None or k in only}

    def record(self, category: str, names: list[str], started: float, what: str | None = None) -> None:
        self.frames[category] += 1
        self.by_category[category].update(names)
        self.timeline.append((started, time.monotonic(), what or category))

    def one(self, category: str) -> None:
        started = time.monotonic()
        if category in STREAM_KINDS:
            data = STREAM_KINDS[category](self.rng)
            if b"shutdown" in data:
                return
            self.record(category, stream_frame(self.daemon, data, self.args.reply_timeout), started)
        elif category in MESSAGE_KINDS:
            data, expect = MESSAGE_KINDS[category](self.rng)
            if b"shutdown" in data:
                return
            self.record(category, self.channel.exchange(data, expect), started)
        elif category == "hostile_params":
            self.hostile_one(self.rng.choice(self.hostile))

    def hostile_one(self, entry: tuple[str, str, dict]) -> None:
        """One hostile request; its reply awaited (it may run on the model)."""
        label, method, params = entry
        self.next_id += 1
        started = time.monotonic()
        names = self.channel.exchange(packb([0, self.next_id, method, params]), {self.next_id})
        self.hostile_ms[label] = max(self.hostile_ms[label], (time.monotonic() - started) * 1000)
        self.hostile_outcomes[label].update(names)
        if self.channel.messages:
            self.hostile_messages.setdefault(label, self.channel.messages[0])
        self.record("hostile_params", names, started, f"hostile: {label}")

    def huge_valid(self) -> None:
        for label, data in self.huge:
            started = time.monotonic()
            names = stream_frame(self.daemon, data, self.args.reply_timeout)
            self.record("huge_valid_frames", names, started, f"huge: {label}")
            self.hostile_outcomes[f"huge frame: {label}"].update(names)

    def crowd(self) -> None:
        self.crowds += 1
        started = time.monotonic()
        self.record_many("many_connections", many_connections(self.daemon, self.args.max_connections + 16))
        self.timeline.append((started, time.monotonic(), "many_connections"))
        time.sleep(0.2)  # let the daemon read the closes before the next frames

    def record_many(self, category: str, names: list[str]) -> None:
        self.frames[category] += len(names)
        self.by_category[category].update(names)

    def start_slowloris(self, n: int = 6) -> None:
        wait_s = self.args.frame_timeout + 15
        for i in range(n):
            mode = SLOW_MODES[i % len(SLOW_MODES)]
            t = threading.Thread(target=slowloris, args=(self.daemon, mode, wait_s, self.slow_results), daemon=True)
            t.start()
            self.slow_threads.append(t)

    def finish_slowloris(self) -> None:
        for t in self.slow_threads:
            t.join(self.args.frame_timeout + 30)
        self.slow_threads.clear()
        self.frames["slowloris"] = len(self.slow_results)
        self.by_category["slowloris"] = Counter(f"{mode}: {name}" for mode, name, _ in self.slow_results)

    def run(self, frames: int, every_kind_first: int = 0) -> None:
        """Send about `frames` frames in the weighted mix, with huge valid frames, a crowd of
        connections and a slowloris burst at intervals; stops early if the daemon dies."""
        start = sum(self.frames.values())
        kinds, weights = list(self.kinds), list(self.kinds.values())
        huge, crowd, slow = (k in self.specials for k in ("huge_valid_frames", "many_connections", "slowloris"))
        for _ in range(every_kind_first):  # (the warm-up: what allocates most, first)
            for kind in kinds:
                if kind == "hostile_params":
                    for entry in self.hostile:
                        self.hostile_one(entry)
                else:
                    self.one(kind)
            if huge:
                self.huge_valid()
        if every_kind_first:
            if crowd:
                self.crowd()
            if slow:
                self.start_slowloris()
        marks = {"huge": 0, "crowd": 0, "slow": 0}
        while (sent := sum(self.frames.values()) - start) < frames and self.daemon.alive():
            if huge and (sent // 2500 >= marks["huge"] + 1 or (marks["huge"] == 0 and sent >= frames // 3)):
                marks["huge"] += 1
                self.huge_valid()
            elif crowd and (sent // 3000 >= marks["crowd"] + 1 or (marks["crowd"] == 0 and sent >= frames // 2)):
                marks["crowd"] += 1
                self.crowd()
            elif slow and (sent // 1500 >= marks["slow"] + 1 or (marks["slow"] == 0 and sent >= frames // 4)):
                marks["slow"] += 1
                self.start_slowloris()
            elif kinds:
                self.one(self.rng.choices(kinds, weights)[0])
            else:
                break
