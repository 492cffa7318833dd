"""Starting the daemon for a client when nothing listens at its address.

Under an exclusive lock file beside the socket (or the token file), so that clients racing to
start it start one; the pid of the daemon started is written in the lock file, so that a client
that gave up waiting while the model loaded does not start a second one next time. Knows
processes, files and the address; nothing of the protocol.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from .address import EXIT_ADDRESS_TAKEN, Address
from ..errors import DaemonUnavailable

log = logging.getLogger("diffucode.client")

POLL_S = 0.1  # how often a spawning client checks whether the daemon accepts yet
Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class SpawnOptions:
    """Start `python -m diffucode serve *args --socket ...` when nothing listens at the address."""

    args: list[str]  # e.g. ["--model", DIR]; the address options are added by the client
    log_file: Path | None = None  # the daemon's stdout and stderr (appended); None discards them


class Spawner:
    """Starts `python -m diffucode serve` for one client and waits until it accepts."""

    def __init__(self, address: Address, options: SpawnOptions, connect_timeout: float, open_connection: Opener):
        self.address, self.options, self.connect_timeout = address, options, connect_timeout
        self._open = open_connection  # the client's own way to connect
        self.process: subprocess.Popen | None = None  # kept so that its exit status is reaped
        self.pid: int | None = None  # the daemon this client started, if it started one

    async def spawn_and_open(self, deadline: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Start the daemon under a lock file, so that clients racing to start it start one."""
        base = self.address.socket or self.address.token_file
        lock_path = base.with_name(base.name + ".spawn.lock")
        lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(lock_path, "a+") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DaemonUnavailable(f"another client is starting the daemon at {self.address}; "
                                                f"it did not finish within {self.connect_timeout} s") from None
                    await asyncio.sleep(POLL_S / 2)
            try:
                try:  # the lock holder before us may have started it
                    return await self._open()
                except OSError:
                    pass
                lock.seek(0)
                recorded = lock.read().strip()
                pid = int(recorded) if recorded.isdigit() else 0
                if pid and is_daemon(pid):  # started earlier, still loading its model: wait for it
                    log.info("waiting for the daemon (pid %d) to accept connections", pid)
                    return await self._wait_accepting(pid, None, None, deadline)
                process, log_offset = self._start()
                lock.seek(0)
                lock.truncate()
                lock.write(f"{process.pid}\n")
                lock.flush()
                return await self._wait_accepting(process.pid, process, log_offset, deadline)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _start(self) -> tuple[subprocess.Popen, int]:
        a = self.address
        if a.is_tcp:
            host = f"[{a.host}]" if ":" in a.host else a.host
            where = ["--tcp", f"{host}:{a.port}", "--token-file", str(a.token_file)]
        else:
            where = ["--socket", str(a.socket)]
        command = [sys.executable, "-m", "diffucode", "serve", *self.options.args, *where]
        log_file, log_offset = self.options.log_file, 0
        out = subprocess.DEVNULL
        try:
            if log_file is not None:
                out = open(log_file, "ab")
                log_offset = out.tell()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       start_new_session=True)
        except OSError as e:
            raise DaemonUnavailable(f"cannot start the daemon ({shlex.join(command)}): {e}") from e
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        log.info("started the daemon, pid %d: %s", process.pid, shlex.join(command))
        self.process, self.pid = process, process.pid
        return process, log_offset

    async def _wait_accepting(self, pid: int, process: subprocess.Popen | None, log_offset: int | None,
                              deadline: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        other = False  # ours found the address taken: another daemon (a standby taking over) is starting
        while True:
            try:
                return await self._open()
            except OSError:
                pass
            exited = not other and (process.poll() is not None if process is not None else not is_daemon(pid))
            if exited and process is not None and process.returncode == EXIT_ADDRESS_TAKEN:
                log.info("another daemon holds %s: waiting for it to accept connections", self.address)
                other, exited = True, False
            if exited:
                status = f" with status {process.returncode}" if process is not None else ""
                raise DaemonUnavailable(f"the daemon (pid {pid}) exited{status} before accepting connections at "
                                        f"{self.address}{self._log_tail(log_offset)}")
            if time.monotonic() >= deadline:
                raise DaemonUnavailable(f"the daemon (pid {pid}) did not accept connections at {self.address} "
                                        f"within {self.connect_timeout} s; it may still be loading the model"
                                        f"{self._log_tail(log_offset)}")
            await asyncio.sleep(POLL_S)

    def _log_tail(self, offset: int | None, chars: int = 2000) -> str:
        log_file = self.options.log_file
        if log_file is None or offset is None:
            return "" if log_file is None else f"; its log: {log_file}"
        try:
            with open(log_file, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        text = text[-chars:].strip()
        return f"; the end of its log ({log_file}):\n{text}" if text else f"; its log ({log_file}) is empty"


def is_daemon(pid: int) -> bool:
    """True while pid is a live (not zombie) `diffucode serve` process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a daemon of ours
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust the signal check
    return state != "Z" and b"diffucode" in cmdline and b"serve" in cmdline
