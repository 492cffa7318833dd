"""A real editor for the hardening suite: pygls's LanguageClient driving `python -m diffucode lsp`
over stdio, as respawn.py and typing_storm.py need it. Its language server runs in its own
process group, killed when the script exits (common.py's cleanup).
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import kill_group, track_group


class Editor:
    """`python -m diffucode lsp` over stdio, driven by pygls's LanguageClient the way an editor
    drives it: initialize with settings (also answered on workspace/configuration), open
    documents, send changes and inline completion requests, cancel them. The server logs to
    log_file (its stderr is a pipe nobody reads, which must not fill up)."""

    def __init__(self, name: str, settings: dict, log_file: Path, env: dict | None = None,
                 log_level: str = "INFO"):
        from lsprotocol import types as lsp
        from pygls.lsp.client import LanguageClient

        self.lsp = lsp
        self.name, self.settings, self.log_file, self.env, self.log_level = name, settings, log_file, env, log_level
        self.client = LanguageClient(f"hardening-{name}", "1")
        self.versions: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        self.pid: int | None = None

        @self.client.feature(lsp.WORKSPACE_CONFIGURATION)
        def configuration(params):
            return [self.settings for _ in params.items]

        @self.client.feature("diffucode/statusChanged")
        def status_changed(params):
            pass

        @self.client.feature("diffucode/retryCompletion")  # an editor would ask again; the suite asks itself
        def retry_completion(params):
            pass

    async def start(self) -> None:
        lsp = self.lsp
        await self.client.start_io(sys.executable, "-m", "diffucode", "lsp", "--log-level", self.log_level,
                                   "--log-file", str(self.log_file), env=self.env, start_new_session=True)
        server = getattr(self.client, "_server", None)  # the asyncio subprocess pygls started
        if server is not None:
            self.pid = server.pid
            track_group(server.pid)
        await self.client.initialize_async(lsp.InitializeParams(
            capabilities=lsp.ClientCapabilities(workspace=lsp.WorkspaceClientCapabilities(configuration=True)),
            initialization_options={"settings": self.settings}))
        self.client.initialized(lsp.InitializedParams())

    def open(self, uri: str, text: str) -> None:
        self.versions[uri], self.texts[uri] = 1, text
        self.client.text_document_did_open(self.lsp.DidOpenTextDocumentParams(
            text_document=self.lsp.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    def replace(self, uri: str, text: str) -> None:
        """The whole document changes (one didChange)."""
        self.versions[uri] += 1
        self.texts[uri] = text
        self.client.text_document_did_change(self.lsp.DidChangeTextDocumentParams(
            text_document=self.lsp.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[self.lsp.TextDocumentContentChangeWholeDocument(text=text)]))

    def insert(self, uri: str, line: int, character: int, text: str) -> None:
        """A keystroke: text inserted at (line, character), sent as an incremental change."""
        lsp = self.lsp
        self.versions[uri] += 1
        lines = self.texts[uri].split("\n")
        lines[line] = lines[line][:character] + text + lines[line][character:]
        self.texts[uri] = "\n".join(lines)
        at = lsp.Position(line=line, character=character)
        self.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[lsp.TextDocumentContentChangePartial(range=lsp.Range(start=at, end=at), text=text)]))

    def inline_params(self, uri: str, line: int, character: int, invoked: bool = False):
        lsp = self.lsp
        kind = lsp.InlineCompletionTriggerKind.Invoked if invoked else lsp.InlineCompletionTriggerKind.Automatic
        return lsp.InlineCompletionParams(text_document=lsp.TextDocumentIdentifier(uri=uri),
                                          position=lsp.Position(line=line, character=character),
                                          context=lsp.InlineCompletionContext(trigger_kind=kind))

    def send_inline(self, uri: str, line: int, character: int, msg_id: str, invoked: bool = False):
        """Send an inline completion request without waiting: its (concurrent) future."""
        return self.client.protocol.send_request(self.lsp.TEXT_DOCUMENT_INLINE_COMPLETION,
                                                 self.inline_params(uri, line, character, invoked), msg_id=msg_id)

    async def inline(self, uri: str, line: int, character: int, invoked: bool = False) -> list[str]:
        """The texts of an inline completion's items."""
        result = await self.client.text_document_inline_completion_async(
            self.inline_params(uri, line, character, invoked))
        return [item.insert_text for item in (result.items if result else [])]

    def cancel(self, msg_id: str) -> None:
        self.client.protocol.notify("$/cancelRequest", self.lsp.CancelParams(id=msg_id))

    async def status(self):
        return await self.client.protocol.send_request_async("diffucode/status", {})

    async def stop(self, timeout: float = 10.0) -> None:
        import asyncio

        from pygls.exceptions import JsonRpcException

        try:
            await asyncio.wait_for(self.client.shutdown_async(None), timeout)
            self.client.exit(None)
            await asyncio.wait_for(self.client.stop(), timeout)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError, JsonRpcException) as e:  # killed below
            print(f"  ({self.name} did not stop cleanly: {type(e).__name__}; killed)", flush=True)
        if self.pid is not None:
            kill_group(self.pid)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


def is_cancelled_error(exc: BaseException) -> bool:
    """True for the JSON-RPC error a cancelled LSP request is answered with (-32800)."""
    code = getattr(exc, "code", None)
    return code == -32800 or "Cancelled" in type(exc).__name__
