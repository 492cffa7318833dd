"""Hostile input, in-place file changes and runaway requests: the daemon stays up, answers with a
clear error naming the value and the limit, and its answers do not change (issue 14).

The longer versions of these probes (10,000 fuzzed frames, kill -9 under three language servers, a
typing storm) are benchmarks/hardening/; these are their short forms.
"""

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import msgpack
import pytest
from daemon_helpers import Daemon
from safetensors.torch import load_file, save_file
from test_daemon import admitted, free_port, infill, wait_reload

from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.errors import CheckpointError
from diffucode.daemon.rpc.protocol import ErrorCode, InfillParams, RPCError, Sampling
from diffucode.daemon.serve.scheduler import Scheduler
from diffucode.daemon.engine.tiny import write_tiny_checkpoint

LONG = {"max_new_tokens": 200, "steps": 200, "decoding": "exact"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hardening-model"))


@pytest.fixture(scope="module")
def daemon(model_dir, tmp_path_factory):
    d = Daemon(model_dir, tmp_path_factory.mktemp("hardening"), "--no-watch", "--max-text-chars", "50000",
               "--max-connections", "3", "--idle-evict", "1", "--frame-timeout", "1")
    yield d
    d.stop()


def error_of(conn, **kw) -> dict:
    err, _ = conn.reply(infill(conn, **kw))
    assert err is not None, kw
    return err


# --- bounds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling, name, words", [
    ({"max_new_tokens": 8, "steps": 10**9}, "INVALID_PARAMS", "steps must be in [1, max_new_tokens = 8]"),
    ({"max_new_tokens": 8, "steps": 2**64 - 1}, "INVALID_PARAMS", "steps must be in [1, max_new_tokens = 8]"),
    ({"max_new_tokens": 8, "seed": 2**64 - 1, "temperature": float("nan")}, "INVALID_PARAMS",
     "temperature must be a finite number, got nan"),
    ({"max_new_tokens": 8, "temperature": float("inf")}, "INVALID_PARAMS", "temperature must be a finite number"),
    ({"max_new_tokens": 8, "temperature": 5e-324}, "INVALID_PARAMS", "temperature must be 0 or in [0.001, 100]"),
    ({"max_new_tokens": 8, "alg_temp": float("nan")}, "INVALID_PARAMS", "alg_temp must be a finite number"),
    ({"max_new_tokens": 8, "alg_temp": 5e-324}, "INVALID_PARAMS", "alg_temp must be 0 or in [0.001, 100]"),
    ({"max_new_tokens": 8, "top_k": -1}, "INVALID_PARAMS", "top_k must be >= 0"),
    ({"max_new_tokens": 8, "threshold": 0.0}, "INVALID_PARAMS", "threshold must be > 0"),
])
def test_out_of_range_options_are_refused_naming_value_and_limit(daemon, sampling, name, words):
    err = error_of(daemon.connect(), sampling=sampling)
    assert err["name"] == name and words in err["message"], err
    assert "Traceback" not in err["message"]


def test_sizes_are_bounded_before_any_work(daemon):
    conn = daemon.connect()
    err = error_of(conn, lengths=list(range(1, 201)))
    assert err["name"] == "TOO_LARGE" and "lengths has 200 canvas sizes, over the limit of 8" in err["message"]
    err = error_of(conn, lengths=[])
    assert err["name"] == "INVALID_PARAMS" and "lengths is empty" in err["message"]
    err = error_of(conn, before="x = 1\n" * 10_000)  # 60,000 characters against --max-text-chars 50000
    assert err["name"] == "TOO_LARGE" and "before has 60,000 characters, over the limit of 50,000" in err["message"]
    # just under the limit, far more than the context holds: cut before tokenizing, answered
    err, result = conn.reply(infill(conn, before="x = 1\n" * 8_000))
    assert err is None and result["steps"] == 8
    assert conn.call("status")["counters"]["failed"] == 0  # refused before queueing: nothing failed in the model


def test_refine_span_and_deadline_are_bounded(daemon):
    conn = daemon.connect()
    err, _ = conn.reply(conn.request("refine", {"before": "", "span": "x = 1\n" * 4000, "after": ""}))
    assert err["name"] == "TOO_LARGE" and "span has 24,000 characters, more than a canvas of 1024" in err["message"]
    err = error_of(conn, deadline_ms=-5)
    assert err["name"] == "INVALID_PARAMS" and "deadline_ms must be >= 0, got -5" in err["message"]


def test_deeply_nested_params_get_an_error_not_a_traceback(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(daemon.socket))
    # [0, 1, "infill", {"before": [[[...1000 deep...]]]}]: decodes, but its plain repr recurses too deep
    s.sendall(b"\x94\x00\x01" + msgpack.packb("infill") + b"\x81" + msgpack.packb("before") + b"\x91" * 1000 + b"\xc0")
    msg = msgpack.unpackb(s.recv(65536), raw=False)
    assert msg[2]["name"] == "INVALID_PARAMS" and "params.before must be str" in msg[2]["message"], msg
    s.close()
    assert "Traceback" not in daemon.log_text()


def test_a_cancelled_request_frees_its_tensors_at_once(tasks):
    """The canvas of a cancelled request is gone when its answer (CANCELLED) arrives, without the
    garbage collector: nothing keeps its frames alive."""
    canvases = []

    class Watched:  # the real tasks; every step's canvas watched through a weak reference
        def __getattr__(self, name):
            return getattr(tasks, name)

        def infill(self, *args, callback, **kw):
            def spy(step):
                canvases.append(weakref.ref(step.x))
                return callback(step)
            return tasks.infill(*args, callback=spy, **kw)

    scheduler = Scheduler(Watched, max_batch=1)

    async def cancel_midway():
        job = scheduler.submit("infill", InfillParams(before="def f(x):\n    return ", after="\n",
                                                      sampling=Sampling(**LONG)))
        while len(canvases) < 3:
            await asyncio.sleep(0.005)
        job.cancel("the test cancelled it")
        with pytest.raises(RPCError) as e:
            await job.future
        assert e.value.code == ErrorCode.CANCELLED

    gc.disable()
    try:
        asyncio.run(cancel_midway())
        scheduler.stop()
        assert scheduler.wait_idle(10)
        assert canvases and all(ref() is None for ref in canvases), "a cancelled request's canvas is still alive"
    finally:
        gc.enable()


# --- frames and connections -----------------------------------------------------------------


def test_huge_valid_frames_are_refused_without_stalling_others(daemon):
    other = admitted(daemon)
    for frame in ([0, 1, "status", [0] * 2_000_000], [0, 2, "status", {str(i): 0 for i in range(500_000)}]):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(daemon.socket))
        s.sendall(msgpack.packb(frame))
        msg = msgpack.unpackb(s.recv(65536), raw=False)
        assert msg[2]["name"] == "INVALID_FRAME" and "exceeds max_" in msg[2]["message"], msg
        s.close()
        assert other.call("status")["uptime_s"] > 0


def test_undecodable_frames_say_why(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(daemon.socket))
    s.sendall(b"\xc1")  # a byte msgpack never uses
    msg = msgpack.unpackb(s.recv(65536), raw=False)
    assert msg[2]["name"] == "INVALID_FRAME" and "undecodable msgpack ()" not in msg[2]["message"], msg
    s.close()


def test_a_frame_that_never_completes_is_timed_out(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(daemon.socket))
    s.sendall(msgpack.packb([0, 1, "infill", {"before": "x" * 1000}])[:500])  # slowloris: half, then silence
    t0 = time.monotonic()
    msg = msgpack.unpackb(s.recv(65536), raw=False)
    assert msg[2]["name"] == "TIMEOUT" and "still incomplete" in msg[2]["message"], msg
    assert 0.5 < time.monotonic() - t0 < 8
    s.close()


def test_a_burst_of_connects_is_queued_not_refused(daemon):
    """500 non-blocking connects at once: the listen backlog holds them all (a full backlog makes
    a Unix socket's connect fail with EAGAIN); the daemon then answers each, if only OVERLOADED."""
    socks, refused = [], 0
    try:
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(daemon.socket))
            except BlockingIOError:
                refused += 1
            socks.append(s)
        assert refused == 0
    finally:
        for s in socks:
            s.close()
    assert admitted(daemon).call("status")["uptime_s"] > 0


def test_a_frame_dripped_a_byte_at_a_time_is_timed_out(daemon):
    """Slowloris with small items: the decoder moves through them as they come, so only a whole
    message may reset the frame's clock."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.2)
    s.connect(str(daemon.socket))
    frame, t0, reply = msgpack.packb([0, 1, "status", [1] * 1000]), time.monotonic(), b""
    for byte in frame[:60]:
        try:
            s.send(bytes([byte]))
            reply = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if reply:
            break
    msg = msgpack.unpackb(reply, raw=False)
    assert msg[2]["name"] == "TIMEOUT" and "still incomplete" in msg[2]["message"], msg
    assert time.monotonic() - t0 < 8  # --frame-timeout 1, not the 12 s the drip lasts
    s.close()


def test_idle_connections_give_way_when_the_daemon_is_full(daemon):
    held = [admitted(daemon) for _ in range(3)]  # --max-connections 3
    time.sleep(1.5)  # --idle-evict 1
    newcomer = admitted(daemon)
    assert newcomer.call("status")["uptime_s"] > 0
    notices = []
    for conn in held:
        conn.sock.settimeout(0.5)
        try:
            msg = conn.read()
        except TimeoutError:
            continue
        notices.append(msg)
    assert any(m and m[2]["name"] == "OVERLOADED" and "idle for" in m[2]["message"] for m in notices), notices


def test_tcp_clients_without_the_token_are_timed_out_and_cannot_take_every_place(model_dir, tmp_path):
    d = Daemon(model_dir, tmp_path, "--no-watch", "--max-connections", "4", "--auth-timeout", "3",
               tcp=f"127.0.0.1:{free_port()}")
    try:
        host, port = d.tcp.rsplit(":", 1)
        def silent_client():
            s = socket.create_connection((host, int(port)), timeout=10)
            time.sleep(0.1)  # accepted, in this order
            return s

        a, b, c = silent_client(), silent_client(), silent_client()  # 3 > half of 4 places
        msg = msgpack.unpackb(a.recv(65536), raw=False)  # past half, the oldest silent one gives way
        assert msg[2]["name"] == "OVERLOADED" and "connections wait for `auth`, the limit of 2" in msg[2]["message"]
        assert d.connect().call("status")["uptime_s"] > 0  # a client with the token still gets in
        assert msgpack.unpackb(b.recv(65536), raw=False)[2]["name"] == "OVERLOADED"  # (b gave way to it)
        t0 = time.monotonic()
        msg = msgpack.unpackb(c.recv(65536), raw=False)  # the last silent one: closed after --auth-timeout
        assert msg[2]["name"] == "TIMEOUT" and "no `auth` within 3 s" in msg[2]["message"], msg
        assert c.recv(65536) == b"" and time.monotonic() - t0 < 10
    finally:
        d.stop()


# --- checkpoints ----------------------------------------------------------------------------


def poison(src, dst, value=float("nan")):
    """A copy of checkpoint src with one weight holding `value`."""
    write_tiny_checkpoint(dst)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return name


def test_non_finite_weights_are_refused_naming_the_tensor(model_dir, tmp_path):
    name = poison(model_dir, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 NaN or infinite value"):
        load_checkpoint(tmp_path / "nan", device="cpu")
    source = tmp_path / "f.py"
    source.write_text("def f(x):\n    return \n")
    proc = subprocess.run([sys.executable, "-m", "diffucode", "infill", str(source), "--line", "2", "--column", "12",
                           "--model", str(tmp_path / "nan")], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and name in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("field, words", [
    ("max_position_embeddings", "max_position_embeddings must be a positive integer, found 0"),
    ("num_hidden_layers", "num_hidden_layers is 0, but the weights hold layers 0..1"),
])
def test_zero_sizes_in_config_are_reported_against_config_json(model_dir, tmp_path, field, words):
    bad = write_tiny_checkpoint(tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = 0
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad, device="cpu")
    assert "config.json" in str(e.value) and words in str(e.value), str(e.value)


def test_checkpoint_changed_in_place_while_serving(tmp_path):
    """Truncated, overwritten byte for byte (`cp new old` keeps the inode), poisoned with NaN,
    deleted: the daemon stays up, its answers do not change, and status says the reload failed."""
    model = write_tiny_checkpoint(tmp_path / "model", seed=3)  # fp32 on disk: once served straight from a map
    d = Daemon(model, tmp_path)
    weights = model / "model.safetensors"
    try:
        conn = d.connect()
        first = conn.reply(infill(conn))[1]["text"]
        name = poison(model, tmp_path / "nan")
        with open(weights, "r+b") as f:  # truncation in place
            blob = f.read()
            f.truncate(len(blob) // 2)
        failure = wait_reload(conn, "failed")
        assert "model.safetensors" in failure["error"] and "truncated" in failure["error"], failure
        assert conn.reply(infill(conn))[1]["text"] == first
        with open(weights, "r+b") as f:  # overwritten in place, as cp does
            f.write((tmp_path / "nan" / "model.safetensors").read_bytes())
            f.truncate()
        failure = next_failure(conn, failure)
        assert f"tensor '{name}' holds 1 NaN" in failure["error"], failure
        assert conn.reply(infill(conn))[1]["text"] == first
        os.unlink(weights)
        time.sleep(1)
        assert conn.reply(infill(conn))[1]["text"] == first
        assert d.proc.poll() is None
    finally:
        d.stop()


def next_failure(conn, last: dict, timeout: float = 30) -> dict:
    """The reload failure after `last` (status's reload record)."""
    deadline = time.monotonic() + timeout
    while True:
        reload = conn.call("status")["reload"]
        if reload["state"] == "failed" and reload["at"] != last["at"]:
            return reload
        assert time.monotonic() < deadline, reload
        time.sleep(0.1)


# --- the language server's logs -------------------------------------------------------------


def test_language_server_keeps_completion_text_out_of_default_logs(model_dir, tmp_path):
    from test_lsp import Editor, run, settings_for

    d = Daemon(model_dir, tmp_path, "--no-watch")
    log_file = tmp_path / "lsp.log"

    async def complete(level: str) -> list[str]:
        ed = Editor(settings_for(d))
        ed.args = ["--log-level", level, "--log-file", str(log_file)]
        await ed.start()
        try:
            await ed.wait_state("ready")
            return [i.insert_text for i in (await ed.inline(5, 4)).items]
        finally:
            await ed.stop()

    try:
        texts = run(complete("info"))
        logged = log_file.read_text()
        assert texts and logged and not any(t.strip() in logged for t in texts if len(t.strip()) > 3)
        assert "Sending data" not in logged
        log_file.unlink()
        texts = run(complete("trace"))
        assert "Sending data" in log_file.read_text()
    finally:
        d.stop()


# --- respawn --------------------------------------------------------------------------------


def test_loading_a_checkpoint_imports_no_compiler(model_dir):
    """A respawned daemon serves within seconds: loading must not pull in torch._dynamo (random
    init on the meta device did, several seconds on a small CPU)."""
    code = ("import sys; from diffucode.daemon.serve.reload import ModelState; "
            f"ModelState({str(model_dir)!r}); print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:300]


def test_a_standby_takes_over_after_kill_9_but_not_after_a_shutdown(model_dir, tmp_path):
    d = Daemon(model_dir, tmp_path, "--no-watch", "--standby")
    try:
        first = d.connect().call("status")["limits"]["pid"]
        deadline = time.monotonic() + 60
        while "Python and torch loaded; waiting" not in d.log_text():
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.1)
        os.kill(first, signal.SIGKILL)
        d.proc.wait(10)
        while True:  # the standby's socket
            try:
                second = d.connect(timeout=5).call("status")["limits"]["pid"]
                break
            except OSError:
                assert time.monotonic() < deadline, d.log_text()
                time.sleep(0.05)
        assert second != first and "this standby takes over" in d.log_text()
        # an orderly shutdown stops the standby first: nothing takes over, nothing is left
        while d.log_text().count("Python and torch loaded; waiting") < 2:
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.1)
        os.kill(second, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(p.is_dir() and b"--as-standby" in (p / "cmdline").read_bytes()
                  for p in map(lambda s: Path("/proc") / s, os.listdir("/proc")) if p.name.isdigit()
                  and _ours(p, d.proc.pid)):
            assert time.monotonic() < deadline, "the standby outlived a shutdown"
            time.sleep(0.1)
        with pytest.raises(OSError):
            d.connect(timeout=2)
    finally:
        d.stop()
        try:  # the first daemon's process group: whatever took over from it
            os.killpg(d.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ours(proc_dir, pgid: int) -> bool:
    try:
        return os.getpgid(int(proc_dir.name)) == pgid
    except (ProcessLookupError, PermissionError):
        return False
