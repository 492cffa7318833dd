"""The daemon's HTTP listener: OpenAI, llama.cpp and Ollama fill-in-the-middle on one scheduler.

`diffucode serve --http 127.0.0.1:PORT` serves, next to the socket and on the same event loop,
the endpoints editors and plugins already post to (dialects.py reads and writes their shapes).
Every request becomes one job per choice on the daemon's scheduler, so HTTP clients share the
queue, the batching, the limits and the error codes with the language server's requests; a
client that closes its connection has its jobs cancelled (they stop within one denoising step).

Why aiohttp: it is asyncio-native and runs on the daemon's own loop (AppRunner + TCPSite, no
second thread or loop to hand jobs across), it is long-lived and well kept, it streams
(StreamResponse, for server-sent events and NDJSON), and with handler_cancellation it cancels a
request's handler as soon as the client disconnects, which is how a closed connection reaches
`job.cancel`. A full ASGI stack (uvicorn + starlette) would add a server loop of its own and a
second framework for the same four routes.

Security: the listener is loopback-only unless `--http-allow-remote`; every route but /health
needs `Authorization: Bearer <token>` (the token file is created 0600 with a random token and
reused, so editors can be configured once); errors are JSON naming the field and the limit, never
a traceback; request and completion text are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import stat
import time
import uuid
from pathlib import Path

from aiohttp import web

from ..errors import InputError
from ..rpc.address import Address, runtime_dir, write_token
from ..rpc.protocol import ErrorCode, RPCError
from .dialects import BadRequest, DIALECTS, Fill, Ollama, OpenAI, Reply, choices_of, dialect_of

log = logging.getLogger("diffucode.http")

BACKLOG = 1024  # as the socket server's: a burst of connects is answered, not refused by the kernel
STATUS_OF = {ErrorCode.INVALID_PARAMS: 400, ErrorCode.INVALID_FRAME: 400, ErrorCode.TOO_LARGE: 413,
             ErrorCode.UNAUTHORIZED: 401, ErrorCode.METHOD_NOT_FOUND: 404, ErrorCode.OVERLOADED: 503,
             ErrorCode.CANCELLED: 503, ErrorCode.TIMEOUT: 504, ErrorCode.MODEL_ERROR: 500, ErrorCode.INTERNAL: 500}


# --- address and token -------------------------------------------------------------------------

def http_address(spec: str, token_file: str | Path | None = None, allow_remote: bool = False) -> Address:
    """HOST:PORT to listen on, and the token file (default: the runtime dir's http-PORT.token).
    A host that is not a loopback address needs allow_remote; the token is required either way."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"--http {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:8012")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise InputError(f"--http {spec!r}: only loopback addresses (127.0.0.1, ::1) are allowed without "
                         f"--http-allow-remote (the token is required either way)")
    token = Path(token_file).expanduser() if token_file else runtime_dir() / f"http-{port}.token"
    return Address(host=host, port=int(port), token_file=token)


def http_token(path: Path) -> str:
    """The token in `path`, created (0600, random) if the file is missing. Unlike the socket's TCP
    token it is kept across restarts: editors are configured with it once. A file others can read
    is refused, as ssh refuses a readable private key."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return write_token(path)
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"HTTP token file {path} must be yours and private (mode 0600), it is "
                         f"{stat.filemode(info.st_mode)}; chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < 16:
        raise InputError(f"HTTP token file {path} holds {len(token)} characters, fewer than 16; delete it "
                         f"to have a random token written")
    return token


# --- the server --------------------------------------------------------------------------------

class HttpServer:
    def __init__(self, daemon, address: Address):
        self.daemon = daemon  # the DaemonServer: its scheduler, limits, model and status
        self.address = address
        self.url = ""
        self._token = ""
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.daemon.limits.max_frame_bytes, middlewares=[self._guard])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        for path, dialect in DIALECTS.items():
            app.router.add_post(path, self._fill_handler(dialect))
        app.router.add_post("/api/show", self.ollama_show)
        app.router.add_get("/api/tags", self.ollama_tags)
        app.router.add_get("/api/version", self.version)
        return app

    async def start(self) -> None:
        self._token = http_token(self.address.token_file)
        # shutdown_timeout: at shutdown the scheduler has cancelled every job, so handlers end at once
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port, backlog=BACKLOG)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise InputError(f"--http {self.address}: cannot listen: {e.strerror or e}") from None
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        log.info("HTTP on %s (token in %s): /v1/completions, /infill, /api/generate", self.url,
                 self.address.token_file)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- guard: auth, and errors as JSON in the route's dialect --------------------------------

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token.encode())

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        dialect = dialect_of(request.path)
        try:
            if request.path != "/health" and not self._authorized(request):
                return error(dialect, 401, "send the daemon's HTTP token as `Authorization: Bearer <token>` (the "
                                           "token file is printed in `diffucode serve`'s log)",
                             headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)
        except BadRequest as e:
            return error(dialect, e.status, e.message, e.param)
        except RPCError as e:
            return error(dialect, STATUS_OF.get(e.code, 500), e.message, e.data.get("param"),
                         headers={"Retry-After": "1"} if e.code == ErrorCode.OVERLOADED else None)
        except web.HTTPException as e:  # aiohttp's own: no route, wrong method, body too large
            if e.status < 400:
                raise
            if e.status == 413:
                return error(dialect, 413, f"body exceeds the limit of {self.daemon.limits.max_frame_bytes} bytes")
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return error(dialect, e.status, f"{e.reason}: {request.method} {request.path}", headers=allow)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug: logged here with its traceback, never sent to the client
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error(dialect, 500, "internal error; the daemon's log has the details")

    # --- small routes --------------------------------------------------------------------------

    def _model(self) -> str:
        return str(self.daemon.model.source)

    async def health(self, request: web.Request) -> web.Response:
        """llama.cpp's health check: public, says nothing but that the daemon answers."""
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self._model(), "object": "model", "created": int(self.daemon.started), "owned_by": "diffucode"}]})

    async def ollama_show(self, request: web.Request) -> web.Response:
        return web.json_response(Ollama.show(self._model()))

    async def ollama_tags(self, request: web.Request) -> web.Response:
        return web.json_response(Ollama.tags(self._model(), self.daemon.started))

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __import__("diffucode").__version__})

    # --- fill: the three dialects' completion routes ---------------------------------------------

    def _fill_handler(self, dialect):
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.fill(request, dialect)
        return handle

    async def _body(self, request: web.Request) -> dict:
        timeout = self.daemon.limits.frame_timeout_s
        try:
            raw = await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"the body did not arrive whole within {timeout:g} s", status=408) from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the body is not JSON ({str(e)[:80]})") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    async def fill(self, request: web.Request, dialect) -> web.StreamResponse:
        body = await self._body(request)
        fill = dialect.parse(body)
        group = request.headers.get("X-Diffucode-Group")
        if group:  # no dialect has a field for it: an editor names its document (or window) here
            fill.group = "http:" + group[:256]
        reply = Reply(self._model(), f"cmpl-{uuid.uuid4().hex[:24]}", time.time(),
                      self.daemon.model.tasks.limits.max_context_tokens)
        jobs = self._submit(fill) if fill.canvas > 0 else []  # a zero canvas: the empty answer at once
        stream = None
        try:
            if fill.stream:  # headers now: the client sees the request taken while the model works
                stream = web.StreamResponse(headers={"Content-Type": dialect.stream_type,
                                                     "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                await stream.prepare(request)
            results = await asyncio.gather(*(job.future for job in jobs))
        except asyncio.CancelledError:  # the client closed the connection (or the daemon stops)
            log.info("HTTP %s: the client went away after %d steps; cancelling", request.path,
                     max((job.steps_run for job in jobs), default=0))
            _cancel(jobs, "the HTTP client disconnected")
            raise
        except RPCError as e:
            _cancel(jobs, "another choice of the same HTTP request failed")
            _in_dialect(e, fill)
            if stream is None:
                raise
            error_body = dialect.error(STATUS_OF.get(e.code, 500), e.message, e.data.get("param"))
            await self._write(stream, dialect, error_body)
            return stream
        except BaseException:
            _cancel(jobs, "the HTTP request failed")
            raise
        choices = choices_of(results, fill)
        log.debug("HTTP %s: %d choice(s), %d tokens", request.path, len(choices), sum(c.tokens for c in choices))
        if stream is None:
            return web.json_response(dialect.body(fill, choices, reply), dumps=_dumps)
        for event in dialect.events(fill, choices, reply):
            await self._write(stream, dialect, event)
        if dialect.done_event:
            await self._write(stream, dialect, dialect.done_event)
        return stream

    def _submit(self, fill: Fill) -> list:
        """The request's scheduler jobs (dialects.Fill.jobs); if the queue refuses one, the others are withdrawn."""
        jobs = []
        try:
            for method, params in fill.jobs():
                jobs.append(self.daemon.scheduler.submit(method, params))
        except RPCError as e:
            _cancel(jobs, "another choice of the same HTTP request was refused")
            _in_dialect(e, fill)
            raise
        return jobs

    @staticmethod
    async def _write(stream: web.StreamResponse, dialect, event) -> None:
        data = event if isinstance(event, str) else _dumps(event)
        framed = f"data: {data}\n\n" if dialect.stream_type == "text/event-stream" else data + "\n"
        try:
            await stream.write(framed.encode())
        except ConnectionError:  # the client left between events: nothing more to tell it
            pass


def _cancel(jobs: list, reason: str) -> None:
    """Stop the jobs still running (the flag is all they need: an answered job never reads it again;
    a future cancelled by asyncio.gather is done while its job may still be running)."""
    for job in jobs:
        job.cancel(reason)


def _in_dialect(e: RPCError, fill: Fill) -> None:
    """The daemon's error in the client's words: its name for the canvas size, and the field named."""
    e.message = e.message.replace("max_new_tokens", fill.tokens_field)
    named = [f for f in (fill.tokens_field, "temperature", "top_p", "top_k", "seed") if e.message.startswith(f)]
    if named:
        e.data = {**e.data, "param": named[0]}


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error(dialect, status: int, message: str, param: str | None = None, headers: dict | None = None) -> web.Response:
    """An error response in the dialect's shape (OpenAI's {"error": {...}}, Ollama's {"error": "..."})."""
    return web.json_response((dialect or OpenAI).error(status, message, param), status=status, headers=headers,
                             dumps=_dumps)
