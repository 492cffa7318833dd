"""Fuzz a live daemon while a well-behaved client measures its latency (issue 14, section 3).

Starts `python -m diffucode serve` on a temp Unix socket (a tiny random checkpoint unless
--model) and throws frames at it:

- stream frames, each on its own connection, which the fuzzer then half-closes and reads to the
  end: random bytes, truncated msgpack (followed by a whole frame), valid frames with bytes
  flipped, deep nesting, huge headers (array32 / map32 / str32 / bin32 / ext32 claiming up to
  4 GiB), huge valid frames (a 2 M-element array, a 500 k-key map, 7.9 MB of text);
- messages on one long-lived connection, each followed by a `status` request so that every
  reply it caused is read before the next: wrong shapes and types of [type, msgid, method,
  params], and hostile params (steps 1e9, 2**64-1, NaN / inf temperature, 200 lengths,
  negative top_k, 5e-324 alg_temp, 900 k characters of text, ...), whose replies are awaited;
- many connections at once (more than --max-connections), each sending `status`;
- slowloris: half a frame then silence, or a frame dripped a byte every 0.25 s (in the
  background).

Meanwhile a well-behaved client sends a small infill in a loop, and another `status` (answered
by the event loop alone, so a stall shows there); their latencies are measured at idle first,
then during the fuzz, and when one is slow the report says what the fuzzer was sending at the
time. Reported: frames sent, daemon crashes, tracebacks in the daemon's log (grouped by
exception), daemon RSS after the warm-up, during and at the end, the well-behaved client's p50
and max (idle and during), and the error names received per category. Goals (issue 14): 0
crashes, 0 tracebacks, RSS growth < 5 %, p50 within 1.5x and max within 3x of idle.

    python benchmarks/hardening/fuzz.py [--frames 10000] [--seed 1] [--model DIR] [--threads N]
        [--only CATEGORY,...]

The frames are built in fuzz_frames.py, sent by fuzz_clients.py (which also holds the
well-behaved clients), and reported by fuzz_report.py.

The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from common import Daemon, Report, add_threads_option, scratch, tiny_model, torch_env
from fuzz_clients import Fuzzer, WellBehaved, pinger
from fuzz_frames import WEIGHTS
from fuzz_report import (
    Run,
    report_categories,
    report_frames,
    report_latency,
    report_memory,
    report_slowloris,
)


def idle_latency(client: WellBehaved, n: int) -> list[float]:
    """The client's request n times on an otherwise idle daemon (after 3 warm-up requests)."""
    for _ in range(n + 3):
        client.one()
        time.sleep(client.pause_s)
    client.conn.close()
    return client.latencies[3:]


def settle_rss(daemon: Daemon, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return daemon.rss()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10_000, help="frames in the measured run (10,000)")
    p.add_argument("--warmup", type=int, default=None, help="frames before the RSS baseline (frames/10, <= 1000)")
    p.add_argument("--warmup-rounds", type=int, default=3,
                   help="rounds of every hostile param and huge frame at the start of the warm-up (3)")
    p.add_argument("--idle", type=int, default=40, help="well-behaved requests at idle (40)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", type=Path, default=None, help="checkpoint to serve (default: a tiny random one)")
    p.add_argument("--frame-timeout", type=float, default=2.0, help="daemon --frame-timeout (2 s)")
    p.add_argument("--max-connections", type=int, default=64, help="daemon --max-connections (64)")
    p.add_argument("--reply-timeout", type=float, default=30.0, help="seconds to wait for a reply (30)")
    every = ", ".join([*WEIGHTS, "huge_valid_frames", "many_connections", "slowloris"])
    p.add_argument("--only", default=None, help=f"fuzz only these categories, comma-separated ({every}), "
                                                "e.g. to find which one a figure comes from")
    add_threads_option(p)
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else min(1000, args.frames // 10)
    report = Report("fuzz", {"frames": args.frames, "warmup": warmup, "warmup_rounds": args.warmup_rounds,
                             "seed": args.seed, "only": args.only,
                             "frame_timeout": args.frame_timeout, "max_connections": args.max_connections,
                             "threads": args.threads})
    work = scratch("fuzz")
    model = args.model or tiny_model(work / "model")
    daemon = Daemon(model, work, "--no-watch", "--frame-timeout", str(args.frame_timeout),
                    "--max-connections", str(args.max_connections), env=torch_env(args.threads))
    try:
        measure(report, daemon, args, warmup)
    finally:
        daemon.stop()
    report.finish()  # after the daemon is gone: the JSON line is the last
    return 0


def measure(report: Report, daemon: Daemon, args, warmup: int) -> None:
    run = fuzz(daemon, args, warmup)
    report_frames(report, daemon, run, args, warmup)
    report_memory(report, run)
    report_latency(report, run)
    report_categories(report, run)
    report_slowloris(report, run, args)
    f = run.fuzzer
    report.extra.update(categories={c: dict(v) for c, v in f.by_category.items()},
                        hostile={k: dict(v) for k, v in f.hostile_outcomes.items()},
                        hostile_messages=f.hostile_messages,
                        well_behaved=dict(run.client.names), well_behaved_status=dict(run.status_client.names),
                        daemon_exit=daemon.proc.returncode)


def fuzz(daemon: Daemon, args, warmup: int) -> Run:
    """Idle latencies, the warm-up, the RSS baseline, then the measured fuzz with the well-behaved
    clients and an RSS sampler running."""
    idle = idle_latency(WellBehaved(daemon), args.idle)
    idle_status = idle_latency(pinger(daemon), 5 * args.idle)
    fuzzer = Fuzzer(daemon, args)
    client, status_client = WellBehaved(daemon), pinger(daemon)
    client.start()  # during the warm-up too: its requests share batches with the fuzzer's
    status_client.start()
    t0 = time.monotonic()
    fuzzer.run(warmup, every_kind_first=args.warmup_rounds)
    fuzzer.finish_slowloris()
    rss_warm = settle_rss(daemon)
    for c in (client, status_client):  # latencies from here on (errors: from the start)
        c.latencies.clear()
        c.samples.clear()
    rss_samples = [(time.monotonic(), rss_warm)]
    sampler = threading.Thread(target=sample_rss, args=(daemon, client.stopping, rss_samples), daemon=True)
    sampler.start()
    fuzzer.run(args.frames)
    fuzzer.finish_slowloris()
    for c in (client, status_client):
        c.stopping.set()
        c.join(120)
    seconds = time.monotonic() - t0
    crashed = not daemon.alive()
    rss_end = 0 if crashed else settle_rss(daemon)
    return Run(fuzzer, idle, idle_status, client, status_client, rss_warm, rss_end, rss_samples, seconds, crashed)


def sample_rss(daemon: Daemon, stop: threading.Event, samples: list) -> None:
    while not stop.wait(0.5):
        samples.append((time.monotonic(), daemon.rss()))


if __name__ == "__main__":
    sys.exit(main())
