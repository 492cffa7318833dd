"""A typing storm through one language server: 1,000 keystrokes at 20/s over 5 open documents
(issue 14, section 3).

A real daemon (a tiny random checkpoint unless --model) and one `python -m diffucode lsp`,
driven by pygls's LanguageClient as an editor drives it: every keystroke is a didChange (one
character inserted), then the editor cancels the inline completion request still in flight and
sends a new one (trigger kind Automatic) at the new cursor. Keystrokes arrive as a Poisson
process at --rate per second (so some gaps outlast the server's adaptive debounce and reach the
daemon) and the typist pauses --line-pause seconds at the end of each line (when ghost text
has time to appear); the typist writes lines of standard-library code into 5 documents, moving
to another one after a line now and then. The language server runs with its default settings
(debounce, canvas, context) except the daemon's socket.

Reported: requests sent, answered with text, answered empty, cancelled, errors; p50 / p95 latency
of the answered ones (from the request to its answer); daemon RSS at the start and the end; the
daemon's counters; and that the daemon never answered OVERLOADED (the language server logs every
daemon error it gets) and no traceback appeared in either log.

    python benchmarks/hardening/typing_storm.py [--keys 1000] [--rate 20] [--line-pause 0.8] [--docs 5]
        [--threads N]

(Not `typing.py`: a file of that name beside these scripts would shadow the standard library's
`typing` module for every script in this folder.) The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    Daemon,
    Report,
    add_threads_option,
    mb,
    percentile,
    rss_bytes,
    scratch,
    tiny_model,
    torch_env,
)
from editor import Editor, is_cancelled_error
from pygls.exceptions import JsonRpcException


def sources() -> list[list[str]]:
    """Lines of code to type, one standard-library module per document."""
    import fnmatch
    import glob
    import json.decoder
    import shlex
    import textwrap

    out = []
    for module in (textwrap, shlex, fnmatch, glob, json.decoder):
        lines = [line.rstrip() for line in inspect.getsource(module).split("\n")]
        out.append([line for line in lines if len(line) < 100 and line.strip()])
    return out


@dataclass
class Doc:
    uri: str
    lines: list[str]  # still to type
    line: int  # the cursor
    character: int
    typed_in_line: int = 0


@dataclass
class Tally:
    sent: dict = field(default_factory=dict)  # msg id -> monotonic send time
    outcomes: Counter = field(default_factory=Counter)  # answered / empty / cancelled / error
    latencies: list = field(default_factory=list)  # ms, answered with text
    errors: Counter = field(default_factory=Counter)

    def done(self, msg_id: str, fut) -> None:
        took = (time.monotonic() - self.sent[msg_id]) * 1000
        if fut.cancelled():
            self.outcomes["cancelled"] += 1
            return
        exc = fut.exception()
        if exc is not None:
            if is_cancelled_error(exc):
                self.outcomes["cancelled"] += 1
            else:
                self.outcomes["error"] += 1
                self.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            return
        items = getattr(fut.result(), "items", None) or []
        if any(item.insert_text.strip() for item in items):
            self.outcomes["answered"] += 1
            self.latencies.append(took)
        else:
            self.outcomes["empty"] += 1


def open_documents(editor: Editor, n: int) -> list[Doc]:
    docs = []
    for i, lines in enumerate(sources()[:n] * (n // 5 + 1)):
        if len(docs) == n:
            break
        header = f'"""Document {i} of the typing storm."""\n\n'
        uri = f"file:///storm/doc{i}.py"
        editor.open(uri, header)
        docs.append(Doc(uri, list(lines), line=header.count("\n"), character=0))
    return docs


def next_key(doc: Doc) -> str:
    """The character the typist types next in doc ("\n" at the end of a line)."""
    line = doc.lines[0]
    if doc.typed_in_line < len(line):
        return line[doc.typed_in_line]
    return "\n"


def advance(doc: Doc, key: str) -> None:
    if key == "\n":
        doc.lines.pop(0)
        doc.line, doc.character, doc.typed_in_line = doc.line + 1, 0, 0
    else:
        doc.character += 1
        doc.typed_in_line += 1


async def storm(editor: Editor, docs: list[Doc], args, rng: random.Random, tally: Tally) -> float:
    """Type args.keys keystrokes; returns the seconds it took."""
    in_flight: dict = {}
    doc = docs[0]
    start = time.monotonic()
    due = start
    for k in range(args.keys):
        due += min(1.0, rng.expovariate(args.rate))
        if next_key(doc) == "\n":
            due += args.line_pause  # the typist reaches the end of a line and looks up
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        for msg_id, fut in list(in_flight.items()):  # the editor drops the suggestion it was waiting for
            if not fut.done():
                editor.cancel(msg_id)
            del in_flight[msg_id]
        key = next_key(doc)
        editor.insert(doc.uri, doc.line, doc.character, key)
        advance(doc, key)
        msg_id = f"key-{k}"
        tally.sent[msg_id] = time.monotonic()
        fut = editor.send_inline(doc.uri, doc.line, doc.character, msg_id)
        fut.add_done_callback(lambda f, m=msg_id: tally.done(m, f))
        in_flight[msg_id] = fut
        if key == "\n" and (rng.random() < 0.3 or not doc.lines):
            doc = rng.choice([d for d in docs if d.lines])
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 60
    while len(tally.sent) > sum(tally.outcomes.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return elapsed


async def run(args, report: Report) -> None:
    work = scratch("typing")
    model = args.model or tiny_model(work / "model")
    daemon = Daemon(model, work, "--no-watch", env=torch_env(args.threads))
    editor = Editor("storm", {"daemon": {"socket": str(daemon.socket), "spawn": False}}, work / "lsp.log",
                    env={**os.environ, "XDG_RUNTIME_DIR": str(work)})
    try:
        started = time.monotonic()
        await editor.start()
        docs = open_documents(editor, args.docs)
        deadline = time.monotonic() + 60
        while (await editor.status()).state != "ready":
            assert time.monotonic() < deadline, "the language server never connected to the daemon"
            await asyncio.sleep(0.05)
        ready = time.monotonic() - started
        for d in docs:  # warm-up: one completion per document
            await editor.inline(d.uri, d.line, d.character)
        rss_start, lsp_start = daemon.rss(), rss_bytes(editor.pid) if editor.pid else 0
        tally = Tally()
        elapsed = await storm(editor, docs, args, random.Random(args.seed), tally)
        after = []
        for d in docs:  # does every document still get completions?
            try:
                await asyncio.wait_for(editor.inline(d.uri, d.line, d.character), 60)
                after.append(True)
            except (asyncio.TimeoutError, JsonRpcException, RuntimeError, ConnectionError) as e:
                report.note(f"{d.uri}: no completion after the storm: {type(e).__name__}: {e}")
                after.append(False)
        status = daemon.connect().call("status")
        rss_end, lsp_end = daemon.rss(), rss_bytes(editor.pid) if editor.pid else 0
        report.note(f"(language server ready {ready:.1f} s after its start; daemon started before it)")
        summarize(report, args, elapsed, tally, status, after, (rss_start, rss_end, lsp_start, lsp_end), daemon, editor)
    finally:
        await editor.stop()
        daemon.stop()


def summarize(report: Report, args, elapsed: float, tally: Tally, status: dict, after: list[bool], rss: tuple,
              daemon: Daemon, editor: Editor) -> None:
    rss_start, rss_end, lsp_start, lsp_end = rss
    o = tally.outcomes
    report.section("keystrokes")
    report.figure("keys", "keystrokes (one didChange + one request each)", args.keys)
    report.figure("seconds", "seconds of typing", round(elapsed, 1), "s")
    report.figure("rate", "keystrokes per second, pauses included", round(args.keys / elapsed, 1), "/s")
    report.section("inline completion requests")
    report.figure("answered", "answered with text", o["answered"])
    report.figure("empty", "answered empty (debounced away, superseded)", o["empty"])
    report.figure("cancelled", "cancelled by the editor", o["cancelled"])
    unanswered = len(tally.sent) - sum(o.values())
    report.figure("errors", "errors", o["error"], "", "0", o["error"] == 0)
    report.evidence("errors", dict(tally.errors))
    for text, n in tally.errors.most_common(5):
        report.note(f"{n} x {text}")
    report.figure("unanswered", "never answered", unanswered, "", "0", unanswered == 0)
    report.figure("p50_ms", "latency of the answered, p50", round(percentile(tally.latencies, 0.5), 1), "ms")
    report.figure("p95_ms", "latency of the answered, p95", round(percentile(tally.latencies, 0.95), 1), "ms")
    report.figure("after_storm", "documents still completed after the storm", sum(after), "", f"{len(after)}",
                  all(after))
    report.section("daemon")
    c = status["counters"]
    report.note(f"daemon counters: completed {c['completed']}, cancelled {c['cancelled']}, failed {c['failed']}, "
                f"batched {c.get('batched')}")
    overloaded = editor.log_text().count("OVERLOADED") + daemon.log_text().count("OVERLOADED")
    report.figure("overloaded", "OVERLOADED answers (language server's log)", overloaded, "", "0", overloaded == 0)
    report.figure("failed", "requests failed in the model", c["failed"], "", "0", c["failed"] == 0)
    report.figure("rss_start_mb", "daemon RSS at the start", mb(rss_start), "MB")
    report.figure("rss_end_mb", "daemon RSS at the end", mb(rss_end), "MB")
    growth = 100.0 * (rss_end - rss_start) / rss_start if rss_start else float("nan")
    report.figure("rss_growth_pct", "daemon RSS growth", round(growth, 2), "%", "< 5 %", growth < 5.0, kind="memory")
    report.figure("lsp_rss_mb", "language server RSS start -> end", f"{mb(lsp_start)} -> {mb(lsp_end)}", "MB")
    tb_daemon, tb_lsp = daemon.tracebacks(), editor.log_text().count("Traceback")
    report.figure("daemon_tracebacks", "tracebacks in the daemon's log", tb_daemon, "", "0", tb_daemon == 0)
    report.figure("lsp_tracebacks", "tracebacks in the language server's log", tb_lsp, "", "0", tb_lsp == 0)
    report.extra.update(outcomes=dict(o), errors=dict(tally.errors), daemon_counters=c)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1000, help="keystrokes (1,000)")
    p.add_argument("--rate", type=float, default=20.0, help="mean keystrokes per second within a line (20)")
    p.add_argument("--line-pause", type=float, default=0.8,
                   help="seconds the typist pauses at the end of each line (0.8; 0: never)")
    p.add_argument("--docs", type=int, default=5, help="open documents typed into (5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: a tiny random one)")
    add_threads_option(p)
    args = p.parse_args()
    report = Report("typing_storm", {"keys": args.keys, "rate": args.rate, "line_pause": args.line_pause,
                                     "docs": args.docs, "seed": args.seed,
                                     "model": str(args.model or "tiny"), "threads": args.threads})
    asyncio.run(run(args, report))
    report.finish()  # after every process is gone: the JSON line is the last
    return 0


if __name__ == "__main__":
    sys.exit(main())
