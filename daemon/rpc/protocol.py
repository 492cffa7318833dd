"""The daemon's wire protocol: msgpack-rpc framing, methods, typed params and results, errors.

One module, imported by both sides (the daemon and the language server's client); it must not
import torch. Framing is msgpack-rpc:

    request       [0, id, method, params]      client -> daemon, id an int
    response      [1, id, error, result]       daemon -> client, error None or an Error map
    notification  [2, method, params]          either way

Methods (direction, params, result, errors):

    auth      client -> daemon, request. {token}. Result {"ok": true}. The first message on a
              TCP connection; anything else first is refused with UNAUTHORIZED and the
              connection closed. Unix sockets need no token (the socket file is 0600).
    status    client -> daemon, request. {}. Result Status.
    complete  client -> daemon, request. CompleteParams. Result TaskResult.
    infill    client -> daemon, request. InfillParams. Result TaskResult.
    refine    client -> daemon, request. RefineParams. Result TaskResult.
              Errors for the three: INVALID_PARAMS, TOO_LARGE (canvas, sequence), CANCELLED
              (by `cancel`, by a newer request of the same group, or the client went away),
              OVERLOADED (queue full), MODEL_ERROR.
    cancel    client -> daemon, notification. {id}: the request id on this connection.
    shutdown  client -> daemon, request. {}. Result {"ok": true}; then the daemon exits.
    progress  daemon -> client, notification, for requests sent with progress=true:
              {id, step, steps, masks_left, text} with the region's partial canvas as text.

Every error is {"code": int, "name": str, "message": str, "data": map}; messages carry the
values ("canvas of 9000 tokens exceeds the limit of 1024").
"""

from __future__ import annotations

import dataclasses
import reprlib
import enum
import types
import typing
from dataclasses import dataclass, field

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
PROTOCOL_VERSION = 1


class ErrorCode(enum.IntEnum):
    INVALID_PARAMS = 1
    TOO_LARGE = 2
    CANCELLED = 3
    OVERLOADED = 4
    MODEL_ERROR = 5
    INTERNAL = 6
    METHOD_NOT_FOUND = 7
    UNAUTHORIZED = 8
    INVALID_FRAME = 9
    TIMEOUT = 10  # a TCP client did not authenticate, or a frame did not arrive whole, in time


class RPCError(Exception):
    """An error reply, on either side of the wire."""

    def __init__(self, code: ErrorCode, message: str, data: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.data = ErrorCode(code), message, data or {}

    def to_wire(self) -> dict:
        return {"code": int(self.code), "name": self.code.name, "message": self.message, "data": self.data}

    @classmethod
    def from_wire(cls, err) -> "RPCError":
        if not isinstance(err, dict):
            return cls(ErrorCode.INTERNAL, f"malformed error reply: {err!r}")
        try:
            code = ErrorCode(err.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(code, str(err.get("message", "")), err.get("data") or {})

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# --- parameters -------------------------------------------------------------------------------

@dataclass
class Sampling:
    """Sampler options of the task methods. A field not sent (or nil) takes the daemon's default,
    which is the engine's (daemon/engine/options.py `Options`, where each is explained): the wire
    restates none of them. 0 turns top_k off; top_p 1 turns nucleus filtering off."""

    max_new_tokens: int | None = None  # the canvas (with length "auto": its upper bound)
    length: str | None = None  # fixed | auto
    steps: int | None = None
    alg: str | None = None  # origin | maskgit_plus | topk_margin | entropy
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # 0: off
    alg_temp: float | None = None
    eps: float | None = None
    seed: int | None = None
    decoding: str | None = None  # exact | fast (`serve --decoding`)
    threshold: float | None = None  # fast: reveal every token at least this probable
    block_size: int | None = None  # fast: positions decoded together against the cache
    prefix_cache: bool | None = None  # fast: reuse the group's far context (`serve --prefix-cache`)


@dataclass
class Request:
    """Scheduling fields every task request has."""

    group: str | None = None  # a newer request of the same group cancels this one
    deadline_ms: int | None = None  # answer within this time: remaining masks filled in one step
    progress: bool = False  # send progress notifications with the partial canvas
    sampling: Sampling = field(default_factory=Sampling)
    before_tokens: int | None = None  # keep at most this many tokens of the text before (nearest the region)
    after_tokens: int | None = None  # keep at most this many tokens of the text after


@dataclass
class CompleteParams(Request):
    before: str = ""


@dataclass
class InfillParams(Request):
    before: str = ""
    after: str = ""
    lengths: list[int] | None = None  # try these canvas sizes, keep the most confident
    # up to this many different middles, ranked by the coupled likelihood (daemon/engine/ranking.py):
    # the result is the best, `alternatives` lists them all best first; not with `lengths`
    alternatives: int | None = None


@dataclass
class RefineParams(Request):
    before: str = ""
    span: str = ""
    after: str = ""
    fraction: float = 0.3


@dataclass
class CancelParams:
    id: int = 0


@dataclass
class AuthParams:
    token: str = ""


# --- results ----------------------------------------------------------------------------------

@dataclass
class TaskResult:
    text: str
    tokens: list[str]
    confidence: list[float]
    steps: int  # denoising steps run
    finished_early: bool  # the deadline cut the schedule short
    elapsed_ms: float
    queued_ms: float
    candidates: list[dict] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # per token, the denoising step that revealed it (-1: kept)
    alternatives: list[dict] = field(default_factory=list)  # {text, score, confidence, temperature, tokens, order}
    refined: dict = field(default_factory=dict)  # refine: {"lines", "changed", "kept"} (kept: rewrites rejected)
    # the code the model saw: {"before_tokens", "after_tokens", "before_chars_cut", "after_chars_cut"}
    context: dict = field(default_factory=dict)
    ar_ness: dict = field(default_factory=dict)  # {"local", "global"} in [0, 1]: 1.0 is left-to-right


@dataclass
class Status:
    version: str
    protocol: int
    model: str
    device: str
    dtype: str
    quantization: str
    memory: dict  # bytes: {"weights", "weights_by_dtype": {dtype: n}, "rss_peak", "cuda_allocated"?, ...}
    queue: dict  # {"pending": n, "running": n, "limit": n}
    counters: dict  # {"completed": n, "cancelled": n, "failed": n}
    uptime_s: float
    # {"state": "idle" | "loading" | "ok" | "failed", "error": str | None, "at": ts,
    #  "reloads": n (the model's), "adapter_reloads": n}
    reload: dict
    limits: dict
    # the LoRA adapter (`serve --adapter`), or None: {"path", "rank", "alpha", "layers", "base_sha256",
    # "steps", "last_reward"} (daemon/engine/lora.py AdapterInfo.summary). Optional: a client must
    # not rely on it being present (older daemons do not send it).
    adapter: dict | None = None


METHODS: dict[str, type | None] = {
    "auth": AuthParams,
    "status": None,
    "complete": CompleteParams,
    "infill": InfillParams,
    "refine": RefineParams,
    "shutdown": None,
}
TASK_METHODS = ("complete", "infill", "refine")


def short(value) -> str:
    """A bounded repr of a client's value for error messages: a frame may hold megabytes, and a
    plain repr of a list nested a thousand deep raises RecursionError."""
    return _repr.repr(value)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2


def _check(value, tp, where: str):
    """Validate one value against a type annotation; returns the (converted) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except RPCError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RPCError(ErrorCode.INVALID_PARAMS, f"{where} must be a list, got {short(value)}")
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_wire(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RPCError(ErrorCode.INVALID_PARAMS, f"{where} must be {tp.__name__}, got {short(value)}")
    return value


def from_wire(cls, params, where: str = "params"):
    """Build a params dataclass from a msgpack map, naming any bad field and its value."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RPCError(ErrorCode.INVALID_PARAMS, f"{where} must be a map, got {type(params).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in params if k not in names]
    if unknown:
        raise RPCError(ErrorCode.INVALID_PARAMS,
                       f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(names))})")
    values = {k: _check(v, hints[k], f"{where}.{k}") for k, v in params.items()}
    return cls(**values)


def to_wire(obj) -> dict:
    return dataclasses.asdict(obj)
