"""The language server's client for the model daemon: msgpack-rpc over a Unix socket or loopback
TCP, with progress, timeouts, cancellation, spawning the daemon, and reconnecting with backoff.

It exists so that the language server talks to the daemon through one small, tested piece that
never hangs its caller: a dropped connection fails every pending request at once, a cancelled
or timed-out request is cancelled in the daemon too, and a daemon that is down is reported at
once (DaemonUnavailable) and tried again only after a backoff. It knows the protocol module,
the address and asyncio; it must not know torch, tasks or the model (the language server
imports it, and must start fast and stay small).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import itertools
import logging
import time
from typing import Any, Callable

import msgpack

from .address import Address, default_address
from ..errors import DaemonUnavailable, DiffucodeError
from .spawn import Spawner, SpawnOptions
from .protocol import (NOTIFICATION, REQUEST, RESPONSE, CompleteParams, ErrorCode, InfillParams,
                       RefineParams, RPCError, TaskResult, to_wire)

__all__ = ["DaemonClient", "DaemonUnavailable", "ReconnectingClient", "SpawnOptions", "probe"]

log = logging.getLogger("diffucode.client")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one reply; results are text, far below this
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 8.0

ProgressCallback = Callable[[dict], None]


class _Methods(abc.ABC):
    """The protocol's methods as typed calls, on top of `request`."""

    @abc.abstractmethod
    async def request(self, method: str, params=None, *, timeout: float | None = None,
                      on_progress: ProgressCallback | None = None) -> Any:
        """Send one request; each client defines how."""

    async def status(self, *, timeout: float | None = None) -> dict:
        return await self.request("status", {}, timeout=timeout)

    async def complete(self, params: CompleteParams, *, timeout: float | None = None,
                       on_progress: ProgressCallback | None = None) -> TaskResult:
        return _task_result(await self.request("complete", params, timeout=timeout, on_progress=on_progress))

    async def infill(self, params: InfillParams, *, timeout: float | None = None,
                     on_progress: ProgressCallback | None = None) -> TaskResult:
        return _task_result(await self.request("infill", params, timeout=timeout, on_progress=on_progress))

    async def refine(self, params: RefineParams, *, timeout: float | None = None,
                     on_progress: ProgressCallback | None = None) -> TaskResult:
        return _task_result(await self.request("refine", params, timeout=timeout, on_progress=on_progress))

    async def shutdown(self, *, timeout: float | None = None) -> dict:
        return await self.request("shutdown", {}, timeout=timeout)


class DaemonClient(_Methods):
    """One connection to the daemon. Requests may run concurrently; one reader task answers them."""

    def __init__(self, address: Address | None = None, *, spawn: SpawnOptions | None = None,
                 connect_timeout: float = 10.0):
        self.address = address or default_address()
        self.spawn = spawn
        self.connect_timeout = connect_timeout
        self.last_request_id = 0
        self.close_reason: str | None = None  # why the last connection ended
        self.disconnected_at: float | None = None  # time.monotonic() when it ended
        self._frame_error: RPCError | None = None  # the daemon's last error about no request (id None)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future] = {}
        self._progress: dict[int, ProgressCallback] = {}
        self._ids = itertools.count(1)
        self._spawner = Spawner(self.address, spawn, connect_timeout, self._open) if spawn else None

    @property
    def spawned_pid(self) -> int | None:
        """The daemon this client started, if it started one."""
        return self._spawner.pid if self._spawner else None

    @property
    def spawned_process(self):
        """The subprocess.Popen of the daemon this client started (to wait on it), or None."""
        return self._spawner.process if self._spawner else None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    # --- connecting ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (spawning the daemon if asked and nobody listens); on TCP, authenticate.

        Raises DaemonUnavailable, or RPCError(UNAUTHORIZED) when the daemon refuses the token.
        """
        if self.connected:
            return
        deadline = time.monotonic() + self.connect_timeout
        try:
            reader, writer = await self._open()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if self.spawn is None:
                raise DaemonUnavailable(f"no daemon is listening at {self.address} ({e.strerror})") from e
            reader, writer = await self._spawner.spawn_and_open(deadline)
        except DaemonUnavailable:
            raise
        except OSError as e:
            raise DaemonUnavailable(f"cannot connect to the daemon at {self.address}: {e}") from e
        self.close_reason = self.disconnected_at = self._frame_error = None
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader, writer),
                                                name=f"diffucode-client {self.address}")
        if self.address.is_tcp:
            try:
                token = self.address.read_token()
                await self.request("auth", {"token": token}, timeout=max(deadline - time.monotonic(), 1.0))
            except (DiffucodeError, TimeoutError) as e:  # no token file; no answer to `auth`
                await self.close()
                raise DaemonUnavailable(str(e), listening=True) from e
            except RPCError as e:  # UNAUTHORIZED: the file holds another token; say which file, and the fix
                await self.close()
                if e.code != ErrorCode.UNAUTHORIZED:
                    raise
                raise RPCError(e.code, f"the daemon at {self.address} refused the token in {self.address.token_file} "
                                       f"({e.message}); {self.address.token_help()}", e.data) from e
            except BaseException:
                await self.close()
                raise
        log.info("connected to the daemon at %s", self.address)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        a = self.address
        opening = (asyncio.open_connection(a.host, a.port) if a.is_tcp
                   else asyncio.open_unix_connection(str(a.socket)))
        try:
            return await asyncio.wait_for(opening, self.connect_timeout)
        except asyncio.TimeoutError:
            raise DaemonUnavailable(f"connecting to {a} took over {self.connect_timeout} s") from None

    async def close(self) -> None:
        """Close the connection; requests still waiting raise DaemonUnavailable."""
        task, writer = self._reader_task, self._writer
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # not `await task`: that would swallow our own cancellation
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    # --- requests -----------------------------------------------------------------------------

    async def request(self, method: str, params=None, *, timeout: float | None = None,
                      on_progress: ProgressCallback | None = None) -> Any:
        """Send one request and return its result; raises RPCError for an error reply.

        A timeout, or the awaiting task being cancelled, sends `cancel` for the request first.
        A lost connection raises DaemonUnavailable (also for a request made while disconnected).
        """
        wire = _params_to_wire(params)
        if on_progress is not None:
            wire["progress"] = True
        self._check_connected()
        msgid = next(self._ids)
        self.last_request_id = msgid
        reply = asyncio.get_running_loop().create_future()
        self._pending[msgid] = reply
        if on_progress is not None:
            self._progress[msgid] = on_progress
        sent = False
        try:
            async with self._write_lock:
                self._check_connected()
                self._writer.write(msgpack.packb([REQUEST, msgid, method, wire], use_bin_type=True))
                sent = True
                await self._writer.drain()
            return await asyncio.wait_for(reply, timeout)
        except asyncio.TimeoutError:
            self._send_cancel(msgid)
            raise TimeoutError(f"{method} request {msgid} got no reply within {timeout} s; "
                               f"asked the daemon to cancel it") from None
        except asyncio.CancelledError:
            if sent:
                self._send_cancel(msgid)
            raise
        except DaemonUnavailable:
            raise
        except OSError as e:  # the write failed: the reader task fails the others
            raise DaemonUnavailable(f"lost the connection to the daemon at {self.address}: {e}") from e
        finally:
            self._pending.pop(msgid, None)
            self._progress.pop(msgid, None)

    async def notify(self, method: str, params=None) -> None:
        self._check_connected()
        frame = msgpack.packb([NOTIFICATION, method, _params_to_wire(params)], use_bin_type=True)
        try:
            async with self._write_lock:
                self._check_connected()
                self._writer.write(frame)
                await self._writer.drain()
        except DaemonUnavailable:
            raise
        except OSError as e:
            raise DaemonUnavailable(f"lost the connection to the daemon at {self.address}: {e}") from e

    def _send_cancel(self, msgid: int) -> None:
        # Written without awaiting (we may be inside a cancellation); one write() is one whole
        # frame, so it cannot interleave with another frame's bytes.
        if self.connected:
            self._writer.write(msgpack.packb([NOTIFICATION, "cancel", {"id": msgid}]))

    def _check_connected(self) -> None:
        if not self.connected:
            why = f": {self.close_reason}" if self.close_reason else ""
            raise DaemonUnavailable(f"not connected to the daemon at {self.address}{why}")

    # --- the reader ---------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES, strict_map_key=False)
        reason = "the daemon closed the connection"
        try:
            while data := await reader.read(65536):
                unpacker.feed(data)
                for message in unpacker:
                    self._dispatch(message)
            if self._frame_error is not None:  # e.g. OVERLOADED: too many clients; it says so, then closes
                reason = f"the daemon closed the connection: {self._frame_error}"
        except asyncio.CancelledError:
            reason = "the client closed the connection"
            raise
        except Exception as e:  # reset, undecodable stream, reply over the size limit
            reason = f"the connection to the daemon failed ({type(e).__name__}: {e})"
        finally:
            self._lost(writer, reason)

    def _dispatch(self, message) -> None:
        if isinstance(message, list) and len(message) == 4 and message[0] == RESPONSE:
            _, msgid, error, result = message
            reply = self._pending.get(msgid) if isinstance(msgid, int) else None
            if reply is None:  # a late reply to a request given up on, or an error about a frame (id None)
                err = RPCError.from_wire(error) if error is not None else None
                about_a_frame = msgid is None and err is not None
                if about_a_frame:
                    self._frame_error = err  # the daemon may close next: this is why
                log.log(logging.WARNING if about_a_frame else logging.DEBUG,
                        "the daemon replied to request %r: %s", msgid, err or "ok")
            elif not reply.done():
                if error is not None:
                    reply.set_exception(RPCError.from_wire(error))
                else:
                    reply.set_result(result)
        elif isinstance(message, list) and len(message) == 3 and message[0] == NOTIFICATION:
            _, method, params = message
            msgid = params.get("id") if method == "progress" and isinstance(params, dict) else None
            callback = self._progress.get(msgid) if isinstance(msgid, int) else None
            if callback is not None:
                try:
                    callback(params)
                except Exception:
                    log.exception("a progress callback failed")
        else:
            log.warning("ignoring an unexpected message from the daemon: %.200r", message)

    def _lost(self, writer: asyncio.StreamWriter, reason: str) -> None:
        if self._writer is writer:
            self._writer = None
        writer.close()
        self.close_reason, self.disconnected_at = reason, time.monotonic()
        for msgid, reply in list(self._pending.items()):
            if not reply.done():
                reply.set_exception(DaemonUnavailable(f"{reason} ({self.address}) while request {msgid} was waiting"))
        log.info("disconnected from the daemon at %s: %s", self.address, reason)

class ReconnectingClient(_Methods):
    """The language server's handle on the daemon: connects on demand, never waits on a dead one.

    When the daemon is down, calls raise DaemonUnavailable at once; the next connection attempt
    is allowed only after a backoff (0.25 s doubling to 8 s, reset by a success). Concurrent
    callers share one attempt. `state` and `last_error` say what is going on, for the editor.
    """

    def __init__(self, address: Address | None = None, *, spawn: SpawnOptions | None = None,
                 connect_timeout: float = 10.0):
        self.address = address or default_address()
        self.spawn = spawn
        self.connect_timeout = connect_timeout
        self.client: DaemonClient | None = None
        self._last_error: str | None = None
        self._backoff = BACKOFF_MIN_S
        self._retry_at = 0.0  # time.monotonic() before which no attempt is made
        self._attempt: asyncio.Task | None = None

    @property
    def state(self) -> str:
        """One of "connected", "connecting", "down"."""
        self._note_drop()
        if self.client is not None:
            return "connected"
        return "connecting" if self._attempt is not None else "down"

    @property
    def last_error(self) -> str | None:
        """Why the daemon is down (None while connected)."""
        self._note_drop()
        return self._last_error

    @property
    def retry_in(self) -> float:
        """Seconds until the next connection attempt is allowed."""
        return max(0.0, self._retry_at - time.monotonic())

    @property
    def last_request_id(self) -> int:
        return self.client.last_request_id if self.client else 0

    async def ensure_connected(self) -> DaemonClient:
        """The connected client; raises DaemonUnavailable at once while in backoff."""
        self._note_drop()
        if self.client is not None:
            return self.client
        if self._attempt is None:
            if self.retry_in > 0:
                raise DaemonUnavailable(f"{self._last_error}; next attempt in {self.retry_in:.2f} s")
            self._attempt = asyncio.create_task(self._connect())
            self._attempt.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        return await asyncio.shield(self._attempt)  # a cancelled caller leaves it to the others

    async def request(self, method: str, params=None, *, timeout: float | None = None,
                      on_progress: ProgressCallback | None = None) -> Any:
        client = await self.ensure_connected()
        return await client.request(method, params, timeout=timeout, on_progress=on_progress)

    async def notify(self, method: str, params=None) -> None:
        await (await self.ensure_connected()).notify(method, params)

    async def close(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()
            await asyncio.wait([attempt])
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _connect(self) -> DaemonClient:
        client = DaemonClient(self.address, spawn=self.spawn, connect_timeout=self.connect_timeout)
        try:
            await client.connect()
        except Exception as e:  # DaemonUnavailable, UNAUTHORIZED, an unreadable token file, ...
            level = logging.DEBUG if str(e) == self._last_error else logging.WARNING  # once per cause
            self._last_error = str(e)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            log.log(level, "the daemon at %s is unavailable: %s (next attempt in %.2f s)",
                    self.address, e, self.retry_in)
            raise DaemonUnavailable(self._last_error) from e
        finally:
            self._attempt = None
        self.client, self._last_error, self._backoff = client, None, BACKOFF_MIN_S
        return client

    def _note_drop(self) -> None:
        """Turn a client whose connection dropped into the "down" state, with a backoff."""
        client = self.client
        if client is not None and not client.connected:
            self.client = None
            self._last_error = client.close_reason or "disconnected"
            self._retry_at = (client.disconnected_at or time.monotonic()) + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)


def _params_to_wire(params) -> dict:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return to_wire(params)
    if isinstance(params, dict):
        return dict(params)
    raise TypeError(f"params must be a dict or a protocol dataclass, got {type(params).__name__}")


def _task_result(result) -> TaskResult:
    """A TaskResult from a reply, ignoring fields a newer daemon may add."""
    names = {f.name for f in dataclasses.fields(TaskResult)}
    try:
        return TaskResult(**{k: v for k, v in result.items() if k in names})
    except (AttributeError, TypeError) as e:
        raise RPCError(ErrorCode.INTERNAL, f"malformed result from the daemon ({e}): {result!r:.200}") from e


async def probe(address: Address, timeout: float = 1.0) -> dict | None:
    """The status of a daemon already listening at `address` (`diffucode status`, `serve` finding
    the address taken): its Status map, {"error": why} when something listens there but gives no
    status, or None when nobody listens. Never spawns."""
    client = DaemonClient(address, connect_timeout=timeout)
    connected = False
    try:
        await client.connect()
        connected = True
        return await client.status(timeout=timeout)
    except DaemonUnavailable as e:  # nobody there, or it went away before it answered
        return {"error": str(e)} if e.listening or connected else None
    except RPCError as e:
        return {"error": e.message}
    except TimeoutError:
        return {"error": "the daemon did not answer"}
    finally:
        await client.close()
