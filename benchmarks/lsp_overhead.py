"""What the language server adds to each inline completion, beyond the model.

The daemon serves a zero-layer checkpoint (embedding -> norm -> lm_head: its denoiser costs
next to nothing), so the time left is the server's: context, cache lookup, the daemon round
trip, post-processing, JSON-RPC. The baseline, in the same run, is the same infill sent straight
to the daemon with the client library; the difference is the language server's own overhead.
Each completion edits the document first so the cache cannot answer it.

    python benchmarks/lsp_overhead.py [--requests 200]

Prints p50/p90 of both and of the difference, the hardware, and one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from daemon_helpers import Daemon  # noqa: E402
from lsprotocol import types as lsp  # noqa: E402
from pygls.lsp.client import LanguageClient  # noqa: E402

from diffucode.daemon.rpc.address import Address  # noqa: E402
from diffucode.daemon.rpc.client import DaemonClient  # noqa: E402
from diffucode.daemon.rpc.protocol import InfillParams, Sampling  # noqa: E402
from diffucode.daemon.engine.tiny import write_tiny_checkpoint  # noqa: E402

SOURCE = "import os\n\n\ndef add(a, b):\n    total = a + b\n    return total\n"
URI = "file:///bench/example.py"
TOKENS = 8


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(n: int, work: Path) -> dict:
    model = write_tiny_checkpoint(work / "zero-layer", layers=0)
    daemon = Daemon(model, work, "--no-watch")
    try:
        # baseline: the daemon alone, through the client library
        client = DaemonClient(Address(socket=daemon.socket))
        await client.connect()
        direct = []
        for i in range(n + 10):
            params = InfillParams(before=SOURCE[:60] + f"x{i}", after=SOURCE[60:], sampling=Sampling(max_new_tokens=TOKENS))
            t0 = time.perf_counter()
            await client.infill(params)
            direct.append((time.perf_counter() - t0) * 1000)
        await client.close()
        direct = direct[10:]  # warm-up

        # the language server over stdio, a real LSP client
        lc = LanguageClient("bench", "1")

        @lc.feature(lsp.WORKSPACE_CONFIGURATION)
        def configuration(params):
            return [settings for _ in params.items]

        @lc.feature("diffucode/statusChanged")
        def status_changed(params):
            pass

        settings = {"daemon": {"socket": str(daemon.socket), "spawn": False}, "maxNewTokens": TOKENS,
                    "debounce": {"minMs": 0, "maxMs": 0}}
        await lc.start_io(sys.executable, "-m", "diffucode", "lsp", "--log-level", "WARNING")
        await lc.initialize_async(lsp.InitializeParams(capabilities=lsp.ClientCapabilities(),
                                                       initialization_options={"settings": settings}))
        lc.initialized(lsp.InitializedParams())
        lc.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=URI, language_id="python", version=1, text=SOURCE)))
        while (await lc.protocol.send_request_async("diffucode/status", {})).state != "ready":
            await asyncio.sleep(0.05)
        through_lsp = []
        for i in range(n + 10):
            text = SOURCE.replace("total = a + b", f"total = a + b + {i}")
            lc.text_document_did_change(lsp.DidChangeTextDocumentParams(
                text_document=lsp.VersionedTextDocumentIdentifier(uri=URI, version=i + 2),
                content_changes=[lsp.TextDocumentContentChangeWholeDocument(text=text)]))
            t0 = time.perf_counter()
            await lc.text_document_inline_completion_async(lsp.InlineCompletionParams(
                text_document=lsp.TextDocumentIdentifier(uri=URI), position=lsp.Position(line=5, character=4),
                context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Automatic)))
            through_lsp.append((time.perf_counter() - t0) * 1000)
        through_lsp = through_lsp[10:]
        await lc.shutdown_async(None)
        lc.exit(None)
        await lc.stop()
    finally:
        daemon.stop()
    overhead = [a - b for a, b in zip(sorted(through_lsp), sorted(direct))]  # quantile by quantile
    return {
        "benchmark": "lsp_overhead", "requests": n, "tokens": TOKENS, "model": "zero-layer tiny checkpoint, CPU",
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "daemon_direct_ms": {"p50": round(pct(direct, 0.5), 2), "p90": round(pct(direct, 0.9), 2)},
        "through_lsp_ms": {"p50": round(pct(through_lsp, 0.5), 2), "p90": round(pct(through_lsp, 0.9), 2)},
        "lsp_overhead_ms": {"p50": round(statistics.median(overhead), 2), "p90": round(pct(overhead, 0.9), 2)},
        "target_p50_ms": 3.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = asyncio.run(run(args.requests, Path(tmp)))
    print(f"hardware: {r['hardware']}; {r['model']}; {r['requests']} requests of {r['tokens']} tokens")
    for name in ("daemon_direct_ms", "through_lsp_ms", "lsp_overhead_ms"):
        print(f"{name:18s} p50 {r[name]['p50']:7.2f}  p90 {r[name]['p90']:7.2f}")
    print(f"target: language server overhead p50 <= {r['target_p50_ms']} ms")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
