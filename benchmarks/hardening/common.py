"""Shared pieces of the hardening suite (issue 14): a real daemon in a subprocess, RSS of a
process from /proc, percentiles, and the report every script prints (each figure beside its goal,
then one JSON line). The blocking msgpack-rpc connection is in conn.py (the tests use it too),
the language server driven like an editor in editor.py.

Nothing here mocks anything: the daemon is `python -m diffucode serve` on a temp Unix socket
(or loopback TCP), and every process a script starts is killed when it exits.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conn import Conn, unix_socket

SMALL_INFILL = {"before": "def add(a, b):\n    return ", "after": "\n", "sampling": {"max_new_tokens": 8}}

_groups: list[int] = []  # process groups this script started, killed at exit
_dirs: list[Path] = []  # temp dirs, removed at exit


# --- lifetime: every process and temp dir goes away at exit -----------------------------------

def _cleanup() -> None:
    for pgid in reversed(_groups):
        kill_group(pgid)
    _groups.clear()
    for d in _dirs:
        shutil.rmtree(d, ignore_errors=True)
    _dirs.clear()


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally` blocks, then atexit cleans up


atexit.register(_cleanup)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group this script started (its own session); quiet if already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def track_group(pgid: int) -> None:
    """Kill this process group (a child started with start_new_session=True) at exit."""
    _groups.append(pgid)


def scratch(prefix: str, keep: bool = False) -> Path:
    """A fresh temp dir, removed at exit unless keep. Short path: Unix socket paths must stay
    under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=f"dch-{prefix}-"))
    if not keep:
        _dirs.append(path)
    return path


def torch_env(threads: int | None, env: dict | None = None) -> dict:
    """The environment for processes that run the model: with threads, OMP_NUM_THREADS set (torch's
    intra-op threads; on a loaded 2-core machine 2 threads can make each step 50x slower)."""
    env = dict(os.environ if env is None else env)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the daemon (default: torch's own choice)")


def tiny_model(out: Path, **kw) -> Path:
    """A tiny random Dream checkpoint in the real file layout (imports torch)."""
    from diffucode.daemon.engine.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(out, **kw)


# --- /proc ------------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of pid now (VmRSS), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def daemon_pids(address: str) -> list[int]:
    """Live `diffucode serve` processes whose command line names this socket path (or
    HOST:PORT): how many daemons serve one address."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"diffucode" in argv and b"serve" in argv and address.encode() in argv and alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def listening_pids(path: str) -> list[int]:
    """Processes holding a listening Unix socket bound to path: the daemons that serve it (a
    standby waiting to take over does not listen; two daemons both listening would show here,
    even after one unlinked the other's socket file)."""
    inodes = set()
    try:
        for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
            cols = row.split()  # Num RefCount Protocol Flags Type St Inode Path
            if len(cols) >= 8 and cols[7] == path and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON
                inodes.add(f"socket:[{cols[6]}]")
    except OSError:
        return []
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                found.add(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- statistics -------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def mb(n: float) -> float:
    return round(n / 2**20, 1)


# --- the daemon -------------------------------------------------------------------------------

class Daemon:
    """`python -m diffucode serve --model M` on a Unix socket (or loopback TCP with a token file)
    in workdir, logging to workdir/daemon.log, in its own process group. default_address: give
    no --socket (the daemon picks its default; socket_path says where that is)."""

    def __init__(self, model: Path, workdir: Path, *flags: str, socket_path: Path | None = None,
                 tcp: str | None = None, token_file: Path | None = None, env: dict | None = None,
                 wait: bool = True, default_address: bool = False):
        self.workdir, self.tcp = workdir, tcp
        self.socket = socket_path or workdir / "d.sock"
        self.token_file = token_file or workdir / "d.token"
        self.log_path = workdir / "daemon.log"
        address = ["--tcp", tcp, "--token-file", str(self.token_file)] if tcp else ["--socket", str(self.socket)]
        if default_address:
            address = []
        self.command = [sys.executable, "-m", "diffucode", "serve", "--model", str(model), *address, *flags]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        track_group(self.proc.pid)
        if wait:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def connect(self, timeout: float = 30.0, auth: bool = True) -> Conn:
        conn = Conn(self.open_socket(timeout))
        if self.tcp and auth:
            conn.call("auth", {"token": self.token_file.read_text().strip()})
        return conn

    def open_socket(self, timeout: float = 30.0) -> socket.socket:
        if self.tcp:
            host, port = self.tcp.rsplit(":", 1)
            return socket.create_connection((host, int(port)), timeout=timeout)
        return unix_socket(self.socket, timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the daemon answers `status` (it loads the model first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                conn = self.connect(timeout=5)
                conn.call("status")
                conn.close()
                return
            except (OSError, ConnectionError, AssertionError):
                time.sleep(0.05)
        raise TimeoutError(f"the daemon did not answer within {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tracebacks(self) -> int:
        return self.log_text().count("Traceback")

    def traceback_excerpts(self, n: int = 2, lines: int = 40) -> list[str]:
        return traceback_excerpts(self.log_text(), n, lines)

    def stop(self) -> int | None:
        """SIGTERM (the daemon shuts down cleanly), SIGKILL after 10 s; returns the exit status."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(self.pid)
                self.proc.wait()
            except ProcessLookupError:
                pass
        kill_group(self.pid)  # anything it started
        return self.proc.returncode


def traceback_excerpts(log: str, n: int = 2, lines: int = 40) -> list[str]:
    """The first n tracebacks of a log, each with the log line before it, at most `lines` lines."""
    rows = log.splitlines()
    out = []
    for i, row in enumerate(rows):
        if row.startswith("Traceback") and len(out) < n:
            end = i + 1
            while end < len(rows) and end - i < lines and (rows[end][:1] in (" ", "\t") or rows[end].startswith("Traceback")
                                                          or rows[end].startswith("During handling")
                                                          or rows[end].startswith("The above") or not rows[end]):
                end += 1
            out.append("\n".join(rows[max(0, i - 1):min(len(rows), end + 1)]))
    return out


# --- the report: figures beside their goals, then one JSON line --------------------------------

class Report:
    """Prints each figure as it is measured, with its goal and whether it is met; `finish`
    prints one JSON line with every figure and goal (the last line of the output).

    A goal is `behaviour` (what must hold on any machine: no crash, no traceback, an error
    named) or `timing` (depends on the machine and its load)."""

    def __init__(self, script: str, config: dict):
        self.script = script
        self.figures: dict = {}
        self.goals: dict = {}
        self.config = config
        self.extra: dict = {}  # more for the JSON line (kept until `finish`)
        print(f"# hardening/{script}: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    def section(self, title: str) -> None:
        print(f"\n## {title}", flush=True)

    def figure(self, key: str, label: str, value, unit: str = "", goal: str | None = None,
               met: bool | None = None, kind: str = "behaviour") -> None:
        self.figures[key] = value
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        line = f"  {label:<46} {shown + (' ' + unit if unit else ''):<22}"
        if goal is not None:
            self.goals[key] = {"goal": goal, "met": bool(met), "kind": kind}
            line += f" goal: {goal:<30} {'met' if met else 'MISSED'}"
        print(line.rstrip(), flush=True)

    def evidence(self, key: str, value) -> None:
        """What explains a figure (a traceback's last lines, the replies seen), in the JSON line."""
        self.extra.setdefault("evidence", {})[key] = value

    def note(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def finish(self, **extra) -> dict:
        behaviour = [g["met"] for g in self.goals.values() if g["kind"] == "behaviour"]
        timing = [g["met"] for g in self.goals.values() if g["kind"] == "timing"]
        out = {"script": self.script, "config": self.config, "figures": self.figures, "goals": self.goals,
               "behaviour_ok": all(behaviour), "timing_ok": all(timing), **self.extra, **extra}
        print(f"\nbehaviour goals met: {sum(behaviour)}/{len(behaviour)}; "
              f"timing goals met: {sum(timing)}/{len(timing)}", flush=True)
        print(json.dumps(out, default=str), flush=True)
        return out
