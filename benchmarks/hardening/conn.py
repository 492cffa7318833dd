"""A blocking msgpack-rpc connection to the daemon, shared by the hardening suite and the tests
(tests/daemon_helpers.py imports it from here), so that both speak the protocol the same way.

It is deliberately independent of daemon/rpc/client.py: the suite and the server's tests speak
the wire protocol byte for byte, garbage included, and must not trust the code they check.
Importing it has no side effects (no signal handlers, no cleanup at exit), unlike common.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import msgpack


def unix_socket(path: Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    return s


class Conn:
    """A blocking msgpack-rpc connection: requests, replies by id, notifications kept aside;
    `send_raw` sends any bytes at all. A reset reads as a close: to a caller both mean the daemon
    dropped the connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        # request ids start above the small ones callers write by hand ([0, 1, "status", {}])
        self.next_id = 100
        self.notifications: list = []
        self.replies: dict = {}

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message) -> None:
        self.sock.sendall(msgpack.packb(message, use_bin_type=True))

    def request(self, method: str, params=None) -> int:
        self.next_id += 1
        self.send([0, self.next_id, method, params if params is not None else {}])
        return self.next_id

    def read(self):
        """The next message from the daemon (a reply or a notification); None when it closed the
        connection. Raises TimeoutError (socket.timeout) when nothing arrives within the socket's
        timeout."""
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                pass
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.unpacker.feed(data)

    def reply(self, msgid: int):
        """(error, result) of request msgid; other replies and notifications seen meanwhile are kept."""
        while msgid not in self.replies:
            msg = self.read()
            if msg is None:
                raise ConnectionError("the daemon closed the connection")
            if isinstance(msg, list) and len(msg) == 4 and msg[0] == 1:
                self.replies[msg[1]] = (msg[2], msg[3])
            else:
                self.notifications.append(msg)
        return self.replies.pop(msgid)

    def call(self, method: str, params=None):
        err, result = self.reply(self.request(method, params))
        if err is not None:
            raise AssertionError(f"{method} failed: {err}")
        return result


def error_name(err) -> str:
    """The error's name from a reply's error field ("ok" for none)."""
    if err is None:
        return "ok"
    if isinstance(err, dict):
        return str(err.get("name", "?"))
    return f"malformed:{type(err).__name__}"
