"""What the HTTP listener adds to a request, and whether it serves 64 streaming clients at once.

The daemon serves a zero-layer checkpoint (embedding -> norm -> lm_head: its denoiser costs next
to nothing), so the time left is the serving path's. The baseline, in the same run and
interleaved request by request (so that other work on the machine weighs on both alike), is the
same infill sent over the daemon's Unix socket with a blocking msgpack-rpc connection; the HTTP
side is a blocking keep-alive `http.client` connection posting OpenAI's /v1/completions with a
suffix. The difference, quantile by quantile, is the HTTP overhead (target: p50 <= 2 ms).

Then N clients (default 64) stream at once, each several requests, spread over the three
dialects (OpenAI SSE, llama.cpp /infill SSE, Ollama NDJSON); every answer must be whole.
The daemon runs with --max-queue at least N: the queue limit is the daemon's guard against
overload, and a client past it is told 503 (OVERLOADED), which is not what is measured here.

    python benchmarks/http_overhead.py [--requests 200] [--clients 64] [--rounds 3]

Prints both latencies, their difference, the concurrency figures and the hardware; one JSON
line last.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aiohttp  # noqa: E402
from daemon_helpers import Daemon  # noqa: E402

from diffucode.daemon.engine.tiny import write_tiny_checkpoint  # noqa: E402

SOURCE = "import os\n\n\ndef add(a, b):\n    total = a + b\n    return total\n"
TOKENS = 8


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overhead(daemon: Daemon, port: int, token: str, n: int) -> tuple[list[float], list[float]]:
    conn = daemon.connect()
    web = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    direct, over_http = [], []
    for i in range(n + 10):
        before, after = SOURCE[:60] + f"x{i}", SOURCE[60:]
        t0 = time.perf_counter()
        err, _ = conn.reply(conn.request("infill", {"before": before, "after": after,
                                                    "sampling": {"max_new_tokens": TOKENS}}))
        t1 = time.perf_counter()
        web.request("POST", "/v1/completions", json.dumps(
            {"model": "m", "prompt": before, "suffix": after, "max_tokens": TOKENS}), headers)
        reply = web.getresponse()
        body = reply.read()
        t2 = time.perf_counter()
        assert err is None and reply.status == 200, (err, reply.status, body)
        direct.append((t1 - t0) * 1000)
        over_http.append((t2 - t1) * 1000)
    conn.close()
    web.close()
    return direct[10:], over_http[10:]  # warm-up


BODIES = {  # path, body, how to tell a whole answer
    "openai": ("/v1/completions", lambda i: {"prompt": SOURCE[:60] + f"c{i}", "suffix": SOURCE[60:],
                                             "max_tokens": TOKENS, "stream": True}),
    "llama": ("/infill", lambda i: {"input_prefix": SOURCE[:60] + f"c{i}", "input_suffix": SOURCE[60:],
                                    "n_predict": TOKENS, "stream": True}),
    "ollama": ("/api/generate", lambda i: {"model": "m", "prompt": SOURCE[:60] + f"c{i}", "suffix": SOURCE[60:],
                                           "options": {"num_predict": TOKENS}}),
}


def whole(dialect: str, raw: bytes) -> bool:
    text = raw.decode()
    if dialect == "openai":
        return text.rstrip().endswith("data: [DONE]")
    if dialect == "llama":
        last = [line for line in text.split("\n") if line.startswith("data: ")][-1]
        return json.loads(last[len("data: "):]).get("stop") is True
    return json.loads(text.strip().split("\n")[-1]).get("done") is True


async def crowd(url: str, token: str, clients: int, rounds: int) -> dict:
    errors, latencies = [], []

    async def client(session: aiohttp.ClientSession, c: int) -> None:
        dialect = list(BODIES)[c % len(BODIES)]
        path, body = BODIES[dialect]
        for r in range(rounds):
            t0 = time.perf_counter()
            try:
                async with session.post(url + path, json=body(c * rounds + r)) as resp:
                    raw = await resp.read()
                    if resp.status != 200 or not whole(dialect, raw):
                        errors.append(f"{dialect} {resp.status} {raw[:200]!r}")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, IndexError) as e:
                errors.append(f"{dialect} {type(e).__name__}: {e}")
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}, connector=connector,
                                     timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * rounds, "errors": len(errors), "first_errors": errors[:3],
            "wall_s": round(wall, 2), "latency_ms": {"p50": round(pct(latencies, 0.5), 1) if latencies else None,
                                                     "p90": round(pct(latencies, 0.9), 1) if latencies else None}}


def run(n: int, clients: int, rounds: int, threads: int, max_queue: int, work: Path) -> dict:
    model = write_tiny_checkpoint(work / "zero-layer", layers=0)
    port = free_port()
    token_file = work / "http.token"
    daemon = Daemon(model, work, "--no-watch", "--http", f"127.0.0.1:{port}", "--http-token-file", str(token_file),
                    "--max-queue", str(max_queue), env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        token = token_file.read_text().strip()
        direct, over_http = overhead(daemon, port, token, n)
        concurrent = asyncio.run(crowd(f"http://127.0.0.1:{port}", token, clients, rounds))
    finally:
        daemon.stop()
    diff = [a - b for a, b in zip(sorted(over_http), sorted(direct))]  # quantile by quantile
    return {
        "benchmark": "http_overhead", "requests": n, "tokens": TOKENS, "model": "zero-layer tiny checkpoint, CPU",
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "aiohttp": aiohttp.__version__, "torch_threads": threads,
        "max_queue": max_queue,
        "socket_ms": {"p50": round(pct(direct, 0.5), 2), "p90": round(pct(direct, 0.9), 2)},
        "http_ms": {"p50": round(pct(over_http, 0.5), 2), "p90": round(pct(over_http, 0.9), 2)},
        "http_overhead_ms": {"p50": round(statistics.median(diff), 2), "p90": round(pct(diff, 0.9), 2)},
        # the same, request pair by request pair (each HTTP request right after its socket twin)
        "paired_overhead_ms": {"p50": round(statistics.median(b - a for a, b in zip(direct, over_http)), 2)},
        "target_p50_ms": 2.0, "concurrent_streams": concurrent,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="requests per concurrent client")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="the daemon's --max-queue (default: --clients; below it, a burst is partly told 503)")
    parser.add_argument("--threads", type=int, default=1,
                        help="the daemon's torch threads (OMP_NUM_THREADS); 1 keeps a shared CPU's noise out of the "
                             "model's time, which both paths pay alike")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.requests, args.clients, args.rounds, args.threads, args.max_queue or max(16, args.clients),
                Path(tmp))
    print(f"hardware: {r['hardware']}; {r['model']}, {r['torch_threads']} torch thread(s); {r['requests']} requests "
          f"of {r['tokens']} tokens, socket and HTTP interleaved")
    for name in ("socket_ms", "http_ms", "http_overhead_ms"):
        print(f"{name:17s} p50 {r[name]['p50']:7.2f}  p90 {r[name]['p90']:7.2f}")
    print(f"paired (each HTTP request minus its socket twin) p50 {r['paired_overhead_ms']['p50']:.2f}")
    print(f"target: HTTP overhead p50 <= {r['target_p50_ms']} ms")
    c = r["concurrent_streams"]
    print(f"{c['clients']} concurrent streaming clients (--max-queue {r['max_queue']}), {c['requests']} requests (OpenAI, llama.cpp, Ollama "
          f"mixed): {c['errors']} errors, {c['wall_s']} s, latency p50 {c['latency_ms']['p50']} ms, "
          f"p90 {c['latency_ms']['p90']} ms")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
