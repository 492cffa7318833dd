"""Who may talk to the daemon (issue 14, section 3): file modes, another local user, the TCP token.

Unix socket (the default address, under XDG_RUNTIME_DIR set to a temp dir): the socket is 0600
and its directory 0700, and another local user cannot connect - checked for real when this runs
as root (a forked child drops to uid/gid 65534 and tries; expected: PermissionError), otherwise
reported as skipped.

Loopback TCP (--tcp 127.0.0.1:PORT --token-file F): the token file is 0600 (and unreadable to
another user); a request before `auth` is answered UNAUTHORIZED and the connection closed; so is a
wrong token, and a token of the wrong type; a notification before `auth` closes the connection; a
client with the token is served; a silent client, or one that sends half a frame, is closed after
--auth-timeout, told TIMEOUT; silent clients cannot take every place (at most half of
--max-connections wait for a token at any time; a client with the token still gets in).

    python benchmarks/hardening/access.py [--auth-timeout 2] [--max-connections 8] [--threads N]

The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
from common import Daemon, Report, add_threads_option, scratch, tiny_model, torch_env
from conn import Conn, error_name

NOBODY = 65534
THREADS: int | None = None  # --threads


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def as_other_user(action) -> str:
    """Run action() in a forked child that has dropped to uid/gid 65534; returns what it reported
    (the exception's type name, or "ok")."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            outcome = "ok"
        except BaseException as e:  # noqa: BLE001 - whatever it is, report its name
            outcome = type(e).__name__
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome


def first_reply(sock: socket.socket, timeout: float) -> tuple[str, bool, float]:
    """(name of the first message, whether the daemon then closed, seconds until it closed)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    conn = Conn(sock)
    try:
        msg = conn.read()
    except TimeoutError:
        return "(nothing)", False, time.monotonic() - t0
    if msg is None:
        return "(closed)", True, time.monotonic() - t0
    name = error_name(msg[2]) if isinstance(msg, list) and len(msg) == 4 else "(message)"
    try:
        closed = conn.read() is None
    except TimeoutError:
        closed = False
    return name, closed, time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_part(report: Report, model: Path, work: Path) -> None:
    runtime = work / "xdg"
    runtime.mkdir()
    env = {**torch_env(THREADS), "XDG_RUNTIME_DIR": str(runtime)}
    sock = runtime / "diffucode" / "daemon.sock"
    ddir = work / "unix"
    ddir.mkdir()
    daemon = Daemon(model, ddir, "--no-watch", socket_path=sock, env=env, default_address=True)
    try:
        report.section(f"Unix socket at the default address ({sock})")
        report.figure("socket_mode", "socket file mode", mode(sock), "", "0o600", mode(sock) == "0o600")
        report.figure("dir_mode", "its directory's mode", mode(sock.parent), "", "0o700", mode(sock.parent) == "0o700")
        served = Conn(daemon.open_socket(10)).call("status")["uptime_s"] >= 0
        report.figure("owner_served", "the owner is served", served, "", "True", served)
        if os.geteuid() != 0:
            report.note("another local user: skipped (needs root)")
            report.figure("other_user_unix", "another user connecting", "skipped (needs root)")
            return

        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(msgpack.packb([0, 1, "status", {}]))
            s.recv(100)
        outcome = as_other_user(connect)
        report.figure("other_user_unix", f"uid {NOBODY} connecting", outcome, "", "PermissionError",
                      outcome == "PermissionError")
    finally:
        daemon.stop()


def tcp_part(report: Report, model: Path, work: Path, auth_timeout: float, max_connections: int) -> None:
    ddir = work / "tcp"
    ddir.mkdir()
    token_file = work / "tokens" / "d.token"  # in a directory the daemon creates
    daemon = Daemon(model, ddir, "--no-watch", "--auth-timeout", str(auth_timeout), "--max-connections",
                    str(max_connections), tcp=f"127.0.0.1:{free_port()}", token_file=token_file,
                    env=torch_env(THREADS))
    token = token_file.read_text().strip()
    wait = auth_timeout + 10
    try:
        report.section(f"loopback TCP ({daemon.tcp}, --auth-timeout {auth_timeout:g}, "
                       f"--max-connections {max_connections})")
        report.figure("token_mode", "token file mode", mode(token_file), "", "0o600", mode(token_file) == "0o600")
        if os.geteuid() == 0:
            outcome = as_other_user(lambda: token_file.read_text())
            report.figure("other_user_token", f"uid {NOBODY} reading the token", outcome, "", "PermissionError",
                          outcome == "PermissionError")
        else:
            report.figure("other_user_token", "another user reading the token", "skipped (needs root)")

        def refused(key: str, label: str, first: list) -> None:
            s = daemon.open_socket(wait)
            for message in first:
                s.sendall(msgpack.packb(message))
            name, closed, _ = first_reply(s, wait)
            s.close()
            report.figure(key, label, f"{name}, {'closed' if closed else 'left open'}", "", "UNAUTHORIZED, closed",
                          name == "UNAUTHORIZED" and closed)

        refused("before_auth", "`status` before `auth`", [[0, 1, "status", {}]])
        refused("infill_before_auth", "`infill` before `auth`", [[0, 1, "infill", {"before": "x"}]])
        refused("wrong_token", "`auth` with a wrong token", [[0, 1, "auth", {"token": "0" * len(token)}]])
        refused("token_type", "`auth` with a token that is not a string", [[0, 1, "auth", {"token": 12345}]])
        refused("empty_auth", "`auth` without a token", [[0, 1, "auth", {}]])

        s = daemon.open_socket(wait)
        s.sendall(msgpack.packb([2, "cancel", {"id": 1}]))
        name, closed, _ = first_reply(s, wait)
        s.close()
        report.figure("notify_before_auth", "a notification before `auth`", f"{name}, {'closed' if closed else 'open'}",
                      "", "closed", closed and name in ("(closed)", "UNAUTHORIZED"))

        served = daemon.connect(timeout=wait).call("status")["uptime_s"] >= 0
        report.figure("token_served", "a client with the token is served", served, "", "True", served)

        silent = daemon.open_socket(wait)
        name, closed, secs = first_reply(silent, wait)
        silent.close()
        report.figure("silent_closed", "a silent client", f"{name}, {'closed' if closed else 'open'}", "",
                      "TIMEOUT, closed", name == "TIMEOUT" and closed)
        report.figure("silent_close_s", "  closed after", round(secs, 2), "s", f"~{auth_timeout:g} s",
                      auth_timeout - 0.5 <= secs <= auth_timeout + 3, kind="timing")
        half = daemon.open_socket(wait)
        half.sendall(msgpack.packb([0, 1, "auth", {"token": token}])[:20])
        name, closed, secs = first_reply(half, wait)
        half.close()
        report.figure("half_auth_closed", "half an `auth` frame, then silence", f"{name}, {'closed' if closed else 'open'}",
                      "", "TIMEOUT, closed", name == "TIMEOUT" and closed)

        crowd(report, daemon, max_connections, wait)
    finally:
        daemon.stop()


def crowd(report: Report, daemon: Daemon, max_connections: int, wait: float) -> None:
    """As many silent clients as the daemon has places: at most half of the places wait for a
    token at any time, a client with the token still gets in, and every silent one is told why
    it is closed (OVERLOADED to make room, or TIMEOUT)."""
    half = max(1, max_connections // 2)
    silent = [daemon.open_socket(wait) for _ in range(max_connections)]
    time.sleep(0.3)  # let the daemon accept them
    try:
        conn = daemon.connect(timeout=wait)
        held = conn.call("status")["counters"]["connections"] - 1  # without this one
        conn.close()
        served = True
    except (OSError, ConnectionError, AssertionError):
        held, served = None, False
    report.figure("crowd_token_served", f"with {max_connections} silent clients, a client with the token",
                  "served" if served else "refused", "", "served", served)
    report.figure("crowd_waiting", "  silent clients holding a place meanwhile", held, "", f"<= {half}",
                  held is not None and held <= half)
    told = Counter(first_reply(s, wait)[0] for s in silent)
    for s in silent:
        s.close()
    report.figure("crowd_told", "  what the silent clients were told", dict(told), "", "OVERLOADED or TIMEOUT each",
                  set(told) <= {"OVERLOADED", "TIMEOUT"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--auth-timeout", type=float, default=2.0, help="daemon --auth-timeout (2 s)")
    p.add_argument("--max-connections", type=int, default=8, help="daemon --max-connections (8)")
    add_threads_option(p)
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    report = Report("access", {"auth_timeout": args.auth_timeout, "max_connections": args.max_connections,
                               "root": os.geteuid() == 0})
    work = scratch("access")
    os.chmod(work, 0o755)  # so that the other user meets the daemon's own 0700 / 0600, not ours
    model = tiny_model(work / "model")
    unix_part(report, model, work)
    tcp_part(report, model, work, args.auth_timeout, args.max_connections)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
