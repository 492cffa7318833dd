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
import sys
import time
from pathlib import Path

import msgpack

from .address import Address
from .errors import DiffucodeError
from .protocol import REQUEST

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
    if address.is_tcp:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(msgpack.packb([REQUEST, 0, "auth", {"token": address.read_token()}]))
    else:
        reader, writer = await asyncio.open_unix_connection(str(address.socket))
    writer.write(msgpack.packb([REQUEST, 1, "shutdown", {}]))
    await writer.drain()
    try:
        await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


def take_address(address: Address, replace: bool):
    """Lock the address for this process, replacing a running daemon when asked."""
    from .server import probe

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
        except (OSError, DiffucodeError) as e:
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


def serve(args, address: Address) -> int:
    from .model_state import ModelState
    from .server import DaemonServer, ServerLimits
    from .tasks import Limits

    level = (args.log_level or os.environ.get("DIFFUCODE_LOG") or "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = take_address(address, args.replace)
    if lock is None:
        return 1
    started = time.monotonic()
    from diffucode.models import default_model

    state = ModelState(args.model or str(default_model()), args.device, args.dtype, args.prompt_format,
                       Limits(max_canvas_tokens=args.max_canvas_tokens, max_context_tokens=args.max_context_tokens),
                       quantize=args.quantize, decoding=args.decoding, cuda_graphs=args.cuda_graphs,
                       prefix_cache=args.prefix_cache)
    log.info("loaded %s on %s (%s, quantization %s, %s decoding by default) in %.2f s", state.path, state.device,
             state.dtype, state.quantization, args.decoding, time.monotonic() - started)
    if not args.no_watch:
        state.watch()
    server = DaemonServer(state, address, ServerLimits(max_frame_bytes=args.max_frame_bytes,
                                                       max_queue=args.max_queue,
                                                       max_connections=args.max_connections))

    async def main():
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_shutdown)
        await server.run_until_stopped()

    try:
        asyncio.run(main())
    finally:
        state.stop()
        lock.close()
    return 0
