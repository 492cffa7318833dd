"""What the editor gets from the language server besides completions (issue 19), over stdio with
a real LSP client and a real daemon: a completion asked for before the daemon was ready is
offered again once it is; Fill Selection and Refine Function re-indented to their block, with a
flag when the Python file would no longer parse; a log that keeps code out at the default level."""

import ast
import asyncio
import json
import os
import time

import pytest
from daemon_helpers import Daemon
from lsp_client import SOURCE, URI, Editor, apply_edit, run, settings_for
from lsprotocol import types as lsp

from diffucode.lsp.indent import leading

OTHER = "file:///work/other.py"
TABS = "def add(a, b):\n\ttotal = a + b\n\treturn total\n"


@pytest.fixture
def daemon(tiny_dir, tmp_path):
    d = Daemon(tiny_dir, tmp_path, "--no-watch")
    yield d
    d.stop()


def open_doc(ed: Editor, uri: str, text: str) -> None:
    ed.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
        text_document=lsp.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))


def test_a_completion_asked_before_the_daemon_is_ready_is_offered_again(tiny_dir, tmp_path):
    """Typing while the daemon starts: the empty answer is remembered, and once the daemon is up
    the server tells the editor where to ask again (once, for the last such request only; none
    for a document closed meanwhile), and asking there gets a completion, as for a keystroke."""
    async def go():
        ed = Editor({"daemon": {"socket": str(tmp_path / "d.sock"), "spawn": False}, "maxNewTokens": 8,
                     "debounce": {"minMs": 0, "maxMs": 0}, "completion": {"minConfidence": 0}})
        await ed.start()
        daemon = None
        try:
            open_doc(ed, OTHER, SOURCE)
            assert not (await ed.client.text_document_inline_completion_async(lsp.InlineCompletionParams(
                text_document=lsp.TextDocumentIdentifier(uri=OTHER), position=lsp.Position(line=9, character=0),
                context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Automatic)))).items
            ed.client.text_document_did_close(lsp.DidCloseTextDocumentParams(
                text_document=lsp.TextDocumentIdentifier(uri=OTHER)))
            assert not (await ed.inline(9, 0, invoked=False)).items  # no daemon yet: empty at once
            assert (await ed.status()).state in ("starting", "down")
            daemon = Daemon(tiny_dir, tmp_path, "--no-watch")  # the server retries on its own: nothing asks
            deadline = time.monotonic() + 30
            while not ed.retries:
                assert time.monotonic() < deadline, await ed.status()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a second notification would have come by now
            assert [(r.textDocument.uri, r.textDocument.version, r.position.line, r.position.character)
                    for r in ed.retries] == [(URI, 1, 9, 0)]
            assert (await ed.status()).state in ("ready", "busy")
            # the editor asks again (VS Code: an explicit trigger), answered as the keystroke was: one item
            assert len((await ed.inline(9, 0)).items) == 1
        finally:
            await ed.stop()
            if daemon is not None:
                daemon.stop()
    run(go())


def first_indent(text: str) -> str | None:
    return next((leading(line) for line in text.split("\n") if line.strip()), None)


def check_parse_flag(result, before: str, rng) -> None:
    """`parses` says whether the file with the edit applied parses, `parseError` why not."""
    after = apply_edit(before, rng, result.edits[0].text)
    try:
        ast.parse(after)
        error = None
    except SyntaxError as e:
        error = f"line {e.lineno}: {e.msg}"
    assert result.parses is (error is None) and result.parseError == error, (result.parses, result.parseError, after)


def test_fill_and_refine_keep_the_block_indentation_and_say_whether_they_parse(daemon):
    async def go():
        ed = Editor(settings_for(daemon))
        await ed.start()
        tabs = "file:///work/tabs.py"
        open_doc(ed, tabs, TABS)
        try:
            await ed.wait_state("ready")
            # whole lines (from column 0), and from after the indentation (the line keeps its 4 spaces)
            for start, prefix in ((0, ""), (4, "    ")):
                rng = {"start": {"line": 4, "character": start}, "end": {"line": 5, "character": 16}}
                result = await ed.request("diffucode/fillSelection", {"textDocument": {"uri": URI}, "range": rng})
                text = result.edits[0].text
                assert first_indent(prefix + text) in ("    ", None), repr(text)
                check_parse_flag(result, SOURCE, result.edits[0].range)
                d = await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": URI}})
                assert "".join(d.tokens) == text and len(d.tokens) == len(d.order)  # replayed as re-indented
            # a file indented with tabs gets tabs
            rng = {"start": {"line": 1, "character": 0}, "end": {"line": 2, "character": 13}}
            result = await ed.request("diffucode/fillSelection", {"textDocument": {"uri": tabs}, "range": rng})
            text = result.edits[0].text
            assert first_indent(text) in ("\t", None), repr(text)
            assert not any(line.startswith("    ") for line in text.split("\n")), repr(text)
            check_parse_flag(result, TABS, result.edits[0].range)
            # refine: the body's first line keeps its indentation
            result = await ed.request("diffucode/refineFunction",
                                      {"textDocument": {"uri": URI}, "position": {"line": 10, "character": 8}})
            assert first_indent(result.edits[0].text) in ("    ", None)
            check_parse_flag(result, SOURCE, result.edits[0].range)
        finally:
            await ed.stop()
    run(go())


def test_the_default_log_level_keeps_code_out_of_the_log(daemon, tmp_path):
    """At the default level the log has our lines but neither the document nor the completions
    (pygls logs each message it sends in full); at trace it has them (so this test would see
    them were they there)."""
    env = {k: v for k, v in os.environ.items() if k != "DIFFUCODE_LOG"}

    async def session(level_args: list[str], log_file) -> list[str]:
        ed = Editor(settings_for(daemon))
        ed.args = [*level_args, "--log-file", str(log_file)]
        await ed.start(env=env)
        try:
            await ed.wait_state("ready")
            texts = [i.insert_text for i in (await ed.inline(9, 0)).items]
            rng = {"start": {"line": 4, "character": 4}, "end": {"line": 5, "character": 16}}
            fill = await ed.request("diffucode/fillSelection", {"textDocument": {"uri": URI}, "range": rng})
            return texts + [fill.edits[0].text]
        finally:
            await ed.stop()

    def written(texts: list[str], log: str) -> list[str]:
        """The texts the log holds, as they are or as JSON strings (pygls logs the messages)."""
        return [t for t in texts if len(t.strip()) >= 6 and (t.strip() in log or json.dumps(t)[1:-1] in log)]

    default_log, trace_log = tmp_path / "default.log", tmp_path / "trace.log"
    shown = run(session([], default_log))
    log = default_log.read_text()
    assert " INFO diffucode" in log and "Sending data" not in log  # our own lines, with their level
    assert "fibonacci" not in log and "a, b = b, a + b" not in log  # the document
    assert not written(shown, log)
    shown = run(session(["--log-level", "trace"], trace_log))
    assert "Sending data" in trace_log.read_text() and written(shown, trace_log.read_text())
