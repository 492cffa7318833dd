"""`diffucode serve`: one daemon per address, started in the foreground.

An exclusive lock file beside the socket (or the token file) marks the address as owned for
the daemon's lifetime, so two `serve` commands never both listen: the second finds the running
daemon, says so and exits 1, or with --replace asks it to shut down and takes over.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from ..rpc.address import EXIT_ADDRESS_TAKEN, Address
from ..errors import DiffucodeError
from ..rpc.client import DaemonClient, probe
from ..rpc.protocol import RPCError

log = logging.getLogger("diffucode.serve")


def lock_path(address: Address) -> Path:
    base = address.socket if not address.is_tcp else address.token_file
    return base.with_name(base.name + ".lock")


def try_lock(path: Path):
    """An open file holding an exclusive lock on path, or None when another process has it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    os.chmod(path, 0o600)
    return f


async def ask_shutdown(address: Address) -> None:
    client = DaemonClient(address, connect_timeout=5.0)
    try:
        await client.connect()
        await client.shutdown(timeout=5.0)
    finally:
        await client.close()


def take_address(address: Address, replace: bool):
    """Lock the address for this process, replacing a running daemon when asked."""
    lock = try_lock(lock_path(address))
    if lock is None:
        status = asyncio.run(probe(address)) or {}
        who = (f"pid {status['limits']['pid']}, model {status['model']}" if "limits" in status
               else "it is starting or not answering")
        if not replace:
            print(f"diffucode serve: a daemon already serves {address} ({who}); use --replace to take over",
                  file=sys.stderr)
            return None
        log.info("asking the daemon at %s to shut down (%s)", address, who)
        try:
            asyncio.run(ask_shutdown(address))
        except (OSError, DiffucodeError, RPCError) as e:
            log.warning("could not ask it to shut down: %s", e)
        deadline = time.monotonic() + 30
        while (lock := try_lock(lock_path(address))) is None:
            if time.monotonic() > deadline:
                print(f"diffucode serve: the daemon at {address} did not shut down within 30 s", file=sys.stderr)
                return None
            time.sleep(0.1)
    if not address.is_tcp and address.socket.exists():
        address.socket.unlink()  # stale: we hold the lock, so nobody serves it
    return lock


def seconds_since_exec() -> float:
    """How long this process has existed (from /proc; 0.0 where that is not readable)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


STANDBY_FLAG = "--as-standby"  # (hidden) the process a `--standby` daemon keeps ready


def wait_for_address(address: Address):
    """A standby's wait: block until the daemon's lock is free. A daemon that shuts down stops its
    standby first, so getting the lock means the daemon ended without shutting down (kill -9,
    a crash, the OOM killer): take over."""
    path = lock_path(address)
    f = open(path, "a+")
    log.info("standby for %s: Python and torch loaded; waiting", address)
    fcntl.flock(f, fcntl.LOCK_EX)
    log.warning("the daemon at %s ended without shutting down: this standby takes over", address)
    if not address.is_tcp and address.socket.exists():
        address.socket.unlink()  # the dead daemon's socket
    return f


def start_standby() -> subprocess.Popen | None:
    """A copy of this command, waiting with its imports done to take over if this daemon dies (it
    shares our process group and log; respawn then costs a model load, not an interpreter and torch)."""
    args = [a for a in sys.argv[1:] if a != STANDBY_FLAG]
    try:
        return subprocess.Popen([sys.executable, "-m", "diffucode", *args, STANDBY_FLAG], stdin=subprocess.DEVNULL)
    except OSError as e:
        log.warning("no standby: %s", e)
        return None


def stop_standby(standby: subprocess.Popen | None) -> None:
    """Before the lock is let go: a daemon that shuts down must not be taken over."""
    if standby is not None and standby.poll() is None:
        standby.terminate()
        try:
            standby.wait(10)
        except subprocess.TimeoutExpired:
            standby.kill()
            standby.wait()


def serve(args, address: Address) -> int:
    at_entry = seconds_since_exec()  # the interpreter and diffucode's light modules
    from .reload import ModelState  # torch, here
    from .server import DaemonServer, ServerLimits
    from ..engine.options import Limits

    level = (args.log_level or os.environ.get("DIFFUCODE_LOG") or "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    http_at = None
    if getattr(args, "http", None):  # checked before the model loads: a bad address fails at once
        from .http import HttpServer, http_address

        http_at = http_address(args.http, args.http_token_file, args.http_allow_remote)
    lock = wait_for_address(address) if args.as_standby else take_address(address, args.replace)
    if lock is None:
        return EXIT_ADDRESS_TAKEN
    at_imports, started = seconds_since_exec(), time.monotonic()  # (a standby: when it took over)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
        log.info("%d torch threads", args.threads)
    from diffucode.models import default_model

    state = ModelState(args.model or str(default_model()), args.device, args.dtype, args.prompt_format,
                       Limits(max_canvas_tokens=args.max_canvas_tokens, max_context_tokens=args.max_context_tokens,
                              max_text_chars=args.max_text_chars),
                       quantize=args.quantize, decoding=args.decoding, cuda_graphs=args.cuda_graphs,
                       prefix_cache=args.prefix_cache, adapter=getattr(args, "adapter", None))
    log.info("loaded %s on %s (%s, quantization %s, %s decoding by default) in %.2f s", state.path, state.device,
             state.dtype, state.quantization, args.decoding, time.monotonic() - started)
    if state.adapter is not None:
        a = state.adapter
        log.info("LoRA adapter %s: rank %d on %d layers, %d steps, last reward %s", a["path"], a["rank"],
                 a["layers"], a["steps"], a["last_reward"])
    if not args.no_watch:
        state.watch()
    server = DaemonServer(state, address, ServerLimits(max_frame_bytes=args.max_frame_bytes,
                                                       max_queue=args.max_queue,
                                                       max_connections=args.max_connections,
                                                       auth_timeout_s=args.auth_timeout,
                                                       frame_timeout_s=args.frame_timeout,
                                                       idle_evict_s=args.idle_evict))

    standby = None

    async def main():
        nonlocal standby
        http = HttpServer(server, http_at) if http_at else None
        if http is not None:  # first: a port already taken stops the daemon before the socket listens
            await http.start()
        await server.start()
        if args.as_standby:
            log.info("serving %.2f s after taking over (the model)", time.monotonic() - started)
        else:
            log.info("serving %.2f s after the process started (Python and diffucode %.2f s, torch %.2f s, the "
                     "model %.2f s)", seconds_since_exec(), at_entry, at_imports - at_entry, time.monotonic() - started)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_shutdown)
        if args.standby:
            standby = start_standby()
        await server.run_until_stopped()
        if http is not None:
            await http.stop()

    try:
        asyncio.run(main())
    finally:
        stop_standby(standby)
        state.stop()
        lock.close()
    return 0
