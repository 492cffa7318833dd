"""`diffucode lsp`: the language server (pygls) between the editor and the model daemon.

It owns the editor experience: inline completion (LSP 3.18) with context, debounce, cache and
type-through, post-processing; the custom requests fillSelection, refineFunction and
lastDecoding (the order in which the last answer was written); status; settings. Handlers that
wait on the daemon are `async def`, so `$/cancelRequest` cancels them at their current await and
the daemon client then cancels the daemon's work too. It never imports torch, and never prints
to stdout (stdio is the protocol): logs go to stderr.

A completion asked for while the daemon is not ready is answered empty at once, and remembered:
the server keeps trying to connect, and when the daemon is ready it tells the editor to ask
again there (diffucode/retryCompletion), since nothing else would ask until the next keystroke.

This module holds the server's class and helpers; lsp/handlers.py creates the one instance,
registers the features on it and is the `diffucode lsp` entry point. The dependency runs one
way (handlers -> server), so each module can be read, and imported, on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from lsprotocol import types as lsp
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument

from diffucode import __version__
from diffucode.daemon.rpc.address import Address, default_address, runtime_dir, tcp_address
from diffucode.daemon.rpc.client import DaemonUnavailable, ReconnectingClient, SpawnOptions
from diffucode.daemon.rpc.protocol import InfillParams, RefineParams, RPCError, Sampling, TaskResult

from .cache import CompletionCache
from .context import ContextBuilder
from .debounce import Debouncer
from .decoding import LastDecodings
from .methods import LSP_RETRY_COMPLETION, LSP_STATUS_CHANGED
from .settings import Settings, parse

log = logging.getLogger("diffucode.lsp")
CHARS_PER_TOKEN = 4  # generous: the daemon cuts to the exact token budget
START_STRIDE = 256  # characters: the text before the cursor starts on this grid (stable_start)


class DiffucodeServer(LanguageServer):
    """What the features share: settings, the daemon connection, cache, debounce, context and
    the status shown to the editor."""

    def __init__(self):
        super().__init__("diffucode", __version__)
        self.settings = Settings()
        self.problems: list[str] = []
        self.cache = CompletionCache()
        self.debouncer = Debouncer()
        self.context = ContextBuilder()
        self.decodings = LastDecodings()  # per document, the last decoding shown (diffucode/lastDecoding)
        self.daemon: ReconnectingClient | None = None
        self.enabled = True
        self.snoozed_until = 0.0  # epoch seconds
        self.in_flight = 0
        self.last_latency_ms: float | None = None
        self.model_name: str | None = None
        self.error: str | None = None
        self._last_status: dict | None = None
        self._connecting: asyncio.Task | None = None
        # the last inline completion answered empty for want of the daemon (diffucode/retryCompletion)
        self.waiting: dict | None = None
        self.retried: dict | None = None  # the last one the editor was told to ask again for
        self._retry_timer: asyncio.TimerHandle | None = None

    # --- settings and the daemon ------------------------------------------------------------

    def apply_settings(self, raw: dict | None) -> None:
        before = self.settings
        self.settings, self.problems = parse(raw)  # the whole section: what it omits is the default
        for p in self.problems:
            log.warning("%s", p)
        self.debouncer.min_ms, self.debouncer.max_ms = self.settings.debounce_min_ms, self.settings.debounce_max_ms
        if (self.daemon is None or before.daemon_socket != self.settings.daemon_socket
                or before.model != self.settings.model or before.daemon_spawn != self.settings.daemon_spawn):
            self.connect_daemon()
        self.cache.clear()
        self.publish_status()

    def daemon_address(self) -> Address:
        sock = self.settings.daemon_socket
        if sock.startswith("tcp:"):
            return tcp_address(sock[4:])
        return Address(socket=Path(sock).expanduser()) if sock else default_address()

    def connect_daemon(self) -> None:
        old = self.daemon
        if old is not None:
            asyncio.ensure_future(old.close())
        spawn = None
        if self.settings.daemon_spawn:
            args = ["--standby"]  # a daemon killed or crashed is serving again within a second
            threads = daemon_threads()
            args += ["--threads", str(threads)] if threads else []
            args += ["--model", self.settings.model] if self.settings.model else []
            spawn = SpawnOptions(args=args, log_file=runtime_dir() / "daemon.log")
        self.daemon = ReconnectingClient(self.daemon_address(), spawn=spawn, connect_timeout=120.0)
        self.start_connecting()

    def start_connecting(self) -> None:
        """Connect (or spawn) in the background; requests meanwhile answer empty at once."""
        if self._connecting is not None and not self._connecting.done():
            return
        if self.daemon.state == "connected" or self.daemon.retry_in > 0:
            return

        async def attempt():
            try:
                client = await self.daemon.ensure_connected()
                status = await client.status(timeout=10)
                self.model_name, self.error = status.get("model"), None
            except (DaemonUnavailable, RPCError, asyncio.TimeoutError, OSError) as e:
                self.error = str(e)
            self.publish_status()

        self._connecting = asyncio.ensure_future(attempt())
        # status() reads the task's state: publish again once it is done
        self._connecting.add_done_callback(lambda _: self._attempt_done())
        self.publish_status()

    def _attempt_done(self) -> None:
        self.publish_status()
        if self.waiting is not None:
            self._retry_while_waiting()

    def _retry_while_waiting(self) -> None:
        """While a completion waits for the daemon, try again when the backoff allows: without
        this, a daemon that is down is tried again only on the next request."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self.waiting is None or self.daemon is None or self.daemon.state == "connected":
            return
        if self._connecting is not None and not self._connecting.done():
            return  # the attempt under way retries when it ends
        self._retry_timer = asyncio.get_running_loop().call_later(self.daemon.retry_in + 0.05, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        if self.waiting is not None:
            self.start_connecting()
            self.publish_status()  # connected meanwhile: the retry goes out now
            self._retry_while_waiting()  # in case start_connecting found the backoff not over yet

    def connected(self) -> bool:
        if self.daemon is not None and self.daemon.state == "connected":
            return True
        if self.daemon is not None:
            self.start_connecting()
        return False

    # --- a completion that waits for the daemon ------------------------------------------------

    def answered_without_daemon(self, uri: str, version: int | None, position: lsp.Position) -> None:
        """An inline completion at `position` in version `version` of `uri` was answered empty
        because the daemon was not ready. Only the last such request is kept: once the daemon
        is ready the editor is told (LSP_RETRY_COMPLETION), and asks again if its cursor is
        still there."""
        self.waiting = {"textDocument": {"uri": uri, "version": version},
                        "position": {"line": position.line, "character": position.character}}
        self._retry_while_waiting()

    def forget_waiting(self, uri: str | None = None) -> None:
        """No retry for `uri` (closed), or for any document (None: shutting down)."""
        if self.waiting is not None and uri in (None, self.waiting["textDocument"]["uri"]):
            self.waiting = None
        if self.waiting is None and self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def is_retry(self, uri: str, version: int | None, position: lsp.Position) -> bool:
        """Whether a request is the editor asking again where it was told to (once): it asks
        with an explicit trigger, but is answered as the keystroke it stands for (no alternatives)."""
        asked = {"textDocument": {"uri": uri, "version": version},
                 "position": {"line": position.line, "character": position.character}}
        if asked != self.retried:
            return False
        self.retried = None
        return True

    def _retry_waiting(self) -> None:
        waiting, self.waiting = self.waiting, None
        self.retried = waiting
        where = waiting["position"]
        log.info("the daemon is ready: the editor may ask again for the completion at %s:%d:%d",
                 waiting["textDocument"]["uri"], where["line"] + 1, where["character"] + 1)
        try:
            self.protocol.notify(LSP_RETRY_COMPLETION, waiting)
        except Exception as e:  # the editor went away meanwhile
            log.debug("%s not sent: %s", LSP_RETRY_COMPLETION, e)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        now = time.time()
        if not self.enabled:
            state, message = "disabled", "diffucode is turned off"
        elif self.snoozed_until > now:
            state, message = "snoozed", f"snoozed for {int(self.snoozed_until - now) // 60 + 1} more minutes"
        elif self.daemon is None or self.daemon.state == "connecting" or (
                self._connecting is not None and not self._connecting.done()):
            state, message = "starting", f"connecting to the daemon at {self.daemon_address()}"
        elif self.daemon.state == "down":
            state, message = "down", f"the daemon is unavailable: {self.daemon.last_error or self.error}"
        elif self.error:
            state, message = "error", self.error
        else:
            state = "busy" if self.in_flight else "ready"
            message = f"served by the daemon at {self.daemon_address()}"  # the model has its own field
        if self.problems:
            message += " (settings: " + "; ".join(self.problems) + ")"
        return {"state": state, "message": message, "model": self.model_name,
                "lastLatencyMs": self.last_latency_ms,
                "snoozedUntil": self.snoozed_until * 1000 if self.snoozed_until > now else None,
                "enabled": self.enabled}

    def publish_status(self) -> None:
        status = self.status()
        if self.waiting is not None and status["state"] in ("ready", "busy"):
            self._retry_waiting()
        if status != self._last_status:
            self._last_status = status
            try:
                self.protocol.notify(LSP_STATUS_CHANGED, status)
            except Exception:  # before initialization there is nobody to tell
                pass

    # --- talking to the daemon --------------------------------------------------------------

    def sampling(self, max_new_tokens: int | None = None, temperature: float | None = None, seed: int = 0):
        s = self.settings
        return Sampling(max_new_tokens=max_new_tokens or s.max_new_tokens, steps=s.steps, top_k=s.top_k,
                        temperature=s.temperature if temperature is None else temperature, seed=seed)

    async def infill(self, params: InfillParams) -> TaskResult:
        return await self._ask(lambda daemon, timeout: daemon.infill(params, timeout=timeout))

    async def refine(self, params: RefineParams) -> TaskResult:
        return await self._ask(lambda daemon, timeout: daemon.refine(params, timeout=timeout))

    async def _ask(self, send) -> TaskResult:
        """One task request through the daemon client's typed methods; raises DaemonUnavailable
        at once when the daemon is not connected (never waits for one that is down), and keeps
        the status (busy, last latency, error) and the debounce's latency up to date."""
        if not self.connected():
            raise DaemonUnavailable(self.status()["message"])
        self.in_flight += 1
        self.publish_status()
        started = time.monotonic()
        try:
            result = await send(self.daemon, self.settings.request_timeout_ms / 1000)
            self.error = None
            return result
        except RPCError as e:
            if e.code.name not in ("CANCELLED", "OVERLOADED"):
                self.error = str(e)
            raise
        finally:
            self.in_flight -= 1
            self.last_latency_ms = round((time.monotonic() - started) * 1000, 1)
            self.debouncer.latency(self.last_latency_ms)
            self.publish_status()

    def request_context(self, uri: str, text: str, offset: int, end: int | None = None,
                        language_id: str = "") -> tuple[str, str]:
        """The text before (with snippets from other files) and after, cut to a generous
        character budget; the daemon cuts it to the exact token budget."""
        s = self.settings
        before = text[stable_start(text, offset, s.before_tokens * CHARS_PER_TOKEN):offset]
        after_start = offset if end is None else end
        after = text[after_start:after_start + s.after_tokens * CHARS_PER_TOKEN]
        open_docs = {u: d.source for u, d in self.workspace.text_documents.items()}
        snippets = self.context.snippets(uri, text, language_id, open_docs)
        return snippets + before, after

    def active(self, language_id: str) -> bool:
        return self.enabled and self.snoozed_until <= time.time() and self.settings.language_enabled(language_id)


def daemon_threads() -> int:
    """Torch threads for the daemon the server spawns: half the cores, at least one. The editor
    (and whatever else runs) needs a core too: on a 2-core AMD EPYC shared with other work, one
    thread answered the bundled model's infill in 370 ms p50 against 475 ms with torch's default
    of two (benchmarks/keystroke_latency.mjs, README "The language server"). The environment's
    DIFFUCODE_DAEMON_THREADS overrides it; 0 leaves torch's default."""
    import os

    override = os.environ.get("DIFFUCODE_DAEMON_THREADS", "").strip()
    if override.isdigit():
        return int(override)
    return max(1, (os.cpu_count() or 2) // 2)


def stable_start(text: str, offset: int, chars: int) -> int:
    """Where the text sent before the cursor starts: at most `chars` before it, rounded up to a
    multiple of START_STRIDE and then to the next line start. The start thus stays put while
    the user types, so consecutive requests share their leading text (the daemon's prefix cache
    reuses it) and it is tokenized the same way each time."""
    start = max(0, offset - chars)
    if start == 0:
        return 0
    start = min(offset, -(-start // START_STRIDE) * START_STRIDE)
    line = text.find("\n", start - 1, offset)
    return line + 1 if line >= 0 else start


def offset_at(doc: TextDocument, position: lsp.Position) -> int:
    """The offset in `doc.source` (code points) of a client position, whose columns count in the
    position encoding negotiated at initialize (UTF-16 unless the client offered UTF-8 or
    UTF-32); pygls's document does the conversion. It gets a copy because it clamps a column
    past the line's end in place, and the request's position is echoed back in the answer."""
    copy = lsp.Position(line=position.line, character=position.character)
    return min(doc.offset_at_position(copy), len(doc.source))  # past the last line: the end


def client_columns(doc: TextDocument, text: str) -> int:
    """How many columns `text` (no line break) spans for the client, in the negotiated encoding."""
    return doc.position_codec.client_num_units(text)


TRACE = 5  # --log-level trace: also every JSON-RPC message in full, completion text included


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Our loggers at `level`; pygls's message logs (which hold document and completion text,
    "Sending data: ..." at INFO) stay at WARNING unless the level is trace."""
    import sys

    logging.addLevelName(TRACE, "TRACE")
    name = level.upper()
    value = TRACE if name == "TRACE" else logging.getLevelName(name)
    if not isinstance(value, int):
        raise SystemExit(f"diffucode lsp: --log-level {level!r} is unknown (use trace, debug, info, warning, error)")
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=value, handlers=[handler], format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    logging.getLogger("pygls").setLevel(logging.DEBUG if value <= TRACE else max(value, logging.WARNING))


def serve(server: DiffucodeServer, argv: list[str] | None = None) -> int:
    """`diffucode lsp [options]`: serve `server` (lsp/handlers.py's instance, its features
    registered) until the editor exits."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="diffucode lsp", description="The diffucode language server, "
                                     "over stdio (the default) or TCP for debugging. Logs go to stderr.")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio (debugging)")
    parser.add_argument("--log-level", default=os.environ.get("DIFFUCODE_LOG", "INFO"),
                        help="trace (every message in full, completion text included), debug, info (default), "
                             "warning, error")
    parser.add_argument("--log-file", default=None, help="log to this file instead of stderr")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_file)
    if args.tcp:
        host, port = args.tcp.rsplit(":", 1)
        server.start_tcp(host, int(port))
    else:
        server.start_io()
    return 0
