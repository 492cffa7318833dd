"""A real daemon in a subprocess, and a plain blocking msgpack-rpc connection to talk to it.

The connection is the hardening suite's (benchmarks/hardening/conn.py), so that the tests and
the suite speak the protocol one way. It is deliberately independent of daemon/rpc/client.py:
the server's tests speak the wire protocol byte for byte, garbage included.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# The suite's folder is no package (its scripts run as `python benchmarks/hardening/X.py`, the way
# tests/test_hardening_suite.py runs them), so conn.py is imported from that folder on the path;
# appended, so that the scripts' names shadow nothing already importable.
sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks" / "hardening"))

from conn import Conn


class Daemon:
    def __init__(self, model: Path, workdir: Path, *extra: str, tcp: str | None = None, env=None):
        self.workdir = workdir
        self.socket = workdir / "d.sock"
        self.tcp = tcp
        self.token_file = workdir / "d.token"
        address = ["--tcp", tcp, "--token-file", str(self.token_file)] if tcp else ["--socket", str(self.socket)]
        with open(workdir / "daemon.log", "ab") as log:  # the daemon writes to its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "diffucode", "serve", "--model", str(model), *address, *extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.wait_ready()

    def connect(self, timeout: float = 30.0) -> Conn:
        if self.tcp:
            host, port = self.tcp.rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=timeout)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(self.socket))
        conn = Conn(s)
        if self.tcp:
            conn.call("auth", {"token": self.token_file.read_text().strip()})
        return conn

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                self.connect(timeout=2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"daemon did not listen within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return (self.workdir / "daemon.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
