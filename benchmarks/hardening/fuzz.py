"""Fuzz a live daemon while a well-behaved client measures its latency (issue 14, section 3).

Starts `python -m diffucode serve` on a temp Unix socket (a tiny random checkpoint unless
--model) and throws frames at it:

- stream frames, each on its own connection, which the fuzzer then half-closes and reads to the
  end: random bytes, truncated msgpack (followed by a whole frame), valid frames with bytes
  flipped, deep nesting, huge headers (array32 / map32 / str32 / bin32 / ext32 claiming up to
  4 GiB), huge valid frames (a 2 M-element array, a 500 k-key map, 7.9 MB of text);
- messages on one long-lived connection, each followed by a `status` request so that every
  reply it caused is read before the next: wrong shapes and types of [type, msgid, method,
  params], and hostile params (steps 1e9, 2**64-1, NaN / inf temperature, 200 lengths,
  negative top_k, 5e-324 alg_temp, 900 k characters of text, ...), whose replies are awaited;
- many connections at once (more than --max-connections), each sending `status`;
- slowloris: half a frame then silence, or a frame dripped a byte every 0.25 s (in the
  background).

Meanwhile a well-behaved client sends a small infill in a loop, and another `status` (answered
by the event loop alone, so a stall shows there); their latencies are measured at idle first,
then during the fuzz, and when one is slow the report says what the fuzzer was sending at the
time. Reported: frames sent, daemon crashes, tracebacks in the daemon's log (grouped by
exception), daemon RSS after the warm-up, during and at the end, the well-behaved client's p50
and max (idle and during), and the error names received per category. Goals (issue 14): 0
crashes, 0 tracebacks, RSS growth < 5 %, p50 within 1.5x and max within 3x of idle.

    python benchmarks/hardening/fuzz.py [--frames 10000] [--seed 1] [--model DIR] [--threads N]
        [--only CATEGORY,...]

The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import math
import random
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import msgpack
from common import (
    SMALL_INFILL,
    Conn,
    Daemon,
    Report,
    add_threads_option,
    error_name,
    mb,
    percentile,
    scratch,
    tiny_model,
    torch_env,
)

NAN, INF = float("nan"), float("inf")
BASE = {"before": "def f(x):\n    return ", "after": "\n", "sampling": {"max_new_tokens": 8}}
SAMPLES = [  # well-formed messages of every method: what truncation and bit flips start from
    [0, 1, "status", {}],
    [0, 2, "infill", BASE],
    [0, 3, "complete", {"before": "import os\n", "sampling": {"max_new_tokens": 4}}],
    [0, 4, "refine", {"before": "def f(x):\n", "span": "    return x + 1\n", "after": "", "fraction": 0.3,
                      "sampling": {"max_new_tokens": 8}}],
    [0, 5, "auth", {"token": "0" * 64}],
    [2, "cancel", {"id": 2}],
]
WEIRD = [None, True, False, 0, -1, 1, 2**31, 2**63 - 1, -2**63, 2**64 - 1, 1.5, -0.0, NAN, INF, -INF, 5e-324,
         "", "x", "é\u0000\u202e", "x" * 5000, b"", b"\xff\x00", [], [1, [2, [3]]], {}, {"a": {"b": {}}},
         {1: 2}, {None: None}, msgpack.ExtType(5, b"ab"), msgpack.Timestamp(0, 0),
         msgpack.Timestamp(2**40, 999_999_999)]
METHOD_NAMES = ["status", "infill", "complete", "refine", "cancel", "auth", "progress", "", "INFILL",
                "status\u0000", "x" * 300]
TASK_FIELDS = ["before", "after", "span", "fraction", "lengths", "group", "deadline_ms", "progress",
               "before_tokens", "after_tokens", "sampling", "colour"]
SAMPLING_FIELDS = ["max_new_tokens", "steps", "alg", "temperature", "top_p", "top_k", "alg_temp", "eps",
                   "seed", "decoding", "threshold", "block_size", "prefix_cache", "colour"]


def hostile_params() -> list[tuple[str, str, dict]]:
    """(label, method, params): one hostile value each, on an otherwise small request."""
    def s(**kw):
        return {**BASE, "sampling": {"max_new_tokens": 8, **kw}}
    big = "x = 1\n" * 150_000  # 900,000 characters
    out = [(f"sampling.{k} = {v!r}", "infill", s(**{k: v})) for k, v in [
        ("steps", 10**9), ("steps", 2**64 - 1), ("steps", 0), ("steps", -1), ("max_new_tokens", 0),
        ("max_new_tokens", -1), ("max_new_tokens", 2**63 - 1), ("temperature", NAN), ("temperature", INF),
        ("temperature", -INF), ("temperature", -1.0), ("temperature", 5e-324), ("temperature", 1e308),
        ("alg_temp", 5e-324), ("alg_temp", NAN), ("alg_temp", INF), ("alg_temp", -1.0), ("top_k", -1),
        ("top_k", 2**63 - 1), ("top_p", NAN), ("top_p", 0.0), ("top_p", 2.0), ("top_p", -1.0), ("eps", NAN),
        ("eps", 0.0), ("eps", -1.0), ("eps", 1e308), ("seed", -1), ("seed", 2**64 - 1), ("threshold", NAN),
        ("threshold", 0.0), ("threshold", 2.0), ("block_size", 0), ("block_size", 2**40), ("alg", "nope"),
        ("decoding", "nope")]]
    out += [(f"{k} = {label}", "infill", {**BASE, k: v}) for k, v, label in [
        ("lengths", list(range(1, 201)), "200 sizes"), ("lengths", [], "[]"), ("lengths", [0], "[0]"),
        ("lengths", [-1], "[-1]"), ("lengths", [2**40], "[2**40]"), ("before", big, "900k chars"),
        ("after", big, "900k chars"), ("before", big + big[:200_000], "1.1M chars"), ("deadline_ms", -1, "-1"),
        ("deadline_ms", 0, "0"), ("deadline_ms", 2**63 - 1, "2**63-1"), ("before_tokens", 0, "0"),
        ("before_tokens", -1, "-1"), ("after_tokens", 2**63 - 1, "2**63-1"), ("group", "g" * 100_000, "100k chars")]]
    refine = SAMPLES[3][3]
    out += [(f"refine fraction = {v!r}", "refine", {**refine, "fraction": v}) for v in (NAN, 0.0, 2.0, -1.0, INF)]
    out += [("refine span = 900k chars", "refine", {**refine, "span": big}),
            ("complete before = 900k chars", "complete", {"before": big, "sampling": {"max_new_tokens": 4}})]
    return out


# --- frame generators: each returns bytes (stream) or (bytes, expected reply ids) (message) -----

def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def gen_random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def gen_truncated(rng: random.Random) -> bytes:
    whole = packb(rng.choice(SAMPLES))
    return whole[:rng.randrange(1, len(whole))] + packb([0, 7, "status", {}])


def gen_bit_flips(rng: random.Random) -> bytes:
    blob = bytearray(packb(rng.choice(SAMPLES)))
    for _ in range(rng.randrange(1, 5)):
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    return bytes(blob)


def gen_deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice([100, 500, 900, 1000, 1023, 1024, 1025, 5000, 100_000])
    kind = rng.randrange(3)
    if kind == 0:
        return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    if kind == 1:
        return b"\x81\x00" * depth + b"\xc0"  # {0: {0: ...}}
    # a request whose params field nests: decodable when the depth is within the unpacker's limit
    return b"\x94\x00\x01" + packb("infill") + b"\x81" + packb(rng.choice(["before", "lengths", "sampling"])) \
        + b"\x91" * depth + b"\xc0"


def gen_huge_header(rng: random.Random) -> bytes:
    claim = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 8 * 2**20, 2**20])
    head = rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"]) + claim.to_bytes(4, "big")
    if head[:1] == b"\xc9":
        head += b"\x05"  # ext32: the type byte
    if rng.random() < 0.5:  # inside a request: [0, 1, "infill", <huge>]
        head = b"\x94\x00\x01" + packb("infill") + head
    if rng.random() < 0.3:
        head = rng.choice([b"\xdc\xff\xff", b"\xde\xff\xff", b"\xda\xff\xff"])  # 16-bit: 65535 claimed
    return head + rng.randbytes(rng.randrange(0, 64))


def gen_bad_ext(rng: random.Random) -> bytes:
    """A request whose params are an extension value: timestamps of impossible lengths or values,
    application types, bad lengths."""
    ext = rng.choice([b"\xc7\x03\xff" + bytes(3), b"\xd4\xff\x00", b"\xd8\xff" + b"\xff" * 16,
                      b"\xc7\x0c\xff" + b"\xff" * 12, b"\xd5\x05ab", b"\xc8\xff\xff\x05", b"\xc9\x00\x00\x00\x00\x7f"])
    return b"\x94\x00\x01" + packb("status") + ext


def gen_shape(rng: random.Random):
    """A decodable message of the wrong shape: wrong type byte, length, id, method or params."""
    weird = lambda: rng.choice(WEIRD)
    kind = rng.randrange(6)
    if kind == 0:
        msg = weird()  # not an array at all
    elif kind == 1:
        msg = [rng.choice([0, 1, 2, 3, -1, 2**64 - 1, weird()]) for _ in range(rng.randrange(0, 7))]
    elif kind == 2:
        msg = [0, rng.choice([rng.randrange(10**6), weird()]), rng.choice(METHOD_NAMES + [weird()]), weird()]
    elif kind == 3:
        msg = [2, rng.choice(METHOD_NAMES + [weird()]), weird()]
    elif kind == 4:
        msg = [2, "cancel", rng.choice([weird(), {"id": weird()}, {"id": 1, "extra": weird()}])]
    else:
        msg = [rng.choice([1, 3, 0]), rng.randrange(10**6), rng.choice(METHOD_NAMES), weird(), weird()][:rng.choice([4, 5])]
    return message_frame(msg)


def gen_types(rng: random.Random):
    """A task request of the right shape whose params have a field of the wrong type or value."""
    method = rng.choice(["infill", "complete", "refine"])
    params = {k: v for k, v in SAMPLES[3][3].items()} if method == "refine" else dict(BASE)
    if method == "complete":
        params.pop("after")
    params["sampling"] = dict(params["sampling"])
    if rng.random() < 0.5:
        params[rng.choice(TASK_FIELDS)] = rng.choice(WEIRD)
    else:
        params["sampling"][rng.choice(SAMPLING_FIELDS)] = rng.choice(WEIRD)
    return message_frame([0, rng.randrange(1, 10**6), method, params])


def message_frame(msg):
    """(bytes, ids of replies to wait for): a request with an integer id must be answered."""
    expect = set()
    if isinstance(msg, list) and len(msg) == 4 and msg[0] == 0 and isinstance(msg[1], int) \
            and not isinstance(msg[1], bool) and -2**63 <= msg[1] < 2**64:
        expect.add(msg[1])
    return packb(msg), expect


STREAM_KINDS = {"random_bytes": gen_random_bytes, "truncated": gen_truncated, "bit_flips": gen_bit_flips,
                "deep_nesting": gen_deep_nesting, "huge_headers": gen_huge_header, "bad_ext": gen_bad_ext}
MESSAGE_KINDS = {"wrong_shapes": gen_shape, "wrong_types": gen_types}
WEIGHTS = {"random_bytes": 18, "truncated": 12, "bit_flips": 10, "deep_nesting": 5, "huge_headers": 6, "bad_ext": 3,
           "wrong_shapes": 25, "wrong_types": 14, "hostile_params": 10}


def huge_valid_frames() -> list[tuple[str, bytes]]:
    return [("array of 2,000,000 items", packb([0, 1, "status", [0] * 2_000_000])),
            ("map of 500,000 keys", packb([0, 2, "status", {str(i): 0 for i in range(500_000)}])),
            ("7.9 MB of before", packb([0, 3, "infill", {**BASE, "before": "y" * 7_900_000}])),
            ("9 MB bin (over the frame limit)", packb([0, 4, "status", {"blob": b"\0" * 9_000_000}]))]


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


# --- the run -----------------------------------------------------------------------------------

class Fuzzer:
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


def idle_latency(client: WellBehaved, n: int) -> list[float]:
    """The client's request n times on an otherwise idle daemon (after 3 warm-up requests)."""
    for _ in range(n + 3):
        client.one()
        time.sleep(client.pause_s)
    client.conn.close()
    return client.latencies[3:]


def settle_rss(daemon: Daemon, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return daemon.rss()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10_000, help="frames in the measured run (10,000)")
    p.add_argument("--warmup", type=int, default=None, help="frames before the RSS baseline (frames/10, <= 1000)")
    p.add_argument("--warmup-rounds", type=int, default=3,
                   help="rounds of every hostile param and huge frame at the start of the warm-up (3)")
    p.add_argument("--idle", type=int, default=40, help="well-behaved requests at idle (40)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", type=Path, default=None, help="checkpoint to serve (default: a tiny random one)")
    p.add_argument("--frame-timeout", type=float, default=2.0, help="daemon --frame-timeout (2 s)")
    p.add_argument("--max-connections", type=int, default=64, help="daemon --max-connections (64)")
    p.add_argument("--reply-timeout", type=float, default=30.0, help="seconds to wait for a reply (30)")
    every = ", ".join([*WEIGHTS, "huge_valid_frames", "many_connections", "slowloris"])
    p.add_argument("--only", default=None, help=f"fuzz only these categories, comma-separated ({every}), "
                                                "e.g. to find which one a figure comes from")
    add_threads_option(p)
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else min(1000, args.frames // 10)
    report = Report("fuzz", {"frames": args.frames, "warmup": warmup, "warmup_rounds": args.warmup_rounds,
                             "seed": args.seed, "only": args.only,
                             "frame_timeout": args.frame_timeout, "max_connections": args.max_connections,
                             "threads": args.threads})
    work = scratch("fuzz")
    model = args.model or tiny_model(work / "model")
    daemon = Daemon(model, work, "--no-watch", "--frame-timeout", str(args.frame_timeout),
                    "--max-connections", str(args.max_connections), env=torch_env(args.threads))
    try:
        measure(report, daemon, args, warmup)
    finally:
        daemon.stop()
    report.finish()  # after the daemon is gone: the JSON line is the last
    return 0


@dataclass
class Run:
    """What one fuzz run measured, for the report."""

    fuzzer: Fuzzer
    idle: list[float]  # well-behaved infill latencies at idle (ms)
    idle_status: list[float]  # `status` latencies at idle (ms)
    client: WellBehaved  # the infill loop during the fuzz
    status_client: WellBehaved  # the `status` loop during the fuzz
    rss_warm: int
    rss_end: int
    rss_samples: list[tuple[float, int]]
    seconds: float
    crashed: bool


def measure(report: Report, daemon: Daemon, args, warmup: int) -> None:
    run = fuzz(daemon, args, warmup)
    report_frames(report, daemon, run, args, warmup)
    report_memory(report, run)
    report_latency(report, run)
    report_categories(report, run)
    report_slowloris(report, run, args)
    f = run.fuzzer
    report.extra.update(categories={c: dict(v) for c, v in f.by_category.items()},
                        hostile={k: dict(v) for k, v in f.hostile_outcomes.items()},
                        hostile_messages=f.hostile_messages,
                        well_behaved=dict(run.client.names), well_behaved_status=dict(run.status_client.names),
                        daemon_exit=daemon.proc.returncode)


def fuzz(daemon: Daemon, args, warmup: int) -> Run:
    """Idle latencies, the warm-up, the RSS baseline, then the measured fuzz with the well-behaved
    clients and an RSS sampler running."""
    idle = idle_latency(WellBehaved(daemon), args.idle)
    idle_status = idle_latency(pinger(daemon), 5 * args.idle)
    fuzzer = Fuzzer(daemon, args)
    client, status_client = WellBehaved(daemon), pinger(daemon)
    client.start()  # during the warm-up too: its requests share batches with the fuzzer's
    status_client.start()
    t0 = time.monotonic()
    fuzzer.run(warmup, every_kind_first=args.warmup_rounds)
    fuzzer.finish_slowloris()
    rss_warm = settle_rss(daemon)
    for c in (client, status_client):  # latencies from here on (errors: from the start)
        c.latencies.clear()
        c.samples.clear()
    rss_samples = [(time.monotonic(), rss_warm)]
    sampler = threading.Thread(target=sample_rss, args=(daemon, client.stopping, rss_samples), daemon=True)
    sampler.start()
    fuzzer.run(args.frames)
    fuzzer.finish_slowloris()
    for c in (client, status_client):
        c.stopping.set()
        c.join(120)
    seconds = time.monotonic() - t0
    crashed = not daemon.alive()
    rss_end = 0 if crashed else settle_rss(daemon)
    return Run(fuzzer, idle, idle_status, client, status_client, rss_warm, rss_end, rss_samples, seconds, crashed)


def report_frames(report: Report, daemon: Daemon, run: Run, args, warmup: int) -> None:
    """Frames sent, crashes, and the daemon's tracebacks grouped by exception."""
    sent = sum(run.fuzzer.frames.values())
    report.section("frames")
    report.figure("frames_sent", "frames sent (warm-up included)", sent, "",
                  f">= {args.frames + warmup}", sent >= args.frames + warmup, kind="size")
    report.figure("seconds", "seconds of fuzzing", round(run.seconds, 1), "s")
    report.figure("crashes", "daemon crashes (process exited)", int(run.crashed), "", "0", not run.crashed)
    if run.crashed:
        report.note(f"the daemon exited with status {daemon.proc.returncode}; the end of its log:")
        report.note(daemon.log_text()[-2000:])
    tracebacks = daemon.tracebacks()
    report.figure("tracebacks", "tracebacks in the daemon's log", tracebacks, "", "0", tracebacks == 0)
    kinds: dict[str, list[str]] = defaultdict(list)  # the exception line -> its tracebacks
    for excerpt in daemon.traceback_excerpts(n=1000):
        kinds[excerpt.splitlines()[-1]].append(excerpt)
    for last, excerpts in kinds.items():
        report.note(f"{len(excerpts)} x {last}; the first, from the daemon's log:\n{excerpts[0]}")
    report.evidence("tracebacks", {last: len(excerpts) for last, excerpts in kinds.items()})


def report_memory(report: Report, run: Run) -> None:
    """Daemon RSS: after warm-up, at the quarters, at the end; growth against the goal."""
    growth = 100.0 * (run.rss_end - run.rss_warm) / run.rss_warm if run.rss_warm and run.rss_end else math.nan
    report.section("memory (daemon RSS)")
    report.figure("rss_warm_mb", "after warm-up", mb(run.rss_warm), "MB")
    report.figure("rss_end_mb", "at the end", mb(run.rss_end), "MB")
    report.figure("rss_peak_mb", "peak sampled during the fuzz", mb(max(r for _, r in run.rss_samples)), "MB")
    report.figure("rss_quarters_mb", "at 1/4, 1/2, 3/4 of the fuzz (a plateau, or a climb?)",
                  " / ".join(f"{mb(r)}" for r in quarters(run.rss_samples)), "MB")
    report.figure("rss_growth_pct", "growth, end vs after warm-up", round(growth, 2), "%", "< 5 %",
                  growth < 5.0, kind="memory")


def report_latency(report: Report, run: Run) -> None:
    """The well-behaved infill at idle and during the fuzz, the `status` loop (event-loop stalls),
    and what the fuzzer was sending when either was slow."""
    client, status_client, idle, f = run.client, run.status_client, run.idle, run.fuzzer
    report.section("well-behaved client (small infill)")
    p50_idle, p50_fuzz = percentile(idle, 0.5), percentile(client.latencies, 0.5)
    max_idle, max_fuzz = max(idle), max(client.latencies, default=math.nan)
    report.figure("idle_n", "requests at idle", len(idle))
    report.figure("fuzz_n", "requests during the fuzz", len(client.latencies))
    report.figure("idle_p50_ms", "p50 at idle", round(p50_idle, 1), "ms")
    report.figure("fuzz_p50_ms", "p50 during the fuzz", round(p50_fuzz, 1), "ms")
    report.figure("p50_ratio", "p50 during / idle", round(p50_fuzz / p50_idle, 2), "x", "<= 1.5x",
                  p50_fuzz <= 1.5 * p50_idle, kind="timing")
    report.figure("idle_max_ms", "max at idle", round(max_idle, 1), "ms")
    report.figure("fuzz_max_ms", "max during the fuzz", round(max_fuzz, 1), "ms")
    report.figure("max_ratio", "max during / idle", round(max_fuzz / max_idle, 2), "x", "<= 3x",
                  max_fuzz <= 3 * max_idle, kind="timing")
    slow_infill = 3 * max_idle
    report.note(f"infill slower than 3x the idle max ({slow_infill:.0f} ms): "
                f"{sum(ms > slow_infill for ms in client.latencies)}; sent meanwhile: "
                f"{dict(overlapping(client.samples, f.timeline, slow_infill).most_common(8))}")
    report.figure("status_idle_ms", "`status` (event loop only): p50 / max at idle",
                  f"{percentile(run.idle_status, 0.5):.1f} / {max(run.idle_status):.1f}", "ms")
    report.figure("status_fuzz_ms", "`status` (event loop only): p50 / max during",
                  f"{percentile(status_client.latencies, 0.5):.1f} / {max(status_client.latencies, default=0):.1f}",
                  "ms")
    stall_ms = 500.0
    stalls = sum(ms > stall_ms for ms in status_client.latencies)
    report.figure("status_stalls", f"`status` slower than {stall_ms:g} ms (event-loop stalls)", stalls)
    if stalls:
        report.note(f"sent meanwhile: {dict(overlapping(status_client.samples, f.timeline, stall_ms).most_common(8))}")
    failures = {k: v for k, v in client.names.items() if k != "ok"}
    failures.update({f"status: {k}": v for k, v in status_client.names.items() if k != "ok"})
    report.evidence("well_behaved_errors", failures)
    report.figure("well_behaved_errors", "well-behaved requests not answered", sum(failures.values()), "",
                  "0", not failures)
    if failures:
        report.note(f"errors: {dict(failures)}")


def report_categories(report: Report, run: Run) -> None:
    """The replies per category, hung frames, and each hostile param's replies."""
    f = run.fuzzer
    report.section("replies per category (error names; ok = a result)")
    for category in sorted(f.by_category):
        names = f.by_category[category]
        report.note(f"{category:<18} {f.frames[category]:>6} frames  "
                    + ", ".join(f"{k} {v}" for k, v in names.most_common()))
    unanswered = {c: n for c, names in f.by_category.items() for k, n in names.items()
                  if k.startswith("(no reply in") or k == "(not closed in time)"}
    report.figure("hung", "frames neither answered nor closed in time", sum(unanswered.values()), "", "0",
                  not unanswered)
    report.section("hostile params: replies, slowest (ms), the first error message")
    for label in sorted(f.hostile_outcomes):
        names = f.hostile_outcomes[label]
        ms = f.hostile_ms.get(label)
        message = f.hostile_messages.get(label, "")
        report.note(f"{label:<44} " + ", ".join(f"{k} {v}" for k, v in names.most_common())
                    + (f"  ({ms:.0f} ms)" if ms else "") + (f"  {message[:110]}" if message else ""))
    accepted = sorted(label for label, names in f.hostile_outcomes.items() if "ok" in names)
    report.note(f"answered with a result: {accepted}")
    report.extra["hostile_accepted"] = accepted


def report_slowloris(report: Report, run: Run, args) -> None:
    """Slowloris connections by mode (told TIMEOUT? closed when?) and the crowds."""
    f, slow = run.fuzzer, run.fuzzer.slow_results
    report.section(f"slowloris (daemon --frame-timeout {args.frame_timeout:g}) and crowds")
    for mode in SLOW_MODES:
        rows = [(name, secs) for m, name, secs in slow if m == mode]
        names = Counter(name for name, _ in rows)
        report.note(f"{mode:<11} {len(rows)} connections: {dict(names)}; closed after "
                    f"{min((x for _, x in rows), default=0):.2f} .. {max((x for _, x in rows), default=0):.2f} s")
    timeouts = sum(name == "TIMEOUT" for _, name, _ in slow)
    report.evidence("slowloris_timeouts", dict(f.by_category["slowloris"]))
    report.figure("slowloris_timeouts", "connections told TIMEOUT", timeouts, "", f"all {len(slow)}",
                  timeouts == len(slow))
    slowest = max((secs for _, _, secs in slow), default=0)
    report.figure("slowloris_close_s", "slowest close after the first byte", round(slowest, 2), "s",
                  f"<= {args.frame_timeout + 2:g} s", slowest <= args.frame_timeout + 2, kind="timing")
    crowd = f.by_category.get("many_connections", Counter())
    odd = {k: v for k, v in crowd.items() if k not in ("ok", "OVERLOADED")}
    report.figure("crowds", "crowds of --max-connections + 16 at once", f.crowds)
    report.figure("crowd_overloaded", "crowd connections told OVERLOADED", crowd.get("OVERLOADED", 0), "",
                  ">= 16 per crowd, the rest ok", crowd.get("OVERLOADED", 0) >= 16 * f.crowds and not odd)


def overlapping(samples: list[tuple[float, float]], timeline: list, over_ms: float) -> Counter:
    """For each sample slower than over_ms: what the fuzzer was sending meanwhile (by label)."""
    seen = Counter()
    for t0, ms in samples:
        if ms > over_ms:
            t1 = t0 + ms / 1000
            seen.update({what for start, end, what in timeline if start < t1 and end > t0})
    return seen


def sample_rss(daemon: Daemon, stop: threading.Event, samples: list) -> None:
    while not stop.wait(0.5):
        samples.append((time.monotonic(), daemon.rss()))


def quarters(samples: list[tuple[float, int]]) -> list[int]:
    """The samples nearest 1/4, 1/2 and 3/4 of the way through."""
    t0, t1 = samples[0][0], samples[-1][0]
    return [min(samples, key=lambda s: abs(s[0] - (t0 + q * (t1 - t0))))[1] for q in (0.25, 0.5, 0.75)]


if __name__ == "__main__":
    sys.exit(main())
