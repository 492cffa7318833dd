"""The language server over stdio, driven by pygls's LanguageClient, against a real daemon."""

import asyncio
import time

import pytest
from daemon_helpers import Daemon
from lsp_client import SOURCE, UNICODE_SOURCE, URI, Editor, apply_edit, run, settings_for
from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException, JsonRpcRequestCancelled

from diffucode.daemon.engine.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lsp-model"))


@pytest.fixture
def daemon(model_dir, tmp_path):
    # exact decoding: one step per token, so a long request is still running when it is cancelled
    d = Daemon(model_dir, tmp_path, "--no-watch", "--decoding", "exact")
    yield d
    d.stop()


def test_inline_completion_round_trip_and_type_through(daemon):
    async def go():
        ed = Editor(settings_for(daemon))
        await ed.start()
        try:
            assert ed.init_result.capabilities.inline_completion_provider is not None  # editors ask only then
            await ed.wait_state("ready")
            assert any(e.state == "ready" for e in ed.status_events)  # published, not only when asked
            result = await ed.inline(5, 4)  # start of the `return total` line, inside `add`
            texts = [i.insert_text for i in result.items]
            assert texts and all(t.strip() for t in texts)
            item = result.items[0]
            assert item.range.start == lsp.Position(line=5, character=4)
            assert item.command.command == "diffucode.didAcceptCompletion"
            status = await ed.status()
            assert status.state == "ready" and status.lastLatencyMs > 0 and status.model
            # type-through: typing the first characters of the shown suggestion is served from the cache
            conn = daemon.connect()
            served = conn.call("status")["counters"]["completed"]
            first = texts[0]
            typed = first[:2] if len(first) > 2 else first[:1]
            lines = ed.text.split("\n")
            lines[5] = lines[5][:4] + typed + lines[5][4:]
            ed.change("\n".join(lines))
            again = await ed.inline(5, 4 + len(typed), invoked=False)
            assert [i.insert_text for i in again.items][0] == first[len(typed):]
            assert conn.call("status")["counters"]["completed"] == served
        finally:
            await ed.stop()
    run(go())


def test_last_decoding_replays_what_was_shown(daemon):
    """`diffucode/lastDecoding`: the first item's tokens and the step that revealed each, for the
    editor's "Show Decoding Order"; then a refinement's, which replaces it; null elsewhere."""
    async def go():
        ed = Editor(settings_for(daemon))
        await ed.start()
        other = "file:///work/other.py"
        ed.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=other, language_id="python", version=1, text=SOURCE)))
        try:
            await ed.wait_state("ready")
            assert await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": URI}}) is None
            shown = (await ed.inline(9, 0, invoked=False)).items  # an empty line in fibonacci: whole lines
            assert shown
            d = await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": URI}})
            assert d.kind == "suggestion" and (d.position.line, d.position.character) == (9, 0)
            assert d.tokens and len(d.tokens) == len(d.order)
            assert "".join(d.tokens) == shown[0].insert_text  # what the user saw, after post-processing
            assert all(-1 <= step < d.steps for step in d.order), (d.order, d.steps)
            # (pygls hands JSON objects over as namedtuples: `global`, a keyword, loses its name)
            assert len(d.ar_ness) == 2 and 0 <= d.ar_ness.local <= 1 and all(0 <= v <= 1 for v in d.ar_ness)
            assert await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": other}}) is None
            assert await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": "file:///never.py"}}) is None
            # an Invoked trigger's alternatives: the one offered first is kept
            shown = (await ed.inline(5, 4)).items
            d = await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": URI}})
            assert shown and "".join(d.tokens) == shown[0].insert_text and len(d.tokens) == len(d.order)
            assert (d.position.line, d.position.character) == (5, 4) and all(-1 <= s < d.steps for s in d.order)
            assert d.ar_ness is None or all(0 <= v <= 1 for v in d.ar_ness)

            result = await ed.request("diffucode/refineFunction",
                                      {"textDocument": {"uri": URI}, "position": {"line": 10, "character": 8}})
            d = await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": URI}})
            new_text = result.edits[0].text
            assert d.kind == "refinement" and "".join(d.tokens) == new_text and len(d.tokens) == len(d.order)
            assert -1 in d.order and all(-1 <= step < d.steps for step in d.order)  # most tokens were kept
            assert (d.range.start.line, d.range.start.character) == (9, 0)  # the body: Refine keeps the signature on line 8
            last = new_text.split("\n")[-1]
            assert (d.range.end.line, d.range.end.character) == (9 + new_text.count("\n"), len(last))
            assert await ed.request("diffucode/lastDecoding", {"textDocument": {"uri": other}}) is None
        finally:
            await ed.stop()
    run(go())


def test_cancel_request_reaches_the_daemon(daemon):
    async def go():
        # The slow request: at the start of an empty line (line 7) the whole canvas of 1000 tokens
        # is asked for (a cursor mid-line would get 16), and exact decoding runs a step per token.
        ed = Editor(settings_for(daemon, maxNewTokens=1000))
        await ed.start()
        try:
            await ed.wait_state("ready")
            conn = daemon.connect()
            counters = conn.call("status")["counters"]
            before, completed = counters["cancelled"], counters["completed"]
            fut = ed.client.protocol.send_request(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionParams(
                text_document=lsp.TextDocumentIdentifier(uri=URI), position=lsp.Position(line=7, character=0),
                context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Invoked)),
                msg_id="slow-1")
            deadline = time.monotonic() + 30
            while conn.call("status")["queue"]["running"] == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            ed.client.protocol.notify("$/cancelRequest", lsp.CancelParams(id="slow-1"))
            deadline = time.monotonic() + 10
            while (s := conn.call("status"))["counters"]["cancelled"] == before:
                assert time.monotonic() < deadline, "the daemon never heard of the cancellation"
                await asyncio.sleep(0.02)
            assert s["counters"]["last_cancelled_steps"] < 1000  # stopped before its 1000 steps were run
            assert s["counters"]["completed"] == completed
            with pytest.raises(JsonRpcRequestCancelled):
                await asyncio.wrap_future(fut)
        finally:
            await ed.stop()
    run(go())


def test_utf8_client_gets_byte_columns(daemon):
    """A client that negotiates UTF-8 counts columns in bytes. Type-through from the cache shows
    that both requests found the editor's cursor on a non-ASCII line: were a column read as
    UTF-16 (3 too far here), the second request's text before the cursor would not extend the
    first's, and the daemon would be asked again."""
    async def go():
        ed = Editor(settings_for(daemon), encodings=["utf-8"])
        await ed.start(UNICODE_SOURCE)
        try:
            assert ed.init_result.capabilities.position_encoding == lsp.PositionEncodingKind.Utf8
            await ed.wait_state("ready")
            lines = UNICODE_SOURCE.split("\n")
            head = '    message = "¡Grüße, " + '  # the cursor: before `name`
            assert lines[1].startswith(head) and len(head.encode()) == len(head) + 3
            column = len(head.encode())
            texts = [i.insert_text for i in (await ed.inline(1, column)).items]
            assert texts and all(i for i in texts)
            conn = daemon.connect()
            served = conn.call("status")["counters"]["completed"]
            # (a first character that breaks lines, "\r" say, would move the cursor to another line)
            first = max((t for t in texts if t[0].isprintable()), key=len, default="")
            assert len(first) > 1, texts  # something left to show after one typed character
            typed = first[:1]
            lines[1] = head + typed + lines[1][len(head):]
            ed.change("\n".join(lines))
            again = await ed.inline(1, column + len(typed.encode()), invoked=False)
            assert first[len(typed):] in [i.insert_text for i in again.items]
            assert conn.call("status")["counters"]["completed"] == served  # from the cache
            # and columns the server sends are bytes: refine's range ends at the function's end
            result = await ed.request("diffucode/refineFunction",
                                      {"textDocument": {"uri": URI}, "position": {"line": 1, "character": 0}})
            last = lines[2]
            assert (result.range.end.line, result.range.end.character) == (2, len(last.encode()))
            assert len(last.encode()) == len(last) + 2  # "✓": 3 bytes, 1 UTF-16 unit
        finally:
            await ed.stop()
    run(go())


def test_fill_selection_edits_apply_cleanly(daemon):
    async def go():
        ed = Editor(settings_for(daemon))
        await ed.start()
        try:
            await ed.wait_state("ready")
            selected = "total = a + b\n    return total"  # what the range below selects
            assert SOURCE.count(selected) == 1
            rng = {"start": {"line": 4, "character": 4}, "end": {"line": 5, "character": 16}}
            result = await ed.request("diffucode/fillSelection", {"textDocument": {"uri": URI}, "range": rng})
            assert result.version == 1 and len(result.edits) == 1
            edit = result.edits[0]
            assert [edit.range.start.line, edit.range.start.character, edit.range.end.line,
                    edit.range.end.character] == [4, 4, 5, 16]
            # applied, the edit replaces the selection and nothing else
            assert apply_edit(SOURCE, edit.range, edit.text) == SOURCE.replace(selected, edit.text)
        finally:
            await ed.stop()
    run(go())


def test_refine_function_on_python(daemon):
    async def go():
        ed = Editor(settings_for(daemon))
        await ed.start()
        try:
            await ed.wait_state("ready")
            result = await ed.request("diffucode/refineFunction",
                                      {"textDocument": {"uri": URI}, "position": {"line": 10, "character": 8}})
            # the body of fibonacci (lines 9-12); its signature on line 8 is kept as it is
            assert (result.range.start.line, result.range.end.line) == (9, 12)
            assert result.edits[0].range.end.character == len("    return a")
            new_text = result.edits[0].text
            assert len(result.lines) == new_text.count("\n") + 1
            assert all(0 <= l.confidence <= 1 for l in result.lines) and result.lines[0].line == 9
            assert result.note.startswith(f"{result.note.split()[0]} of 4 lines changed") and "signature" in result.note
            with pytest.raises(JsonRpcException, match="^no function encloses line 1$") as error:
                await ed.request("diffucode/refineFunction",
                                 {"textDocument": {"uri": URI}, "position": {"line": 0, "character": 0}})
            assert error.value.code == lsp.LSPErrorCodes.RequestFailed
        finally:
            await ed.stop()
    run(go())


def test_daemon_killed_then_back(model_dir, tmp_path):
    async def go():
        daemon = Daemon(model_dir, tmp_path, "--no-watch")
        ed = Editor(settings_for(daemon, requestTimeoutMs=600_000))
        await ed.start()
        try:
            await ed.wait_state("ready")
            assert (await ed.inline(5, 4)).items
            daemon.stop()
            await ed.inline(5, 4)  # the first request finds the connection gone
            down = await ed.wait_state("down")
            assert "unavailable" in down.message
            # answered at once, without waiting on the daemon: the request timeout (10 min) and the
            # connect timeout (2 min) are both far beyond what this wait allows
            assert not (await asyncio.wait_for(ed.inline(9, 0), 60)).items
            restarted = Daemon(model_dir, tmp_path, "--no-watch")
            try:
                deadline = time.monotonic() + 30
                while not (await ed.inline(9, 0)).items:
                    assert time.monotonic() < deadline, await ed.status()
                    await asyncio.sleep(0.3)
                assert (await ed.status()).state == "ready"
            finally:
                restarted.stop()
        finally:
            await ed.stop()
            daemon.stop()
    run(go())


def test_configuration_changes_take_effect(daemon):
    async def go():
        ed = Editor(settings_for(daemon))
        await ed.start()
        try:
            await ed.wait_state("ready")
            conn = daemon.connect()
            ed.settings = settings_for(daemon, enabledLanguages={"*": True, "python": False})
            ed.client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings={}))
            deadline = time.monotonic() + 10
            while (await ed.inline(5, 4)).items:  # the server pulls the new configuration
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            served = conn.call("status")["counters"]["completed"]
            assert not (await ed.inline(9, 0)).items
            assert conn.call("status")["counters"]["completed"] == served  # the daemon was not asked
            ed.settings = settings_for(daemon)
            ed.client.workspace_did_change_configuration(
                lsp.DidChangeConfigurationParams(settings={"diffucode": ed.settings}))
            deadline = time.monotonic() + 10
            while not (await ed.inline(5, 4)).items:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # snooze and toggle
            ed.client.protocol.notify("diffucode/snooze", {"minutes": 5})
            assert (await ed.wait_state("snoozed")).snoozedUntil > time.time() * 1000
            assert not (await ed.inline(9, 0)).items
            ed.client.protocol.notify("diffucode/snooze", {"minutes": 0})
            ed.client.protocol.notify("diffucode/toggle", {"enabled": False})
            await ed.wait_state("disabled")
            ed.client.protocol.notify("diffucode/toggle", {"enabled": True})
            await ed.wait_state("ready")
            # a bad value is reported, and the rest still applies
            ed.client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(
                settings={"diffucode": settings_for(daemon, maxNewTokens="lots")}))
            deadline = time.monotonic() + 10
            while "maxNewTokens = 'lots'" not in (await ed.status()).message:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert any(e.state == "snoozed" for e in ed.status_events)
        finally:
            await ed.stop()
    run(go())
