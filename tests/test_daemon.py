"""The daemon: a real `diffucode serve` in a subprocess on a temp socket, spoken to over the wire."""

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from daemon_helpers import Conn, Daemon

from diffucode.daemon.engine.tiny import write_tiny_checkpoint

# seconds on the tiny model: long enough to cancel (exact: every step a full forward over 1k tokens)
LONG = {"max_new_tokens": 1000, "steps": 1000, "decoding": "exact"}
BEFORE, AFTER = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("daemon-model"))


@pytest.fixture(scope="module")
def daemon(model_dir, tmp_path_factory):
    d = Daemon(model_dir, tmp_path_factory.mktemp("daemon"), "--no-watch", "--max-queue", "4",
               "--max-frame-bytes", "100000")
    yield d
    d.stop()


def infill(conn, **kw):
    params = {"before": BEFORE, "after": AFTER, "sampling": {"max_new_tokens": 8}}
    params.update(kw)
    return conn.request("infill", params)


def test_status_and_infill_from_a_second_process(daemon, model_dir):
    out = subprocess.run([sys.executable, "-m", "diffucode", "status", "--socket", str(daemon.socket), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["model"] == str(model_dir) and status["device"] == "cpu" and status["dtype"] == "float32"
    assert status["quantization"] == "none" and status["memory"]["weights"] > 0
    assert set(status["queue"]) == {"pending", "running", "limit"} and status["uptime_s"] >= 0
    conn = daemon.connect()
    err, result = conn.reply(infill(conn))
    assert err is None and result["steps"] == 8 and isinstance(result["text"], str)
    assert len(result["tokens"]) == len(result["confidence"]) <= 8
    # the same request through the CLI's own code path gives the same middle (greedy)
    from diffucode.daemon.engine.options import DEFAULT_DECODING  # what the daemon uses for requests that do not choose
    from diffucode.daemon.engine.checkpoint import load_checkpoint
    from diffucode.daemon.engine.tasks import Options, Tasks

    local = Tasks(load_checkpoint(model_dir, device="cpu"), decoding=DEFAULT_DECODING).infill(
        BEFORE, AFTER, Options(max_new_tokens=8))
    assert local.text == result["text"]


def test_concurrent_clients_all_get_answers(daemon):
    results = {}

    def client(i):
        conn = daemon.connect()
        results[i] = conn.reply(infill(conn, sampling={"max_new_tokens": 4 + i}))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, (err, result) in results.items():
        assert err is None and result["steps"] == 4 + i


def test_cancel_stops_within_one_step(daemon):
    conn = daemon.connect()
    msgid = infill(conn, sampling=LONG, progress=True)
    while True:  # wait for the third step's progress notification
        msg = conn.read()
        if msg[0] == 2 and msg[1] == "progress" and msg[2]["id"] == msgid and msg[2]["step"] >= 2:
            seen = msg[2]["step"]
            assert "\u2591" in msg[2]["text"]  # the partial canvas, masks shown
            break
    conn.send([2, "cancel", {"id": msgid}])
    err, result = conn.reply(msgid)
    assert err is not None and err["name"] == "CANCELLED", err
    steps_run = err["data"]["steps_run"]
    # the step running when the cancel arrived finishes, then the loop stops
    assert seen + 1 <= steps_run <= seen + 2, (seen, steps_run)
    status = conn.call("status")
    assert status["counters"]["last_cancelled_steps"] == steps_run


def test_newer_request_of_a_group_cancels_the_older(daemon):
    conn = daemon.connect()
    old = infill(conn, sampling=LONG, group="file:///a.py")
    time.sleep(0.3)
    new = infill(conn, group="file:///a.py")
    other = infill(conn, group="file:///b.py")
    err_old, _ = conn.reply(old)
    assert err_old["name"] == "CANCELLED" and "superseded" in err_old["message"]
    assert conn.reply(new)[0] is None and conn.reply(other)[0] is None


def test_deadline_returns_the_best_canvas_in_time(daemon):
    conn = daemon.connect()
    t0 = time.monotonic()
    err, result = conn.reply(infill(conn, sampling=LONG, deadline_ms=400))
    elapsed = time.monotonic() - t0
    assert err is None and result["finished_early"] is True
    assert result["steps"] < 1000 and "\u2591" not in result["text"] and "<|mask|>" not in result["text"]
    assert elapsed < 10


def test_limits_give_clear_errors(daemon):
    conn = daemon.connect()
    err, _ = conn.reply(infill(conn, sampling={"max_new_tokens": 5000}))
    assert err["name"] == "TOO_LARGE" and "canvas of 5000 tokens exceeds the limit of 1024" in err["message"]
    err, _ = conn.reply(infill(conn, sampling={"max_new_tokens": "many"}))
    assert err["name"] == "INVALID_PARAMS" and "params.sampling.max_new_tokens must be int, got 'many'" in err["message"]
    err, _ = conn.reply(conn.request("infill", {"before": "x", "colour": 3}))
    assert err["name"] == "INVALID_PARAMS" and "unknown field 'colour'" in err["message"]
    err, _ = conn.reply(conn.request("translate", {}))
    assert err["name"] == "METHOD_NOT_FOUND"
    err, _ = conn.reply(infill(conn, sampling={"max_new_tokens": 8, "alg": "nope"}))
    assert err["name"] == "INVALID_PARAMS" and "alg 'nope'" in err["message"]
    # a frame over --max-frame-bytes: an error, that connection closed, the daemon fine
    big = daemon.connect()
    big.send([0, 1, "infill", {"before": "x" * 200_000}])
    msg = big.read()
    assert msg[0] == 1 and msg[2]["name"] == "TOO_LARGE" and "100000 bytes" in msg[2]["message"]
    assert big.read() is None
    assert conn.call("status")["uptime_s"] > 0


def test_queue_limit_answers_overloaded(daemon):
    conn = daemon.connect()
    alone = {**LONG, "temperature": 0.7}  # sampled: each runs alone (greedy ones would share a batch)
    ids = [infill(conn, sampling=alone) for _ in range(7)]  # at most 1 running + 4 queued
    first = conn.reply(ids[-1])[0]
    assert first["name"] == "OVERLOADED" and "at its limit of 4" in first["message"]
    for i in ids:
        conn.send([2, "cancel", {"id": i}])
    names = [conn.reply(i)[0]["name"] for i in ids[:-1]]
    assert names.count("CANCELLED") in (4, 5) and set(names) == {"CANCELLED", "OVERLOADED"}


def admitted(d: Daemon, deadline_s: float = 30.0) -> Conn:
    """A connection whose `status` was answered. A place held by a client that has just closed
    is freed once the daemon reads that close, so OVERLOADED meanwhile means: try again."""
    deadline = time.monotonic() + deadline_s
    while True:
        conn = d.connect()
        msgid = conn.request("status")
        _, replied_to, err, result = conn.read()
        if replied_to == msgid:
            assert err is None and result["uptime_s"] >= 0
            return conn
        assert err["name"] == "OVERLOADED" and time.monotonic() < deadline, err
        conn.close()
        time.sleep(0.05)


def test_connection_limit_answers_overloaded_then_frees_a_place(model_dir, tmp_path):
    d = Daemon(model_dir, tmp_path, "--no-watch", "--max-connections", "2")
    try:
        held = [admitted(d), admitted(d)]
        third = d.connect()
        third.request("status")  # sent before the daemon turns it away: the reply must still arrive
        msg = third.read()
        assert msg[0] == 1 and msg[2]["name"] == "OVERLOADED" and "limit of 2" in msg[2]["message"]
        assert third.read() is None  # then an orderly close, not a reset
        held.pop().close()
        admitted(d)
    finally:
        d.stop()


def test_garbage_frames_never_take_the_daemon_down(daemon):
    rng = random.Random(1234)
    valid = msgpack.packb([0, 1, "infill", {"before": "a", "after": "b", "sampling": {"max_new_tokens": 2}}])

    def junk():
        kind = rng.randrange(6)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 64))
        if kind == 1:
            return valid[:rng.randrange(1, len(valid))]  # truncated
        if kind == 2:
            return msgpack.packb(rng.choice([None, 1, "x", [], [9], [0], [0, "id", "status", {}], [1, 2, 3, 4],
                                             [2, "cancel", "nope"], [2, "cancel", {"id": "x"}], {"a": 1},
                                             [0, 5, "status", []], [0, 6, 7, 8], [0, 7, "infill", None]]))
        if kind == 3:
            blob = bytearray(valid)
            for _ in range(3):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            return bytes(blob)
        if kind == 4:
            return b"\xdd\xff\xff\xff\xff"  # array32 claiming 4 billion items
        return b"\xc1" * rng.randrange(1, 8)  # never-used byte

    frames = 0
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(daemon.socket))
        try:
            for _ in range(25):
                s.sendall(junk())
                frames += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.close()
    assert frames >= 2000
    conn = admitted(daemon)  # a loaded machine may not have read every junk client's close yet
    err, result = conn.reply(infill(conn))
    assert err is None and result["steps"] == 8


def test_client_killed_mid_request(daemon):
    code = ("import socket, msgpack, time, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "long = {'max_new_tokens': 1000, 'steps': 1000, 'decoding': 'exact'}\n"  # fast may stop at an end token
            "s.sendall(msgpack.packb([0, 1, 'infill', {'before': 'x', 'sampling': long}]))\n"
            "print('sent', flush=True); time.sleep(60)\n")
    conn = daemon.connect()
    before = conn.call("status")["counters"]["cancelled"]
    child = subprocess.Popen([sys.executable, "-c", code, str(daemon.socket)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "sent"
    time.sleep(0.5)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 20
    while conn.call("status")["counters"]["cancelled"] == before:
        assert time.monotonic() < deadline, "the dead client's request was not cancelled"
        time.sleep(0.1)
    while conn.call("status")["queue"]["running"]:  # nothing keeps running for a dead client
        assert time.monotonic() < deadline, "work went on after the client died"
        time.sleep(0.1)
    assert conn.reply(infill(conn))[0] is None


def test_default_socket_permissions(model_dir, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen([sys.executable, "-m", "diffucode", "serve", "--model", str(model_dir), "--no-watch"],
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    sock = runtime / "diffucode" / "daemon.sock"
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        out = subprocess.run([sys.executable, "-m", "diffucode", "status"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and str(sock) in out.stdout
    finally:
        proc.terminate()
        proc.wait(10)
    assert not sock.exists()  # removed on shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_needs_the_token(model_dir, tmp_path):
    d = Daemon(model_dir, tmp_path, "--no-watch", tcp=f"127.0.0.1:{free_port()}")
    try:
        assert stat.S_IMODE(d.token_file.stat().st_mode) == 0o600
        assert d.connect().call("status")["protocol"] == 1
        host, port = d.tcp.rsplit(":", 1)
        # a request first (a wrong token, or no `auth`) is answered UNAUTHORIZED, then closed
        for first in ([0, 1, "auth", {"token": "0" * 64}], [0, 1, "status", {}]):
            bad = Conn(socket.create_connection((host, int(port)), timeout=10))
            bad.send(first)
            msg = bad.read()
            assert msg is not None, f"no answer to {first}"
            assert msg[0] == 1 and msg[2]["name"] == "UNAUTHORIZED"
            assert bad.read() is None  # and the connection is closed
        # a notification first has no id to answer: the connection is closed at once
        bad = Conn(socket.create_connection((host, int(port)), timeout=10))
        bad.send([2, "cancel", {"id": 1}])
        assert bad.read() is None
        # a client that sends on before reading still gets the answer (no reset drops it)
        eager = Conn(socket.create_connection((host, int(port)), timeout=10))
        eager.send([0, 1, "status", {}])
        eager.send([0, 2, "status", {"padding": "x" * 1_000_000}])
        msg = eager.read()
        assert msg[0] == 1 and msg[2]["name"] == "UNAUTHORIZED" and eager.read() is None
        out = subprocess.run([sys.executable, "-m", "diffucode", "status", "--tcp", d.tcp, "--token-file",
                              str(d.token_file)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        d.stop()
    from diffucode.daemon.rpc.address import tcp_address
    from diffucode.daemon.errors import InputError

    with pytest.raises(InputError, match="loopback"):
        tcp_address("0.0.0.0:7777")


def test_second_serve_refuses_and_replace_takes_over(model_dir, tmp_path):
    first = Daemon(model_dir, tmp_path, "--no-watch")
    try:
        pid = first.connect().call("status")["limits"]["pid"]
        again = subprocess.run([sys.executable, "-m", "diffucode", "serve", "--model", str(model_dir),
                                "--socket", str(first.socket), "--no-watch"], capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 1 and f"already serves {first.socket} (pid {pid}" in again.stderr
        second = Daemon(model_dir, tmp_path, "--no-watch", "--replace")
        try:
            assert first.proc.wait(30) == 0
            second.wait_ready()  # (its first readiness check may have reached the old daemon)
            assert second.connect().call("status")["limits"]["pid"] == second.proc.pid
        finally:
            second.stop()
    finally:
        first.stop()


def test_hot_reload_success_and_failure(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "model", seed=3)
    d = Daemon(model, tmp_path)
    try:
        conn = d.connect()
        first = conn.reply(infill(conn))[1]["text"]
        # new weights land: the daemon reloads them between requests
        write_tiny_checkpoint(tmp_path / "staging", seed=4)
        shutil.copy(tmp_path / "staging" / "model.safetensors", model / "model.safetensors")
        reload = wait_reload(conn, "ok")
        assert reload["reloads"] == 1 and reload["error"] is None
        second = conn.reply(infill(conn))[1]["text"]
        assert second != first
        # a broken write: the reload fails, the running model keeps serving, status says why
        (model / "config.json").write_text("{ not json")
        reload = wait_reload(conn, "failed")
        assert "config.json: not valid JSON" in reload["error"]
        assert conn.reply(infill(conn))[1]["text"] == second
    finally:
        d.stop()


def wait_reload(conn, state, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        reload = conn.call("status")["reload"]
        if reload["state"] == state:
            return reload
        assert time.monotonic() < deadline, reload
        time.sleep(0.1)
