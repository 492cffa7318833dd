"""fuzz.py's report: what one run measured (Run), and the sections printed from it: frames and
tracebacks, the daemon's memory, the well-behaved clients' latency, the replies per category and
hostile param, slowloris and crowds.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from common import Daemon, Report, mb, percentile
from fuzz_clients import SLOW_MODES, Fuzzer, WellBehaved


@dataclass
class Run:
    """What one fuzz run measured, for the report."""

    fuzzer: Fuzzer
    idle: list[float]  # well-behaved infill latencies at idle (ms)
    idle_status: list[float]  # `status` latencies at idle (ms)
    client: WellBehaved  # the infill loop during the fuzz
    status_client: WellBehaved  # the `status` loop during the fuzz
    rss_warm: int
    rss_end: int
    rss_samples: list[tuple[float, int]]
    seconds: float
    crashed: bool


def report_frames(report: Report, daemon: Daemon, run: Run, args, warmup: int) -> None:
    """Frames sent, crashes, and the daemon's tracebacks grouped by exception."""
    sent = sum(run.fuzzer.frames.values())
    report.section("frames")
    report.figure("frames_sent", "frames sent (warm-up included)", sent, "",
                  f">= {args.frames + warmup}", sent >= args.frames + warmup, kind="size")
    report.figure("seconds", "seconds of fuzzing", round(run.seconds, 1), "s")
    report.figure("crashes", "daemon crashes (process exited)", int(run.crashed), "", "0", not run.crashed)
    if run.crashed:
        report.note(f"the daemon exited with status {daemon.proc.returncode}; the end of its log:")
        report.note(daemon.log_text()[-2000:])
    tracebacks = daemon.tracebacks()
    report.figure("tracebacks", "tracebacks in the daemon's log", tracebacks, "", "0", tracebacks == 0)
    kinds: dict[str, list[str]] = defaultdict(list)  # the exception line -> its tracebacks
    for excerpt in daemon.traceback_excerpts(n=1000):
        kinds[excerpt.splitlines()[-1]].append(excerpt)
    for last, excerpts in kinds.items():
        report.note(f"{len(excerpts)} x {last}; the first, from the daemon's log:\n{excerpts[0]}")
    report.evidence("tracebacks", {last: len(excerpts) for last, excerpts in kinds.items()})


def report_memory(report: Report, run: Run) -> None:
    """Daemon RSS: after warm-up, at the quarters, at the end; growth against the goal."""
    growth = 100.0 * (run.rss_end - run.rss_warm) / run.rss_warm if run.rss_warm and run.rss_end else math.nan
    report.section("memory (daemon RSS)")
    report.figure("rss_warm_mb", "after warm-up", mb(run.rss_warm), "MB")
    report.figure("rss_end_mb", "at the end", mb(run.rss_end), "MB")
    report.figure("rss_peak_mb", "peak sampled during the fuzz", mb(max(r for _, r in run.rss_samples)), "MB")
    report.figure("rss_quarters_mb", "at 1/4, 1/2, 3/4 of the fuzz (a plateau, or a climb?)",
                  " / ".join(f"{mb(r)}" for r in quarters(run.rss_samples)), "MB")
    report.figure("rss_growth_pct", "growth, end vs after warm-up", round(growth, 2), "%", "< 5 %",
                  growth < 5.0, kind="memory")


def report_latency(report: Report, run: Run) -> None:
    """The well-behaved infill at idle and during the fuzz, the `status` loop (event-loop stalls),
    and what the fuzzer was sending when either was slow."""
    client, status_client, idle, f = run.client, run.status_client, run.idle, run.fuzzer
    report.section("well-behaved client (small infill)")
    p50_idle, p50_fuzz = percentile(idle, 0.5), percentile(client.latencies, 0.5)
    max_idle, max_fuzz = max(idle), max(client.latencies, default=math.nan)
    report.figure("idle_n", "requests at idle", len(idle))
    report.figure("fuzz_n", "requests during the fuzz", len(client.latencies))
    report.figure("idle_p50_ms", "p50 at idle", round(p50_idle, 1), "ms")
    report.figure("fuzz_p50_ms", "p50 during the fuzz", round(p50_fuzz, 1), "ms")
    report.figure("p50_ratio", "p50 during / idle", round(p50_fuzz / p50_idle, 2), "x", "<= 1.5x",
                  p50_fuzz <= 1.5 * p50_idle, kind="timing")
    report.figure("idle_max_ms", "max at idle", round(max_idle, 1), "ms")
    report.figure("fuzz_max_ms", "max during the fuzz", round(max_fuzz, 1), "ms")
    report.figure("max_ratio", "max during / idle", round(max_fuzz / max_idle, 2), "x", "<= 3x",
                  max_fuzz <= 3 * max_idle, kind="timing")
    slow_infill = 3 * max_idle
    report.note(f"infill slower than 3x the idle max ({slow_infill:.0f} ms): "
                f"{sum(ms > slow_infill for ms in client.latencies)}; sent meanwhile: "
                f"{dict(overlapping(client.samples, f.timeline, slow_infill).most_common(8))}")
    report.figure("status_idle_ms", "`status` (event loop only): p50 / max at idle",
                  f"{percentile(run.idle_status, 0.5):.1f} / {max(run.idle_status):.1f}", "ms")
    report.figure("status_fuzz_ms", "`status` (event loop only): p50 / max during",
                  f"{percentile(status_client.latencies, 0.5):.1f} / {max(status_client.latencies, default=0):.1f}",
                  "ms")
    stall_ms = 500.0
    stalls = sum(ms > stall_ms for ms in status_client.latencies)
    report.figure("status_stalls", f"`status` slower than {stall_ms:g} ms (event-loop stalls)", stalls)
    if stalls:
        report.note(f"sent meanwhile: {dict(overlapping(status_client.samples, f.timeline, stall_ms).most_common(8))}")
    failures = {k: v for k, v in client.names.items() if k != "ok"}
    failures.update({f"status: {k}": v for k, v in status_client.names.items() if k != "ok"})
    report.evidence("well_behaved_errors", failures)
    report.figure("well_behaved_errors", "well-behaved requests not answered", sum(failures.values()), "",
                  "0", not failures)
    if failures:
        report.note(f"errors: {dict(failures)}")


def report_categories(report: Report, run: Run) -> None:
    """The replies per category, hung frames, and each hostile param's replies."""
    f = run.fuzzer
    report.section("replies per category (error names; ok = a result)")
    for category in sorted(f.by_category):
        names = f.by_category[category]
        report.note(f"{category:<18} {f.frames[category]:>6} frames  "
                    + ", ".join(f"{k} {v}" for k, v in names.most_common()))
    unanswered = {c: n for c, names in f.by_category.items() for k, n in names.items()
                  if k.startswith("(no reply in") or k == "(not closed in time)"}
    report.figure("hung", "frames neither answered nor closed in time", sum(unanswered.values()), "", "0",
                  not unanswered)
    report.section("hostile params: replies, slowest (ms), the first error message")
    for label in sorted(f.hostile_outcomes):
        names = f.hostile_outcomes[label]
        ms = f.hostile_ms.get(label)
        message = f.hostile_messages.get(label, "")
        report.note(f"{label:<44} " + ", ".join(f"{k} {v}" for k, v in names.most_common())
                    + (f"  ({ms:.0f} ms)" if ms else "") + (f"  {message[:110]}" if message else ""))
    accepted = sorted(label for label, names in f.hostile_outcomes.items() if "ok" in names)
    report.note(f"answered with a result: {accepted}")
    report.extra["hostile_accepted"] = accepted


def report_slowloris(report: Report, run: Run, args) -> None:
    """Slowloris connections by mode (told TIMEOUT? closed when?) and the crowds."""
    f, slow = run.fuzzer, run.fuzzer.slow_results
    report.section(f"slowloris (daemon --frame-timeout {args.frame_timeout:g}) and crowds")
    for mode in SLOW_MODES:
        rows = [(name, secs) for m, name, secs in slow if m == mode]
        names = Counter(name for name, _ in rows)
        report.note(f"{mode:<11} {len(rows)} connections: {dict(names)}; closed after "
                    f"{min((x for _, x in rows), default=0):.2f} .. {max((x for _, x in rows), default=0):.2f} s")
    timeouts = sum(name == "TIMEOUT" for _, name, _ in slow)
    report.evidence("slowloris_timeouts", dict(f.by_category["slowloris"]))
    report.figure("slowloris_timeouts", "connections told TIMEOUT", timeouts, "", f"all {len(slow)}",
                  timeouts == len(slow))
    slowest = max((secs for _, _, secs in slow), default=0)
    report.figure("slowloris_close_s", "slowest close after the first byte", round(slowest, 2), "s",
                  f"<= {args.frame_timeout + 2:g} s", slowest <= args.frame_timeout + 2, kind="timing")
    crowd = f.by_category.get("many_connections", Counter())
    odd = {k: v for k, v in crowd.items() if k not in ("ok", "OVERLOADED")}
    report.figure("crowds", "crowds of --max-connections + 16 at once", f.crowds)
    report.figure("crowd_overloaded", "crowd connections told OVERLOADED", crowd.get("OVERLOADED", 0), "",
                  ">= 16 per crowd, the rest ok", crowd.get("OVERLOADED", 0) >= 16 * f.crowds and not odd)


def overlapping(samples: list[tuple[float, float]], timeline: list, over_ms: float) -> Counter:
    """For each sample slower than over_ms: what the fuzzer was sending meanwhile (by label)."""
    seen = Counter()
    for t0, ms in samples:
        if ms > over_ms:
            t1 = t0 + ms / 1000
            seen.update({what for start, end, what in timeline if start < t1 and end > t0})
    return seen


def quarters(samples: list[tuple[float, int]]) -> list[int]:
    """The samples nearest 1/4, 1/2 and 3/4 of the way through."""
    t0, t1 = samples[0][0], samples[-1][0]
    return [min(samples, key=lambda s: abs(s[0] - (t0 + q * (t1 - t0))))[1] for q in (0.25, 0.5, 0.75)]
