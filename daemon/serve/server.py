"""The daemon's server: one model per machine, served over msgpack-rpc to every editor window.

Listens on a Unix socket (directory 0700, socket 0600) or on loopback TCP with a token. Reads
frames with a streaming msgpack Unpacker, checks them, and hands task requests to the
scheduler; answers `status` itself. A bad frame gets an error reply, or closes that one
connection when the stream cannot be trusted any more; no client can take the daemon down or
disturb the others. Knows messages and limits; the model runs in the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import resource
import time
from dataclasses import dataclass

import msgpack

from ..rpc.address import Address, write_token
from ..rpc.protocol import (METHODS, NOTIFICATION, PROTOCOL_VERSION, REQUEST, RESPONSE, TASK_METHODS,
                       CancelParams, ErrorCode, RPCError, Status, from_wire, short, to_wire)
from .scheduler import Scheduler

log = logging.getLogger("diffucode.server")


@dataclass
class ServerLimits:
    max_frame_bytes: int = 8 * 1024 * 1024  # one message
    max_queue: int = 16  # pending task requests, all clients together
    max_connections: int = 64
    auth_timeout_s: float = 5.0  # a TCP client must send `auth` within this time
    frame_timeout_s: float = 10.0  # a frame, once begun, must arrive whole within this time
    idle_evict_s: float = 30.0  # when the daemon is full, a connection idle this long gives way


LINGER_S = 5.0  # after an error that closes a connection: how long to drain the client's bytes
BACKLOG = 1024  # pending connects the kernel queues: past the limit a client is told OVERLOADED
# Decoding limits: no message of the protocol needs more, and a frame of 2 M tiny elements would
# otherwise cost seconds of the event loop that every client shares.
MAX_ARRAY_LEN = 1024
MAX_MAP_LEN = 64


class Connection:
    """One client: its writer, its requests in flight (for `cancel` and for cleanup)."""

    def __init__(self, server: "DaemonServer", reader, writer, needs_auth: bool):
        self.server, self.reader, self.writer = server, reader, writer
        self.authenticated = not needs_auth
        self.jobs: dict[int, object] = {}  # request id -> scheduler Job
        self.name = f"client-{id(self) & 0xffff:04x}"
        self.opened = self.last_active = time.monotonic()
        self.task: asyncio.Task | None = None
        self.evicted = False

    def idle_for(self, now: float) -> float:
        """Seconds since the last whole frame, or 0 while a request is in flight."""
        return 0.0 if self.jobs else now - self.last_active

    def evict(self, why: str) -> None:
        """Tell an idle client why it is closed, then close it (its serve task ends)."""
        self.evicted = True
        self.reply(None, RPCError(ErrorCode.OVERLOADED, why))
        if self.task is not None:
            self.task.cancel()

    def send(self, message) -> None:
        if not self.writer.is_closing():
            self.writer.write(msgpack.packb(message, use_bin_type=True))

    def reply(self, msgid, error: RPCError | None, result=None) -> None:
        self.send([RESPONSE, msgid, error.to_wire() if error else None, result])

    async def serve(self) -> None:
        """Answer frames until the client closes, or until an error ends the connection: then
        its requests stop at once and the error reply is delivered before the close."""
        gave_up = False
        try:
            gave_up = await self._answer_frames()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            for job in self.jobs.values():
                job.cancel("the client disconnected")
            if not gave_up:
                self.writer.close()
        if gave_up:
            await close_after_error(self.reader, self.writer)

    async def _answer_frames(self) -> bool:
        """Read and answer frames; False when the client closed, True after an error reply that
        ends the connection."""
        limits = self.server.limits
        size = limits.max_frame_bytes
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=size, strict_map_key=False,
                                    max_str_len=size, max_bin_len=size, max_ext_len=size,
                                    max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)
        fed = 0  # bytes fed; unpacker.tell() of them are whole frames already read
        frame_started = None  # when the first byte of a frame not yet whole arrived
        while True:
            deadline, why = None, ""
            if not self.authenticated:
                deadline, why = self.opened + limits.auth_timeout_s, (
                    f"no `auth` within {limits.auth_timeout_s:g} s; closing")
            if frame_started is not None and (deadline is None or frame_started + limits.frame_timeout_s < deadline):
                deadline, why = frame_started + limits.frame_timeout_s, (
                    f"a frame begun {limits.frame_timeout_s:g} s ago is still incomplete; closing")
            try:
                if deadline is None:
                    data = await self.reader.read(65536)
                else:
                    data = await asyncio.wait_for(self.reader.read(65536), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.reply(None, RPCError(ErrorCode.TIMEOUT, why))
                return True
            if not data:
                return False
            try:
                unpacker.feed(data)
            except msgpack.BufferFull:
                self.reply(None, RPCError(ErrorCode.TOO_LARGE, f"frame exceeds the limit of {size} bytes; closing"))
                return True
            fed += len(data)
            completed = False
            while True:
                try:
                    message = next(unpacker)
                except StopIteration:
                    break
                except Exception as e:  # FormatError, StackError, a size limit, unhashable map keys, ...
                    # the byte stream is no longer trustworthy: answer, then close this connection
                    reason = str(e) or type(e).__name__
                    self.reply(None, RPCError(ErrorCode.INVALID_FRAME, f"undecodable msgpack ({reason}); closing"))
                    return True
                self.last_active, completed = time.monotonic(), True
                if not await self.handle(message):
                    return True
            # Only a whole message ends a frame's clock (tell() also moves through the items of a
            # message still arriving, so it cannot say alone that nothing is pending).
            if completed:
                frame_started = None if unpacker.tell() == fed else time.monotonic()
            elif frame_started is None:
                frame_started = time.monotonic()
            await self.writer.drain()

    async def handle(self, message) -> bool:
        """Dispatch one decoded message; False closes the connection."""
        if not self.authenticated:  # TCP: anything but a good `auth` first is refused and closes
            return self.authenticate(message)
        if not isinstance(message, (list, tuple)) or not message:
            self.reply(None, RPCError(ErrorCode.INVALID_FRAME, f"expected an array [type, ...], got {short(message)}"))
            return True
        kind = message[0]
        if kind == REQUEST and len(message) == 4:
            _, msgid, method, params = message
            if not isinstance(msgid, int) or isinstance(msgid, bool) or not isinstance(method, str):
                self.reply(msgid if isinstance(msgid, int) else None, RPCError(
                    ErrorCode.INVALID_FRAME, f"request needs an integer id and a string method, got "
                                             f"{short(msgid)} and {short(method)}"))
                return True
            await self.request(msgid, method, params)
            return True
        if kind == NOTIFICATION and len(message) == 3:
            _, method, params = message
            if method == "cancel":
                try:
                    p = from_wire(CancelParams, params)
                except RPCError as e:
                    log.warning("%s: bad cancel: %s", self.name, e)
                    return True
                job = self.jobs.get(p.id)
                if job is not None:
                    job.cancel(f"cancelled by the client (request {p.id})")
            return True
        self.reply(None, RPCError(ErrorCode.INVALID_FRAME,
                                  f"expected [0, id, method, params] or [2, method, params], got {short(message)}"))
        return True

    def authenticate(self, message) -> bool:
        """The first message of a TCP connection: `auth` with the token, else UNAUTHORIZED (a
        request's id echoed when it has one) and the connection is closed (False)."""
        is_request = isinstance(message, (list, tuple)) and len(message) == 4 and message[0] == REQUEST
        msgid = message[1] if is_request and isinstance(message[1], int) and not isinstance(message[1], bool) else None
        if is_request and message[2] == "auth" and msgid is not None and self.server.check_token(message[3]):
            self.authenticated = True
            self.reply(msgid, None, {"ok": True})
            return True
        if is_request or not isinstance(message, (list, tuple)) or message[:1] != [NOTIFICATION]:
            self.reply(msgid, RPCError(ErrorCode.UNAUTHORIZED, "this TCP connection must first send `auth` with "
                                                               "the daemon's token"))
        return False

    async def request(self, msgid: int, method: str, params) -> None:
        if method not in METHODS:
            self.reply(msgid, RPCError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {short(method)} "
                                                                   f"(known: {', '.join(METHODS)})"))
            return
        if method == "auth":
            self.reply(msgid, None, {"ok": True})
        elif method == "status":
            self.reply(msgid, None, to_wire(self.server.status()))
        elif method == "shutdown":
            self.reply(msgid, None, {"ok": True})
            await self.writer.drain()
            self.server.request_shutdown()
        elif method in TASK_METHODS:
            if msgid in self.jobs:
                self.reply(msgid, RPCError(ErrorCode.INVALID_PARAMS, f"request id {msgid} is already in flight"))
                return
            try:
                p = from_wire(METHODS[method], params)
                job = self.server.scheduler.submit(
                    method, p, on_progress=self._progress(msgid) if p.progress else None)
            except RPCError as e:
                self.reply(msgid, e)
                return
            self.jobs[msgid] = job
            job.future.add_done_callback(lambda fut: self._done(msgid, fut))

    def _progress(self, msgid: int):
        def send(update: dict) -> None:
            self.send([NOTIFICATION, "progress", {"id": msgid, **update}])
        return send

    def _done(self, msgid: int, fut: asyncio.Future) -> None:
        self.jobs.pop(msgid, None)
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            self.reply(msgid, err if isinstance(err, RPCError) else RPCError(ErrorCode.INTERNAL, str(err)))
        else:
            self.reply(msgid, None, to_wire(fut.result()))


async def close_after_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a connection the daemon gives up on without losing the error reply it just wrote.

    Closing a socket that still holds unread bytes from the client makes the kernel reset the
    connection, and the client then sees the reset instead of the reply (TCP drops the reply
    itself). So flush, shut our side (the client reads the reply, then the end of the stream),
    and read and drop what the client still sends, until it closes too or LINGER_S pass.
    """
    async def drop_until_eof():
        while await reader.read(65536):
            pass

    try:
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.wait_for(drop_until_eof(), LINGER_S)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


class DaemonServer:
    def __init__(self, model_state, address: Address, limits: ServerLimits | None = None):
        self.model = model_state  # ModelState: the current Tasks, its description, reload state
        self.address = address
        self.limits = limits or ServerLimits()
        self.scheduler = Scheduler(lambda: self.model.tasks, self.limits.max_queue,
                                   model_lock=getattr(model_state, "in_use", None))
        self.started = time.time()
        self.connections: set[Connection] = set()
        self._token: str | None = None
        self._stopped = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    def check_token(self, params) -> bool:
        token = params.get("token") if isinstance(params, dict) else None
        return isinstance(token, str) and self._token is not None and hmac.compare_digest(token, self._token)

    async def start(self) -> None:
        if self.address.is_tcp:
            self._token = write_token(self.address.token_file)
            self._server = await asyncio.start_server(self._accept, self.address.host, self.address.port,
                                                      backlog=BACKLOG)
            log.info("listening on %s (token in %s)", self.address, self.address.token_file)
        else:
            path = self.address.socket
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            old = os.umask(0o177)  # the socket is created 0600: no window where others can connect
            try:
                self._server = await asyncio.start_unix_server(self._accept, path=str(path), backlog=BACKLOG)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            log.info("listening on %s", path)

    def _refusal(self) -> str | None:
        """Why a new connection cannot be taken now (after making room if an idle one can give way)."""
        limit = self.limits.max_connections
        if self.address.is_tcp:  # at most half the places wait for a token: the oldest gives way
            waiting = [c for c in self.connections if not c.authenticated and not c.evicted]
            if len(waiting) >= max(1, limit // 2):
                oldest = min(waiting, key=lambda c: c.opened)
                log.info("%s: closed unauthenticated to make room", oldest.name)
                oldest.evict(f"closing this connection, not authenticated after {time.monotonic() - oldest.opened:.1f} "
                             f"s: {len(waiting)} connections wait for `auth`, the limit of {max(1, limit // 2)} (half "
                             f"of {limit} places, so that clients with the token always get in)")
        live = [c for c in self.connections if not c.evicted]
        if len(live) < limit:
            return None
        now = time.monotonic()
        idlest = max(live, key=lambda c: c.idle_for(now))
        if idlest.idle_for(now) >= self.limits.idle_evict_s:
            log.info("%s: closed after %.0f s idle to make room", idlest.name, idlest.idle_for(now))
            idlest.evict(f"closing this connection, idle for {idlest.idle_for(now):.0f} s, to make room: the daemon "
                         f"has {limit} connections, its limit; reconnect when needed")
            return None
        return f"{len(live)} connections is the limit of {limit}; try again later"

    async def _accept(self, reader, writer) -> None:
        refusal = self._refusal()
        if refusal:
            conn = Connection(self, reader, writer, needs_auth=False)
            conn.reply(None, RPCError(ErrorCode.OVERLOADED, refusal))
            await close_after_error(reader, writer)
            return
        conn = Connection(self, reader, writer, needs_auth=self.address.is_tcp)
        conn.task = asyncio.current_task()
        self.connections.add(conn)
        try:
            await conn.serve()
        except Exception:  # never let one connection's bug reach the server
            log.exception("%s: connection failed", conn.name)
        finally:
            self.connections.discard(conn)

    def status(self) -> Status:
        m = self.model
        return Status(
            version=__import__("diffucode").__version__, protocol=PROTOCOL_VERSION,
            model=str(m.source), device=m.device, dtype=m.dtype, quantization=m.quantization,
            memory=m.memory(), queue=self.scheduler.queue_state(),
            counters={**self.scheduler.counters, "last_cancelled_steps": self.scheduler.last_cancelled_steps,
                      "connections": len(self.connections)},
            uptime_s=time.time() - self.started, reload=dict(m.reload_state),
            adapter=getattr(m, "adapter", None),
            limits={"max_frame_bytes": self.limits.max_frame_bytes, "max_queue": self.limits.max_queue,
                    "max_canvas_tokens": m.tasks.limits.max_canvas_tokens,
                    "max_context_tokens": m.tasks.limits.max_context_tokens, "pid": os.getpid()})

    def request_shutdown(self) -> None:
        self._stopped.set()

    async def run_until_stopped(self) -> None:
        await self._stopped.wait()
        log.info("shutting down")
        self._server.close()
        self.scheduler.stop()
        for conn in list(self.connections):
            conn.writer.close()
        if not self.address.is_tcp:
            try:
                self.address.socket.unlink()
            except FileNotFoundError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.wait_idle, 5.0)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
