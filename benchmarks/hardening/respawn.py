"""kill -9 the daemon under three language servers: how soon do they serve again, and how many
daemons run afterwards? (issue 14, section 3)

Three `python -m diffucode lsp` processes, each driven by pygls's LanguageClient with the
settings {"daemon": {"socket": SOCK, "spawn": true}, "model": DIR}, share the daemon the first of
them starts. Each round, after the daemon has served --settle seconds, kills it with SIGKILL, then every language server is asked for
an inline completion every 50 ms (each time after an edit, so its cache cannot answer) until it
answers one with text, which only a live daemon can give. Measured per round: when the new
daemon accepted connections (after the kill), when its process started (before the kill when it
is the standby that the language servers' `serve --standby` keeps ready), when each language
server served again, and how many daemons serve the socket afterwards: processes listening on it
(goal: 1), beside the `diffucode serve` processes in all (a standby waits without listening).
Goal (issue 14): serving again <= 2 s after the kill.

The probe document puts its changing line far enough above the cursor that the model never sees
it (context.beforeTokens 400 sends about 1,600 characters; the completion cache keys on 2,000):
the model's input, hence its greedy answer, is the same every time, and only the cache misses.

    python benchmarks/hardening/respawn.py [--rounds 5] [--settle 10] [--model DIR] [--threads N]

The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import re
import signal
import sys
import time
from pathlib import Path

from common import (
    Report,
    add_threads_option,
    daemon_pids,
    kill_pids,
    listening_pids,
    percentile,
    scratch,
    tiny_model,
    torch_env,
)
from conn import Conn, unix_socket
from editor import Editor

SERVERS = 3
PROBE_EVERY_S = 0.05
FILLER = "".join(f"value_{i:03d} = compute({i}, scale={i % 7})\n" for i in range(52))  # ~1,850 characters


def probe_text(n: int) -> tuple[str, int, int]:
    """The probe document (its first line numbered n) and the cursor (line, character)."""
    head = f"# probe {n:06d}\n" + FILLER + "\n\ndef add(a, b):\n    return "
    line = head.count("\n")
    return head + "\n", line, len(head) - head.rfind("\n") - 1


def settings(sock: Path, model: Path) -> dict:
    return {"daemon": {"socket": str(sock), "spawn": True}, "model": str(model), "maxNewTokens": 8,
            "debounce": {"minMs": 0, "maxMs": 0}, "context": {"beforeTokens": 400, "afterTokens": 64},
            "completion": {"minConfidence": 0}}  # the random tiny model is unsure of every token: no cut


class Probe:
    """One language server with one document; `serve` edits and asks until it answers text."""

    def __init__(self, editor: Editor, uri: str):
        self.editor, self.uri, self.n = editor, uri, 0

    async def once(self) -> list[str]:
        self.n += 1
        text, line, col = probe_text(self.n)
        self.editor.replace(self.uri, text)
        return await self.editor.inline(self.uri, line, col)

    async def serve(self, since: float, timeout: float) -> float | None:
        """Seconds from `since` until a completion with text; None if none within timeout."""
        while time.monotonic() - since < timeout:
            try:
                texts = await asyncio.wait_for(self.once(), timeout)
            except asyncio.TimeoutError:
                continue
            if any(t.strip() for t in texts):
                return time.monotonic() - since
            await asyncio.sleep(PROBE_EVERY_S)
        return None


def process_start_epoch(pid: int) -> float | None:
    """When pid started (epoch seconds, 10 ms resolution), from /proc."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


async def accepting_again(sock: Path, old_pid: int, since: float, timeout: float) -> tuple[float | None, int | None]:
    """Seconds from `since` until a daemon other than old_pid answers `status` on sock."""
    def ask() -> int | None:
        try:
            conn = Conn(unix_socket(sock, 2))
            pid = conn.call("status")["limits"]["pid"]
            conn.close()
            return pid
        except (OSError, ConnectionError, AssertionError, KeyError):
            return None

    while time.monotonic() - since < timeout:
        pid = await asyncio.to_thread(ask)
        if pid is not None and pid != old_pid:
            return time.monotonic() - since, pid
        await asyncio.sleep(0.02)
    return None, None


def load_seconds(log: Path) -> float | None:
    """The last model load time the daemon logged ("loaded ... in X s")."""
    try:
        found = re.findall(r"loaded .* in ([0-9.]+) s", log.read_text(errors="replace"))
    except OSError:
        return None
    return float(found[-1]) if found else None


def describe(pids: list[int], serving: list[int]) -> list[str]:
    """Each `diffucode serve` process: pid, parent, its role (listening, or --as-standby), age."""
    out = []
    now = time.time()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]
        except OSError:
            continue
        role = "listening" if pid in serving else "standby" if b"--as-standby" in argv else "other"
        started = process_start_epoch(pid)
        age = f", {now - started:.1f} s old" if started else ""
        out.append(f"{pid} (parent {ppid}, {role}{age})")
    return out


async def settled_processes(sock: Path, quiet_s: float = 3.0, timeout: float = 30.0) -> list[int]:
    """The `diffucode serve` processes of sock once their number has not changed for quiet_s
    (a spawn that lost the race exits, a new standby starts)."""
    deadline = time.monotonic() + timeout
    last, since = daemon_pids(str(sock)), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = daemon_pids(str(sock))
        if now != last:
            last, since = now, time.monotonic()
    return last


async def one_round(probes: list[Probe], sock: Path, log: Path, timeout: float) -> dict:
    """Kill the daemon, then time the respawn and each language server's first answer."""
    before = listening_pids(str(sock))
    if len(before) != 1:
        raise RuntimeError(f"{len(before)} daemons listen on {sock} before the kill: {before}")
    old = before[0]
    killed_at_epoch, killed_at = time.time(), time.monotonic()
    os.kill(old, signal.SIGKILL)
    accept, *served = await asyncio.gather(accepting_again(sock, old, killed_at, timeout),
                                           *(p.serve(killed_at, timeout) for p in probes))
    accepted_s, new_pid = accept
    await asyncio.sleep(1.0)  # a second spawn racing the first would show up by now
    serving, processes = listening_pids(str(sock)), await settled_processes(sock)
    started = process_start_epoch(new_pid) if new_pid else None
    return {"old_pid": old, "new_pid": new_pid, "daemons_after": len(serving), "serving_after": serving,
            "processes_after": processes, "roles_after": describe(processes, serving),
            "spawned_s": None if started is None else round(started - killed_at_epoch, 2),
            "accepting_s": None if accepted_s is None else round(accepted_s, 3),
            "load_s": load_seconds(log), "served_s": [None if s is None else round(s, 3) for s in served]}


async def run(args, report: Report) -> None:
    work = scratch("respawn")
    model = args.model or tiny_model(work / "model")
    sock = work / "sock" / "d.sock"
    atexit.register(lambda: kill_pids(daemon_pids(str(sock))))  # the daemons the language servers spawned
    env = {**torch_env(args.threads), "XDG_RUNTIME_DIR": str(work / "xdg")}  # the daemon inherits the LSP's  # the spawned daemon logs to xdg/diffucode/daemon.log
    (work / "xdg").mkdir(mode=0o700)
    daemon_log = work / "xdg" / "diffucode" / "daemon.log"
    editors = [Editor(f"lsp{i}", settings(sock, model), work / f"lsp{i}.log", env=env) for i in range(SERVERS)]
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(e.start() for e in editors))
        probes = []
        for i, e in enumerate(editors):
            text, _, _ = probe_text(0)
            e.open(f"file:///respawn/doc{i}.py", text)
            probes.append(Probe(e, f"file:///respawn/doc{i}.py"))
        first = await asyncio.gather(*(p.serve(t0, args.timeout) for p in probes))
        if None in first:
            raise RuntimeError(f"a language server never answered with text before any kill: {first}; "
                               f"daemon log:\n{daemon_log.read_text(errors='replace')[-2000:] if daemon_log.exists() else ''}")
        report.section("start (the first language server spawns the daemon)")
        report.figure("first_served_s", "all three serving after a cold start", round(max(first), 2), "s")
        serving, processes = listening_pids(str(sock)), daemon_pids(str(sock))
        report.figure("daemons_at_start", "daemons serving (listening on) the socket", len(serving), "", "1",
                      len(serving) == 1)
        report.figure("processes_at_start", "`diffucode serve` processes (with standbys)", len(processes))

        rounds = []
        for r in range(args.rounds):
            await asyncio.sleep(args.settle)  # a daemon that has run a while (its standby ready, if any)
            rounds.append(await one_round(probes, sock, daemon_log, args.timeout))
            res = rounds[-1]
            report.note(f"round {r + 1}: killed pid {res['old_pid']}; pid {res['new_pid']} (its process started "
                        f"{res['spawned_s']} s after the kill) accepting after {res['accepting_s']} s (model load "
                        f"{res['load_s']} s); language servers served after {res['served_s']} s; "
                        f"afterwards {res['daemons_after']} listening, {len(res['processes_after'])} processes: "
                        f"{', '.join(res['roles_after'])}")
        summarize(report, rounds, editors, daemon_log)
    finally:
        await asyncio.gather(*(e.stop() for e in editors), return_exceptions=True)
        kill_pids(daemon_pids(str(sock)))


def summarize(report: Report, rounds: list[dict], editors: list[Editor], daemon_log: Path) -> None:
    served = [s for r in rounds for s in r["served_s"]]
    never = sum(s is None for s in served)
    ok = [s for s in served if s is not None]
    worst = max(ok, default=float("nan"))
    report.section(f"after kill -9 ({len(rounds)} rounds x {SERVERS} language servers)")
    report.figure("never_served", "language servers that never served again", never, "", "0", never == 0)
    report.figure("daemons_after", "daemons serving the socket afterwards (most)",
                  max(r["daemons_after"] for r in rounds), "", "1", all(r["daemons_after"] == 1 for r in rounds))
    report.figure("processes_after", "`diffucode serve` processes afterwards (most)",
                  max(len(r["processes_after"]) for r in rounds))
    report.figure("spawned_s_max", "new daemon's process started after the kill (latest)",
                  max((r["spawned_s"] for r in rounds if r["spawned_s"] is not None), default=None), "s")
    report.figure("accepting_s_p50", "new daemon accepting (p50)",
                  round(percentile([r["accepting_s"] for r in rounds if r["accepting_s"] is not None], 0.5), 2), "s")
    report.figure("load_s_max", "its model load as it logs it (slowest)",
                  max((r["load_s"] for r in rounds if r["load_s"] is not None), default=None), "s")
    report.figure("served_s_p50", "serving again after the kill (p50)", round(percentile(ok, 0.5), 2), "s")
    report.figure("served_s_max", "serving again after the kill (slowest)", round(worst, 2), "s", "<= 2 s",
                  never == 0 and worst <= 2.0, kind="timing")
    spawns = sum(e.log_text().count("started the daemon") for e in editors)
    report.figure("lsp_spawns", "`serve` started by the language servers (all rounds)", spawns)
    tracebacks = sum(e.log_text().count("Traceback") for e in editors)
    daemon_tb = daemon_log.read_text(errors="replace").count("Traceback") if daemon_log.exists() else 0
    report.figure("lsp_tracebacks", "tracebacks in the language servers' logs", tracebacks, "", "0", tracebacks == 0)
    report.figure("daemon_tracebacks", "tracebacks in the daemons' log", daemon_tb, "", "0", daemon_tb == 0)
    report.extra["rounds"] = rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="kills (5)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: a tiny random one)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for serving again (60)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds the daemon serves before each kill (10; a standby loads torch meanwhile)")
    add_threads_option(p)
    args = p.parse_args()
    report = Report("respawn", {"rounds": args.rounds, "servers": SERVERS, "model": str(args.model or "tiny"),
                                "settle": args.settle, "threads": args.threads})
    asyncio.run(run(args, report))
    report.finish()  # after every process is gone: the JSON line is the last
    return 0


if __name__ == "__main__":
    sys.exit(main())
