"""A real daemon in a subprocess, and a plain blocking msgpack-rpc connection to talk to it.

The blocking client is deliberately independent of daemon/client.py: the server's tests speak
the wire protocol byte for byte, garbage included.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack


class Daemon:
    def __init__(self, model: Path, workdir: Path, *extra: str, tcp: str | None = None, env=None):
        self.workdir = workdir
        self.socket = workdir / "d.sock"
        self.tcp = tcp
        self.token_file = workdir / "d.token"
        address = ["--tcp", tcp, "--token-file", str(self.token_file)] if tcp else ["--socket", str(self.socket)]
        self.log = open(workdir / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diffucode", "serve", "--model", str(model), *address, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.wait_ready()

    def connect(self, timeout: float = 30.0) -> "Conn":
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
        self.log.close()


class Conn:
    """A blocking msgpack-rpc connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.next_id = 100
        self.notifications: list = []
        self.replies: dict = {}

    def close(self) -> None:
        self.sock.close()

    def send(self, message) -> None:
        self.sock.sendall(msgpack.packb(message, use_bin_type=True))

    def request(self, method: str, params=None) -> int:
        self.next_id += 1
        self.send([0, self.next_id, method, params if params is not None else {}])
        return self.next_id

    def read(self):
        """The next message (a reply or a notification); None when the daemon closed."""
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                pass
            data = self.sock.recv(65536)
            if not data:
                return None
            self.unpacker.feed(data)

    def reply(self, msgid: int):
        """(error, result) of request msgid; notifications seen meanwhile are kept."""
        while msgid not in self.replies:
            msg = self.read()
            if msg is None:
                raise ConnectionError("the daemon closed the connection")
            if msg[0] == 1:
                self.replies[msg[1]] = (msg[2], msg[3])
            else:
                self.notifications.append(msg)
        return self.replies.pop(msgid)

    def call(self, method: str, params=None):
        err, result = self.reply(self.request(method, params))
        if err is not None:
            raise AssertionError(f"{method} failed: {err}")
        return result
