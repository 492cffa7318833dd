"""What fuzz.py throws at the daemon: hostile params, and generators of frames of every kind
(random bytes, truncated and bit-flipped messages, deep nesting, huge headers, bad extension
values, messages of the wrong shape or types, huge valid frames). The generators draw only from
the random.Random they are given, so that --seed repeats a run frame for frame.
"""

from __future__ import annotations

import random

import msgpack

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
