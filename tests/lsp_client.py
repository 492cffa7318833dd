"""A real LSP client for the language-server tests: pygls's LanguageClient starting
`python -m diffucode lsp` over stdio, with one Python document open, answering
workspace/configuration and recording the server's notifications, as an editor does."""

import asyncio
import sys
import time

from lsprotocol import types as lsp
from pygls.lsp.client import LanguageClient

SOURCE = '''import os


def add(a, b):
    total = a + b
    return total


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''
URI = "file:///work/example.py"
UNICODE_SOURCE = '''def greet(name):
    message = "¡Grüße, " + name + "!"
    return message + " ✓"
'''


class Editor:
    """A real LSP client with a document open, answering workspace/configuration. `encodings`:
    the position encodings it offers (None: none named, so UTF-16, the protocol's default)."""

    def __init__(self, settings: dict, encodings: list[str] | None = None):
        self.settings = settings
        self.encodings = encodings
        self.client = LanguageClient("test-editor", "1")
        self.status_events: list[dict] = []
        self.retries: list = []  # diffucode/retryCompletion notifications
        self.version = 1
        self.args = ["--log-level", "DEBUG"]

        @self.client.feature(lsp.WORKSPACE_CONFIGURATION)
        def configuration(params):
            return [self.settings for _ in params.items]

        @self.client.feature("diffucode/statusChanged")
        def status_changed(params):
            self.status_events.append(params)

        @self.client.feature("diffucode/retryCompletion")
        def retry_completion(params):
            self.retries.append(params)

    async def start(self, text: str = SOURCE, **spawn):
        """`spawn`: more arguments for the server's subprocess (env=...)."""
        await self.client.start_io(sys.executable, "-m", "diffucode", "lsp", *self.args, **spawn)
        general = lsp.GeneralClientCapabilities(position_encodings=self.encodings) if self.encodings else None
        self.init_result = await self.client.initialize_async(lsp.InitializeParams(
            capabilities=lsp.ClientCapabilities(workspace=lsp.WorkspaceClientCapabilities(configuration=True),
                                                general=general),
            initialization_options={"settings": self.settings}))
        self.client.initialized(lsp.InitializedParams())
        self.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=URI, language_id="python", version=1, text=text)))
        self.text = text

    def change(self, text: str):
        self.version += 1
        self.text = text
        self.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=URI, version=self.version),
            content_changes=[lsp.TextDocumentContentChangeWholeDocument(text=text)]))

    async def inline(self, line, character, invoked=True):
        return await self.client.text_document_inline_completion_async(lsp.InlineCompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=URI), position=lsp.Position(line=line, character=character),
            context=lsp.InlineCompletionContext(
                trigger_kind=lsp.InlineCompletionTriggerKind.Invoked if invoked
                else lsp.InlineCompletionTriggerKind.Automatic)))

    async def request(self, method, params):
        return await self.client.protocol.send_request_async(method, params)

    async def status(self):
        return await self.request("diffucode/status", {})

    async def wait_state(self, *states, timeout=30):
        deadline = time.monotonic() + timeout
        while (s := await self.status()).state not in states:
            assert time.monotonic() < deadline, s
            await asyncio.sleep(0.05)
        return s

    async def stop(self):
        await self.client.shutdown_async(None)
        self.client.exit(None)
        await self.client.stop()


def settings_for(daemon, **extra):
    # a tiny random model is unsure of every token: no confidence cut, or nothing would be left
    return {"daemon": {"socket": str(daemon.socket), "spawn": False}, "maxNewTokens": 12,
            "debounce": {"minMs": 0, "maxMs": 0}, "completion": {"minConfidence": 0}, **extra}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def apply_edit(text: str, rng, new: str) -> str:
    """`text` with an LSP edit applied, as an editor does (ASCII text: any encoding's columns)."""
    lines = text.split("\n")

    def offset(pos):
        return sum(len(line) + 1 for line in lines[:pos.line]) + pos.character

    return text[:offset(rng.start)] + new + text[offset(rng.end):]
