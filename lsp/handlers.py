"""The language server's features: what each LSP request and notification does.

This module owns the one server instance: it creates it, registers each feature on it, and
`main` (the `diffucode lsp` entry point) serves it. lsp/server.py holds the class and helpers
and imports nothing from here, so the two never import each other.

Completion flow: enabled? -> cache (type-through) -> debounce (cancellable) -> context ->
daemon `infill` (group = the document, so a newer request cancels the older one in the daemon)
-> post-processing -> items. A daemon that is down gives an empty answer at once. Positions
are converted by the document in the encoding negotiated at initialize (server.offset_at).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException

from diffucode.daemon.rpc.address import runtime_dir
from diffucode.daemon.rpc.client import DaemonUnavailable
from diffucode.daemon.rpc.protocol import InfillParams, RefineParams, RPCError

from .context import WorkspaceIndex, uri_to_path
from .decoding import end_position, fit_tokens, reindent_tokens
from .functions import body_start, enclosing_function
from .indent import indent_style, parse_check, reindent
from .methods import (LSP_DID_ACCEPT, LSP_DID_REJECT, LSP_DID_SHOW, LSP_FILL_SELECTION, LSP_LAST_DECODING,
                      LSP_REFINE_FUNCTION, LSP_SNOOZE, LSP_STATUS, LSP_TOGGLE)
from .postprocess import postprocess
from .server import CHARS_PER_TOKEN, DiffucodeServer, client_columns, offset_at, serve

log = logging.getLogger("diffucode.lsp")
ALTERNATIVES = 3  # middles an Invoked trigger asks for (the greedy one among them), best first

server = DiffucodeServer()


def main(argv: list[str] | None = None) -> int:
    """`diffucode lsp`: serve this module's instance, with every feature below registered."""
    return serve(server, argv)


def as_dict(obj):
    """pygls hands custom requests' params over as namedtuples: plain dicts and lists instead."""
    if hasattr(obj, "_asdict"):
        return {k: as_dict(v) for k, v in obj._asdict().items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj


# --- lifecycle and settings ------------------------------------------------------------------

@server.feature(lsp.INITIALIZE)
def initialize(ls: DiffucodeServer, params: lsp.InitializeParams) -> None:
    options = params.initialization_options or {}
    folders = [uri_to_path(f.uri) for f in (params.workspace_folders or [])]
    if not folders and params.root_uri:
        folders = [uri_to_path(params.root_uri)]
    ls.context.index = WorkspaceIndex([f for f in folders if f is not None])
    ls.apply_settings(options.get("settings") if isinstance(options, dict) else None)


@server.feature(lsp.INITIALIZED)
async def initialized(ls: DiffucodeServer, params: lsp.InitializedParams) -> None:
    ls.context.index.watch()
    await pull_configuration(ls)


async def pull_configuration(ls: DiffucodeServer) -> None:
    caps = ls.client_capabilities.workspace
    if not (caps and caps.configuration):
        return
    try:
        (config,) = await ls.workspace_configuration_async(
            lsp.ConfigurationParams(items=[lsp.ConfigurationItem(section="diffucode")]))
    except Exception as e:  # the client may not know the section
        log.info("workspace/configuration failed: %s", e)
        return
    if isinstance(config, dict):
        ls.apply_settings(config)


@server.feature(lsp.WORKSPACE_DID_CHANGE_CONFIGURATION)
async def did_change_configuration(ls: DiffucodeServer, params: lsp.DidChangeConfigurationParams) -> None:
    pushed = params.settings.get("diffucode") if isinstance(params.settings, dict) else None
    if isinstance(pushed, dict):
        ls.apply_settings(pushed)
    else:
        await pull_configuration(ls)


@server.feature(lsp.SHUTDOWN)
async def shutdown(ls: DiffucodeServer, params) -> None:
    ls.forget_waiting()
    if ls.context.index is not None:
        ls.context.index.stop()
    if ls.daemon is not None:
        await ls.daemon.close()


@server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: DiffucodeServer, params: lsp.DidChangeTextDocumentParams) -> None:
    ls.debouncer.keystroke()
    ls.context.touched(params.text_document.uri)


@server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: DiffucodeServer, params: lsp.DidOpenTextDocumentParams) -> None:
    ls.context.touched(params.text_document.uri)


@server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: DiffucodeServer, params: lsp.DidCloseTextDocumentParams) -> None:
    ls.decodings.forget(params.text_document.uri)
    ls.forget_waiting(params.text_document.uri)


# --- inline completion -----------------------------------------------------------------------

@server.feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())  # options: advertised
async def inline_completion(ls: DiffucodeServer, params: lsp.InlineCompletionParams) -> lsp.InlineCompletionList:
    empty = lsp.InlineCompletionList(items=[])
    t0 = time.monotonic()
    doc = ls.workspace.get_text_document(params.text_document.uri)
    if not ls.active(doc.language_id or ""):
        return empty
    text = doc.source
    offset = offset_at(doc, params.position)
    invoked = (params.context.trigger_kind == lsp.InlineCompletionTriggerKind.Invoked
               and not ls.is_retry(doc.uri, doc.version, params.position))  # a retry stands for a keystroke
    raw_before, raw_after = text[:offset], text[offset:]

    cached = ls.cache.get(doc.uri, raw_before, raw_after)
    if cached is not None and (not invoked or len(cached) > 1):
        return items(ls, doc.uri, cached, params.position)
    if not ls.connected():
        ls.answered_without_daemon(doc.uri, doc.version, params.position)  # asked again once it is ready
        return empty  # never wait for a daemon that is not there; status says why

    debounce_ms = ls.debouncer.delay_ms() if not invoked else 0.0
    if debounce_ms:
        await asyncio.sleep(debounce_ms / 1000)  # a newer keystroke cancels us here
    before, after = ls.request_context(doc.uri, text, offset, language_id=doc.language_id or "")
    mid_line = raw_after.split("\n", 1)[0].strip() != ""
    budget = min(ls.settings.max_new_tokens, 16) if mid_line else ls.settings.max_new_tokens
    # an Invoked trigger asks for alternatives: the daemon samples them in one batch and ranks them
    # by the coupled likelihood (daemon/engine/ranking.py); they are offered in that order
    params_ = InfillParams(before=before, after=after, group=doc.uri, alternatives=ALTERNATIVES if invoked else None,
                           before_tokens=ls.settings.before_tokens, after_tokens=ls.settings.after_tokens,
                           sampling=ls.sampling(budget))
    found: list[str] = []
    t_ask = time.monotonic()
    try:
        result = await ls.infill(params_)
        daemon_ms = (time.monotonic() - t_ask) * 1000
    except (DaemonUnavailable, RPCError, asyncio.TimeoutError) as e:
        log.info("inline completion: %s", e)
        if isinstance(e, DaemonUnavailable):
            ls.answered_without_daemon(doc.uri, doc.version, params.position)
        return empty
    answers = result.alternatives or [{"text": result.text, "tokens": result.tokens, "order": result.order,
                                       "ar_ness": result.ar_ness}]
    for rank, answer in enumerate(answers):
        # per-token confidences come with the result only (an alternative's is its mean): cut that one
        confidence = result.confidence if answer["text"] == result.text else None
        text_ = postprocess(answer["text"], raw_before, raw_after, answer.get("tokens"), confidence,
                            ls.settings.min_confidence)
        if text_ is not None and text_ not in found:
            if not found:  # the item the editor shows first: what "Show Decoding Order" replays
                # the best alternative's AR-ness is the result's; the others' come only if the daemon sends it
                ar = answer.get("ar_ness") or (result.ar_ness if rank == 0 else None)
                remember(ls, doc.uri, "suggestion", answer, text_, result.steps, ar,
                         {"position": {"line": params.position.line, "character": params.position.character}})
            found.append(text_)
    if found:
        ls.cache.put(doc.uri, raw_before, raw_after, found)
    if log.isEnabledFor(logging.DEBUG):  # one line per answered completion: where its time went
        total_ms = (time.monotonic() - t0) * 1000  # daemon_ms: the round trip; elapsed/queued: the daemon's own
        log.debug("completion timing: total_ms=%.1f debounce_ms=%.1f daemon_ms=%.1f server_ms=%.1f "
                  "daemon_elapsed_ms=%.1f daemon_queued_ms=%.1f steps=%d items=%d", total_ms, debounce_ms,
                  daemon_ms, total_ms - debounce_ms - daemon_ms, result.elapsed_ms, result.queued_ms,
                  result.steps, len(found))
    return items(ls, doc.uri, found, params.position)


def remember(ls: DiffucodeServer, uri: str, kind: str, answer: dict, shown: str, steps: int,
             ar_ness: dict | None, where: dict) -> None:
    """Keeps the decoding of what the user was shown: the answer's tokens cut to `shown` (see
    lsp/decoding.py), their steps and AR-ness, and where the text sits."""
    tokens, order = fit_tokens(answer.get("tokens") or [], answer.get("order") or [], shown)
    ls.decodings.put(uri, kind, tokens, order, steps, ar_ness, where)
    log.debug("%s: kept the decoding order of %d tokens (%d steps)", kind, len(tokens), steps)


def proposal_range(doc, start: dict, text: str) -> dict:
    """The range `text` covers once a proposal placing it at `start` is applied."""
    line, character = end_position((start["line"], start["character"]), text, lambda s: client_columns(doc, s))
    return {"start": dict(start), "end": {"line": line, "character": character}}


def items(ls: DiffucodeServer, uri: str, texts: list[str], position: lsp.Position) -> lsp.InlineCompletionList:
    return lsp.InlineCompletionList(items=[
        lsp.InlineCompletionItem(
            insert_text=t, range=lsp.Range(start=position, end=position),
            command=lsp.Command(title="accepted", command="diffucode.didAcceptCompletion",
                                arguments=[{"uri": uri, "text": t}]))
        for t in texts])


# --- fill selection and refine function --------------------------------------------------------

@server.feature(LSP_FILL_SELECTION)
async def fill_selection(ls: DiffucodeServer, params) -> dict:
    p = as_dict(params)
    doc = ls.workspace.get_text_document(p["textDocument"]["uri"])
    version, text = doc.version, doc.source
    start = offset_at(doc, lsp.Position(**p["range"]["start"]))
    end = offset_at(doc, lsp.Position(**p["range"]["end"]))
    selected = text[start:end]
    # a canvas about the selection's size (about 3 characters a token, a margin for longer code)
    canvas = max(8, min(256, round(len(selected) / 3 * 1.25)))
    before, after = ls.request_context(doc.uri, text, start, end, doc.language_id or "")
    result = await ls.infill(InfillParams(
        before=before, after=after, group=f"{doc.uri}#fill", before_tokens=ls.settings.before_tokens,
        after_tokens=ls.settings.after_tokens, sampling=ls.sampling(canvas)))
    new = fitted(ls, doc, "fill", result, text, start, end, p["range"]["start"])
    return {"edits": [{"range": p["range"], "text": new}], "version": version,
            **parse_flags(doc, text, start, end, new)}


def fitted(ls: DiffucodeServer, doc, kind: str, result, text: str, start: int, end: int, at: dict) -> str:
    """A proposal's text re-indented to the block it replaces (text[start:end]; lsp/indent.py),
    its decoding kept for the replay with the tokens re-indented alike."""
    line_start = text.rfind("\n", 0, start) + 1
    new = reindent(result.text, text[start:end], text[line_start:start], *indent_style(text))
    tokens, order = reindent_tokens(result.tokens or [], result.order or [], new)
    remember(ls, doc.uri, kind, {"tokens": tokens, "order": order}, new, result.steps, result.ar_ness,
             {"range": proposal_range(doc, at, new)})
    return new


def parse_flags(doc, text: str, start: int, end: int, new: str) -> dict:
    """`parses` and `parseError` of a proposal replacing text[start:end] by `new` (lsp/methods.py)."""
    parses, error = parse_check(doc.language_id or "", text, text[:start] + new + text[end:])
    if parses is False:
        log.info("%s: the proposal does not parse (%s)", doc.uri, error)
    return {"parses": parses, "parseError": error}


@server.feature(LSP_REFINE_FUNCTION)
async def refine_function(ls: DiffucodeServer, params) -> dict:
    p = as_dict(params)
    doc = ls.workspace.get_text_document(p["textDocument"]["uri"])
    version, text = doc.version, doc.source
    span = enclosing_function(text, p["position"]["line"], doc.language_id or "")
    if span is None:
        raise RPCErrorForEditor(f"no function encloses line {p['position']['line'] + 1}")
    # the body only: the signature stays as it is (Fill Selection rewrites whatever is selected)
    span = (body_start(text, *span, doc.language_id or ""), span[1])
    lines = text.split("\n")
    start = sum(len(l) + 1 for l in lines[:span[0]])
    end = start + len("\n".join(lines[span[0]:span[1] + 1]))
    result = await ls.refine(RefineParams(
        before=text[max(0, start - ls.settings.before_tokens * CHARS_PER_TOKEN):start], span=text[start:end],
        after=text[end:end + ls.settings.after_tokens * CHARS_PER_TOKEN], group=f"{doc.uri}#refine",
        before_tokens=ls.settings.before_tokens, after_tokens=ls.settings.after_tokens,
        sampling=ls.sampling()))
    rng = {"start": {"line": span[0], "character": 0},
           "end": {"line": span[1], "character": client_columns(doc, lines[span[1]])}}
    new = fitted(ls, doc, "refinement", result, text, start, end, rng["start"])
    return {"edits": [{"range": rng, "text": new}], "version": version, "range": rng,
            "lines": line_confidence(result.tokens, result.confidence, span[0]), "note": refine_note(result.refined),
            **parse_flags(doc, text, start, end, new)}


def refine_note(refined: dict) -> str:
    """What the proposal says of the daemon's line guard (daemon/engine/refine.py)."""
    if not refined:
        return ""
    lines, changed, kept = refined.get("lines", 0), refined.get("changed", 0), refined.get("kept", 0)
    note = f"{changed} of {lines} lines changed"
    if kept:
        note += f"; {kept} kept: the model preferred them"
    return note + "; the signature is kept"


def line_confidence(tokens: list[str], confidence: list[float], first_line: int) -> list[dict]:
    """The lowest token confidence on each line of the new text (a line is as doubtful as its
    most doubtful token)."""
    per_line: list[float] = [1.0]
    for tok, conf in zip(tokens, confidence):
        parts = tok.split("\n")
        for i, part in enumerate(parts):
            if i > 0:
                per_line.append(1.0)
            if part.strip():
                per_line[-1] = min(per_line[-1], conf)
    return [{"line": first_line + i, "confidence": round(c, 4)} for i, c in enumerate(per_line)]


class RPCErrorForEditor(JsonRpcException):
    """An error the editor shows as it is: pygls replies with this code and message (any other
    exception becomes an InternalError whose message holds the traceback)."""

    CODE = lsp.LSPErrorCodes.RequestFailed.value


@server.feature(LSP_LAST_DECODING)
def last_decoding(ls: DiffucodeServer, params) -> dict | None:
    return ls.decodings.get(as_dict(params)["textDocument"]["uri"])


# --- status, toggles, feedback ---------------------------------------------------------------

@server.feature(LSP_STATUS)
def status(ls: DiffucodeServer, params) -> dict:
    return ls.status()


@server.feature(LSP_TOGGLE)
def toggle(ls: DiffucodeServer, params) -> None:
    ls.enabled = bool(as_dict(params).get("enabled", not ls.enabled))
    ls.publish_status()


@server.feature(LSP_SNOOZE)
def snooze(ls: DiffucodeServer, params) -> None:
    minutes = float(as_dict(params).get("minutes", 0) or 0)
    ls.snoozed_until = time.time() + 60 * minutes if minutes > 0 else 0.0
    ls.publish_status()


def feedback(kind: str):
    def handler(ls: DiffucodeServer, params) -> None:
        p = as_dict(params) or {}
        if kind == "accepted":
            ls.debouncer.accepted()
        elif kind == "rejected":
            ls.debouncer.rejected()
        record = {"at": time.time(), "event": kind, "uri": p.get("uri"), "chars": len(p.get("text") or ""),
                  "debounce_ms": round(ls.debouncer.delay_ms(), 1)}
        try:  # a local log only: nothing leaves the machine
            with open(runtime_dir() / "feedback.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            log.debug("feedback log: %s", e)
    return handler


server.feature(LSP_DID_SHOW)(feedback("shown"))
server.feature(LSP_DID_ACCEPT)(feedback("accepted"))
server.feature(LSP_DID_REJECT)(feedback("rejected"))
