"""Where the daemon listens: a Unix socket in the user's runtime directory by default, or
loopback TCP with a token. Shared by the daemon, its client library and the CLI; no torch.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

EXIT_ADDRESS_TAKEN = 1  # `diffucode serve`'s exit status when another daemon holds its address


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/diffucode, else a per-user folder in the temp dir; created 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "diffucode" if base else Path(tempfile.gettempdir()) / f"diffucode-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise InputError(f"{path} belongs to another user; set XDG_RUNTIME_DIR to a folder of yours")
    os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class Address:
    """A Unix socket path, or a loopback host and port plus the file holding the token."""

    socket: Path | None = None
    host: str | None = None
    port: int | None = None
    token_file: Path | None = None

    @property
    def is_tcp(self) -> bool:
        return self.socket is None

    def __str__(self) -> str:
        return str(self.socket) if self.socket else f"{self.host}:{self.port}"

    def read_token(self) -> str:
        try:
            return self.token_file.read_text().strip()
        except OSError as e:
            raise InputError(f"cannot read the daemon's token from {self.token_file}: {e.strerror}; "
                             f"{self.token_help()}") from e

    def token_help(self) -> str:
        """How to give a TCP client the daemon's token (for its errors)."""
        return (f"the daemon writes its token when it starts, to its --token-file, else to daemon-{self.port}.token "
                f"in its runtime folder ($XDG_RUNTIME_DIR/diffucode); give this client --token-file with the "
                f"daemon's file, or restart the daemon as `diffucode serve --tcp {self} --token-file {self.token_file}`")


def default_address() -> Address:
    return Address(socket=runtime_dir() / "daemon.sock")


def tcp_address(spec: str, token_file: str | Path | None = None) -> Address:
    """127.0.0.1:PORT (or [::1]:PORT); anything but a loopback address is refused."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"--tcp {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:7777")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InputError(f"--tcp {spec!r}: only loopback addresses (127.0.0.1, ::1) are allowed")
    token = Path(token_file) if token_file else runtime_dir() / f"daemon-{port}.token"
    return Address(host=host, port=int(port), token_file=token)


def write_token(path: Path) -> str:
    """A fresh random token in a file only the user can read."""
    token = secrets.token_hex(32)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token
