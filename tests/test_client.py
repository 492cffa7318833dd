"""The daemon client against a real daemon (`python -m diffucode serve`) on a temp socket.

No mocks: every test talks to a real daemon process serving the tiny checkpoint. Daemons are
started in their own process group and killed in teardown; the last check makes sure none of
the daemons these tests started (spawned ones included) is left running.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffucode.daemon.rpc.address import Address
from diffucode.daemon.rpc.client import DaemonClient, DaemonUnavailable, ReconnectingClient, SpawnOptions
from diffucode.daemon.rpc.protocol import (CompleteParams, ErrorCode, InfillParams, RefineParams, RPCError,
                                          Sampling, TaskResult)

# exact decoding (the daemon's default may be fast): one full forward per token, the schedule counted here
LONG = Sampling(max_new_tokens=512, steps=512, decoding="exact")  # seconds on the tiny model: long enough to cancel
SHORT = Sampling(max_new_tokens=6, decoding="exact")


def start_daemon(model: Path, log: Path, *where: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "diffucode", "serve", "--model", str(model), "--no-watch",
                                 *where], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_daemon(proc: subprocess.Popen) -> None:
    kill_group(proc.pid)
    proc.wait(timeout=10)


def wait_ready(address: Address, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    async def poll():
        deadline = time.monotonic() + timeout
        while True:
            client = DaemonClient(address, connect_timeout=2.0)
            try:
                await client.connect()
                await client.status()
                return
            except DaemonUnavailable:
                assert proc.poll() is None, f"the daemon exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"the daemon did not start:\n{log.read_text()}"
                await asyncio.sleep(0.1)
            finally:
                await client.close()

    asyncio.run(poll())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raises_before_waiting(coro, exc: type, match: str) -> None:
    """`coro` raises `exc` in its first step, before it awaits anything: no connection attempt,
    no timer, no I/O ("at once" as behaviour rather than as a time, which a busy machine stretches)."""
    try:
        with pytest.raises(exc, match=match):
            coro.send(None)
    finally:
        coro.close()


async def wait_for_counter(client: DaemonClient, name: str, value: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        counters = (await client.status())["counters"]
        if counters[name] >= value or time.monotonic() > deadline:
            return counters
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The folder every daemon of this module lives in; nothing may run from it afterwards."""
    path = tmp_path_factory.mktemp("client")
    yield path
    left = subprocess.run(["pgrep", "-f", f"diffucode serve .*{path}"], capture_output=True, text=True).stdout.split()
    for pid in left:
        kill_group(int(pid))
    assert not left, f"daemons left running: {left}"


@pytest.fixture(scope="module")
def daemon(base, tiny_dir):
    """One daemon on a Unix socket, shared by the tests that leave it running."""
    address, log = Address(socket=base / "shared.sock"), base / "shared.log"
    proc = start_daemon(tiny_dir, log, "--socket", str(address.socket))
    try:
        wait_ready(address, proc, log)
        yield address
    finally:
        stop_daemon(proc)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


# --- one connection ------------------------------------------------------------------------------

def test_connect_and_status(daemon):
    async def main():
        client = DaemonClient(daemon)
        assert not client.connected
        await client.connect()
        assert client.connected
        status = await client.status()
        assert status["protocol"] == 1 and status["device"] == "cpu"
        assert set(status["counters"]) >= {"completed", "cancelled", "failed"}
        assert client.last_request_id == 1
        await client.close()
        assert not client.connected
        with pytest.raises(DaemonUnavailable, match="not connected"):
            await client.status()

    run(main())


def test_infill_round_trip_with_progress(daemon):
    async def main():
        client = DaemonClient(daemon)
        await client.connect()
        params = InfillParams(before="def add(a, b):\n    return ", after="\n", sampling=SHORT)
        result = await client.infill(params)
        assert isinstance(result, TaskResult) and result.steps == SHORT.max_new_tokens
        assert len(result.tokens) == len(result.confidence) == len(result.order) and isinstance(result.text, str)
        assert set(result.ar_ness) == {"local", "global"}

        updates = []
        again = await client.infill(params, on_progress=updates.append)
        assert not params.progress  # the caller's params are not changed
        assert again.text == result.text  # temperature 0: the same answer
        assert [u["id"] for u in updates] == [client.last_request_id] * len(updates)
        assert [u["step"] for u in updates] == list(range(SHORT.max_new_tokens))
        assert updates[0]["masks_left"] == SHORT.max_new_tokens and "text" in updates[0]
        # the other typed methods; a sampling field not sent takes the daemon's default
        done = await client.complete(CompleteParams(before="import os\n", sampling=Sampling(max_new_tokens=4)))
        assert isinstance(done, TaskResult) and len(done.tokens) <= 4
        span = "    return a + b\n"
        new = await client.refine(RefineParams(before="def add(a, b):\n", span=span, after="\n", sampling=SHORT))
        assert isinstance(new, TaskResult) and len(new.tokens) == len(new.confidence)
        # alternatives: one request, ranked best first, the result being the best
        ranked = await client.infill(InfillParams(before="def mean(values):\n    total = ", after="\n",
                                                  alternatives=4, sampling=Sampling(max_new_tokens=8)))
        scores = [a["score"] for a in ranked.alternatives]
        assert 1 <= len(scores) <= 4 and scores == sorted(scores, reverse=True)
        assert ranked.text == ranked.alternatives[0]["text"]
        with pytest.raises(RPCError, match="alternatives and lengths do not combine"):
            await client.infill(InfillParams(before="x = ", alternatives=2, lengths=[4, 8]))
        await client.close()

    run(main())


def test_error_reply_keeps_the_connection(daemon):
    async def main():
        client = DaemonClient(daemon)
        await client.connect()
        with pytest.raises(RPCError) as e:
            await client.request("translate", {})
        assert e.value.code == ErrorCode.METHOD_NOT_FOUND
        with pytest.raises(RPCError) as e:
            await client.request("infill", {"before": 3})
        assert e.value.code == ErrorCode.INVALID_PARAMS and "before" in e.value.message
        assert (await client.status())["protocol"] == 1
        await client.close()

    run(main())


def test_cancelling_the_awaiting_task_cancels_the_request(daemon):
    async def main():
        client = DaemonClient(daemon)
        await client.connect()
        before = (await client.status())["counters"]["cancelled"]
        started = asyncio.Event()
        task = asyncio.create_task(client.infill(InfillParams(before="x = ", sampling=LONG),
                                                 on_progress=lambda u: started.set()))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()  # what a language server's $/cancelRequest does to its handler
        with pytest.raises(asyncio.CancelledError):
            await task
        counters = await wait_for_counter(client, "cancelled", before + 1)
        assert counters["cancelled"] == before + 1
        assert counters["last_cancelled_steps"] < LONG.steps
        await client.close()

    run(main())


def test_timeout_raises_and_cancels_in_the_daemon(daemon):
    async def main():
        client = DaemonClient(daemon)
        await client.connect()
        before = (await client.status())["counters"]["cancelled"]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="cancel"):
            await client.infill(InfillParams(before="x = ", sampling=LONG), timeout=0.3)
        assert time.monotonic() - t0 < 2
        counters = await wait_for_counter(client, "cancelled", before + 1)
        assert counters["cancelled"] == before + 1
        assert client.connected  # a timeout is not a broken connection
        await client.close()

    run(main())


def test_close_fails_pending_requests_at_once(daemon):
    async def main():
        client = DaemonClient(daemon)
        await client.connect()
        task = asyncio.create_task(client.infill(InfillParams(before="x = ", sampling=LONG)))
        await asyncio.sleep(0.2)
        await client.close()
        with pytest.raises(DaemonUnavailable):
            await asyncio.wait_for(task, 2)

    run(main())


def test_nothing_listening_is_reported_at_once(base):
    async def main():
        # at once, not after the connect timeout: an hour here, far beyond what the waits allow
        nobody = Address(socket=base / "nobody.sock")
        with pytest.raises(DaemonUnavailable, match="no daemon is listening"):
            await asyncio.wait_for(DaemonClient(nobody, connect_timeout=3600).connect(), 30)
        reconnecting = ReconnectingClient(nobody, connect_timeout=3600)
        with pytest.raises(DaemonUnavailable):
            await asyncio.wait_for(reconnecting.status(), 30)
        assert reconnecting.state == "down" and "no daemon" in reconnecting.last_error

    run(main())


# --- spawning ------------------------------------------------------------------------------------

def test_racing_clients_spawn_one_daemon(base, tiny_dir):
    sock, log = base / "spawned.sock", base / "spawned.log"
    spawn = SpawnOptions(["--model", str(tiny_dir), "--no-watch"], log)
    clients = [DaemonClient(Address(socket=sock), spawn=spawn, connect_timeout=60) for _ in range(3)]

    async def main():
        await asyncio.gather(*(c.connect() for c in clients))
        return await asyncio.gather(*(c.status() for c in clients))

    try:
        statuses = run(main())
        spawned = [c.spawned_pid for c in clients if c.spawned_pid is not None]
        assert len(spawned) == 1, spawned
        assert {s["limits"]["pid"] for s in statuses} == set(spawned)
        assert log.read_text().count("listening on") == 1
        # the daemon outlives its clients: it was started in its own session
        assert os.getpgid(spawned[0]) == spawned[0]
    finally:
        for c in clients:
            if c.spawned_pid:
                kill_group(c.spawned_pid)
                c.spawned_process.wait(10)


def test_a_daemon_still_loading_is_waited_for_not_spawned_again(base, tiny_dir):
    sock, log = base / "slow.sock", base / "slow.log"
    spawn = SpawnOptions(["--model", str(tiny_dir), "--no-watch"], log)
    impatient = DaemonClient(Address(socket=sock), spawn=spawn, connect_timeout=0.2)
    patient = ReconnectingClient(Address(socket=sock), spawn=spawn, connect_timeout=60)

    async def main():
        with pytest.raises(DaemonUnavailable, match="may still be loading"):
            await impatient.connect()
        assert impatient.spawned_pid is not None
        connecting = asyncio.create_task(patient.ensure_connected())
        await asyncio.sleep(0)
        assert patient.state == "connecting"
        client = await connecting
        assert patient.state == "connected" and client.spawned_pid is None
        assert (await patient.status())["limits"]["pid"] == impatient.spawned_pid
        await patient.close()

    try:
        run(main())
        assert log.read_text().count("listening on") == 1
    finally:
        if impatient.spawned_pid:
            kill_group(impatient.spawned_pid)
            impatient.spawned_process.wait(10)


def test_spawned_daemon_that_exits_early_reports_its_log(base):
    log = base / "broken.log"
    client = DaemonClient(Address(socket=base / "broken.sock"),
                          spawn=SpawnOptions(["--model", str(base / "no-such-model")], log), connect_timeout=60)
    with pytest.raises(DaemonUnavailable) as e:
        run(client.connect())
    assert "exited with status" in str(e.value) and "no-such-model" in str(e.value)
    assert client.spawned_process.poll() is not None


# --- the daemon going away -----------------------------------------------------------------------

def test_killed_daemon_fails_pending_request_and_reconnects_after_backoff(base, tiny_dir):
    address, log = Address(socket=base / "killed.sock"), base / "killed.log"
    proc = start_daemon(tiny_dir, log, "--socket", str(address.socket))
    procs = [proc]
    try:
        wait_ready(address, proc, log)

        async def until_killed(client: ReconnectingClient):
            assert (await client.status())["limits"]["pid"] == proc.pid
            assert client.state == "connected" and client.last_error is None
            started = asyncio.Event()
            task = asyncio.create_task(client.infill(InfillParams(before="x = ", sampling=LONG),
                                                     on_progress=lambda u: started.set()))
            await asyncio.wait_for(started.wait(), 10)
            os.killpg(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(DaemonUnavailable):
                await asyncio.wait_for(task, 5)
            assert time.monotonic() - t0 < 2
            assert client.state == "down" and client.last_error
            # within the backoff: refused at once, without trying
            raises_before_waiting(client.status(), DaemonUnavailable, "next attempt")
            # after it: one attempt, which fails (nobody listens) and doubles the backoff
            await asyncio.sleep(client.retry_in)
            with pytest.raises(DaemonUnavailable, match="no daemon is listening"):
                await client.status()
            assert client.state == "down" and 0.25 < client.retry_in <= 0.5

        async def after_restart(client: ReconnectingClient, pid: int):
            await asyncio.sleep(client.retry_in)
            assert (await client.status())["limits"]["pid"] == pid
            assert client.state == "connected" and client.last_error is None
            result = await client.infill(InfillParams(before="x = ", sampling=SHORT))
            assert result.steps == SHORT.max_new_tokens
            await client.close()

        async def main():
            client = ReconnectingClient(address)
            await until_killed(client)
            proc.wait(10)
            restarted = start_daemon(tiny_dir, log, "--socket", str(address.socket))
            procs.append(restarted)
            await asyncio.get_running_loop().run_in_executor(None, wait_ready, address, restarted, log)
            await after_restart(client, restarted.pid)

        run(main())
    finally:
        for p in procs:
            stop_daemon(p)


# --- TCP -----------------------------------------------------------------------------------------

def test_tcp_with_the_right_token_works_and_a_wrong_one_is_refused(base, tiny_dir, capsys):
    port, token_file, log = free_port(), base / "tcp.token", base / "tcp.log"
    address = Address(host="127.0.0.1", port=port, token_file=token_file)
    proc = start_daemon(tiny_dir, log, "--tcp", f"127.0.0.1:{port}", "--token-file", str(token_file))
    try:
        wait_ready(address, proc, log)
        wrong_file = base / "wrong.token"
        wrong_file.write_text("0" * 64 + "\n")
        wrong = Address(host="127.0.0.1", port=port, token_file=wrong_file)

        async def main():
            client = DaemonClient(address)
            await client.connect()
            assert (await client.status())["limits"]["pid"] == proc.pid
            await client.close()

            refused = DaemonClient(wrong)
            with pytest.raises(RPCError) as e:
                await refused.connect()
            assert e.value.code == ErrorCode.UNAUTHORIZED and not refused.connected
            # the error says which file held the refused token, and how to give the right one
            assert f"refused the token in {wrong_file}" in e.value.message and "--token-file" in e.value.message
            absent = base / "absent.token"
            with pytest.raises(DaemonUnavailable, match=f"cannot read the daemon's token from {absent}: .*--token-file"):
                await DaemonClient(Address(host="127.0.0.1", port=port, token_file=absent)).connect()

            reconnecting = ReconnectingClient(wrong)
            with pytest.raises(DaemonUnavailable):
                await reconnecting.status()
            assert reconnecting.state == "down" and "UNAUTHORIZED" in reconnecting.last_error

        run(main())
        from diffucode.cli import main as cli

        code = cli(["status", "--tcp", f"127.0.0.1:{port}", "--token-file", str(wrong_file)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and f"refused the token in {wrong_file}" in err
    finally:
        stop_daemon(proc)


def test_a_full_daemon_says_why_it_closed(base, tiny_dir):
    address, log = Address(socket=base / "full.sock"), base / "full.log"
    proc = start_daemon(tiny_dir, log, "--socket", str(address.socket), "--max-connections", "1")
    try:
        wait_ready(address, proc, log)

        async def main():
            held = DaemonClient(address)
            deadline = time.monotonic() + 30
            while True:  # wait_ready's closed connection frees its place once the daemon reads the close
                await held.connect()
                try:
                    await held.status()
                    break
                except DaemonUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            turned_away = DaemonClient(address)
            await turned_away.connect()
            with pytest.raises(DaemonUnavailable, match="OVERLOADED: 1 connections is the limit of 1"):
                await turned_away.status()
            assert not turned_away.connected and "limit of 1" in turned_away.close_reason
            assert (await held.status())["uptime_s"] >= 0  # the one admitted is untouched
            await held.close()

        run(main())
    finally:
        stop_daemon(proc)


def test_importing_the_client_does_not_import_torch():
    code = "import sys, diffucode.daemon.rpc.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
