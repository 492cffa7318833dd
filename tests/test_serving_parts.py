"""The daemon's serving parts, in-process: the wire codec (protocol.py), the wire's sampling fields as
engine Options, `Connection.handle` (server.py), and the scheduler's groups, queue limit, refusals,
batching and stop. test_daemon.py and test_hardening.py drive a real daemon over a socket; these
call the same code directly, so each rule is pinned where it lives and a failure names one function,
in milliseconds (the scheduler's tests run the tiny real model on 2-token canvases).

To hold a job "running" without timing guesses, the scheduler's `get_tasks` is a `Gate` where the
model thread's first call waits until the test opens it (a progress callback cannot hold the model
thread: it runs on the event loop, which it would block).
"""

import asyncio
import dataclasses
import threading
from types import SimpleNamespace

import msgpack
import pytest

from diffucode.daemon.engine.options import Options
from diffucode.daemon.rpc.address import Address
from diffucode.daemon.rpc.protocol import (METHODS, CancelParams, CompleteParams, ErrorCode, InfillParams,
                                           RefineParams, RPCError, Sampling, TaskResult, from_wire, short, to_wire)
from diffucode.daemon.serve.scheduler import Scheduler, options_of
from diffucode.daemon.serve.server import Connection, DaemonServer, ServerLimits

TINY = Sampling(max_new_tokens=2)  # every job that reaches the model: two greedy steps
TOKEN = "t" * 64
SAMPLING_FIELDS = [f.name for f in dataclasses.fields(Sampling)]


# --- the wire codec -----------------------------------------------------------------------------


def test_nested_params_decode_converting_ints_and_taking_nil_as_not_sent():
    p = from_wire(InfillParams, {"before": "a", "after": "b", "lengths": [4, 8], "group": "g", "deadline_ms": None,
                                 "sampling": {"max_new_tokens": 8, "temperature": 1, "eps": 0, "seed": None}})
    assert p == InfillParams(before="a", after="b", lengths=[4, 8], group="g",
                             sampling=Sampling(max_new_tokens=8, temperature=1.0, eps=0.0))
    assert type(p.sampling) is Sampling and type(p.sampling.temperature) is float and type(p.sampling.eps) is float
    assert from_wire(InfillParams, None) == InfillParams() == from_wire(InfillParams, {"sampling": None})
    assert from_wire(Sampling, dict.fromkeys(SAMPLING_FIELDS)) == Sampling()
    with pytest.raises(RPCError, match=r"params\.before must be str, got None"):  # not optional: nil refused
        from_wire(InfillParams, {"before": None})


@pytest.mark.parametrize("cls, params, words", [
    (Sampling, {"steps": True}, "params.steps must be int, got True"),
    (Sampling, {"temperature": True}, "params.temperature must be float, got True"),
    (Sampling, {"prefix_cache": 1}, "params.prefix_cache must be bool, got 1"),
    (CompleteParams, {"progress": 1}, "params.progress must be bool, got 1"),
    (InfillParams, {"lengths": [4, "8"]}, "params.lengths[1] must be int, got '8'"),
    (InfillParams, {"lengths": [4, 5, False]}, "params.lengths[2] must be int, got False"),
    (InfillParams, {"lengths": 4}, "params.lengths must be a list, got 4"),
    (InfillParams, {"sampling": {"top_k": "50"}}, "params.sampling.top_k must be int, got '50'"),
    (InfillParams, {"sampling": [1]}, "params.sampling must be a map, got list"),
    (RefineParams, {"fraction": "0.5"}, "params.fraction must be float, got '0.5'"),
    (CancelParams, "7", "params must be a map, got str"),
    (CancelParams, [7], "params must be a map, got list"),
    (CancelParams, {"id": 1, "ids": [1]}, "params: unknown field 'ids' (known: id)"),
    (InfillParams, {"sampling": {"temp": 1}},
     f"params.sampling: unknown field 'temp' (known: {', '.join(sorted(SAMPLING_FIELDS))})"),
])
def test_bad_params_are_refused_naming_the_field(cls, params, words):
    with pytest.raises(RPCError) as e:
        from_wire(cls, params)
    assert e.value.code == ErrorCode.INVALID_PARAMS and e.value.message == words


@pytest.mark.parametrize("params", [
    InfillParams(before="a", after="b", lengths=[3, 5], group="g", deadline_ms=100, progress=True, before_tokens=10,
                 after_tokens=0, sampling=Sampling(max_new_tokens=8, temperature=0.5, top_k=0, decoding="fast")),
    RefineParams(before="a", span="b", after="c", fraction=0.5, sampling=Sampling(seed=7, prefix_cache=False)),
    CompleteParams(before="x = "),
])
def test_params_round_trip_through_msgpack(params):
    wire = msgpack.unpackb(msgpack.packb(to_wire(params), use_bin_type=True), raw=False)
    assert from_wire(type(params), wire) == params


def test_short_bounds_huge_and_deeply_nested_values():
    deep = []
    for _ in range(10_000):  # a plain repr of this raises RecursionError
        deep = [deep]
    assert all(len(short(v)) < 80 for v in ("x" * 1_000_000, deep, {str(i): i for i in range(1000)}, [0] * 10**5))
    with pytest.raises(RPCError) as e:
        from_wire(CompleteParams, {"before": deep})
    assert e.value.message.startswith("params.before must be str, got [[") and len(e.value.message) < 100


@pytest.mark.parametrize("err", [None, "boom", [1, "x"], {}, {"code": 99, "message": "m"}, {"code": "x"},
                                 {"code": [1]}])
def test_a_malformed_error_reply_reads_as_internal(err):
    e = RPCError.from_wire(err)
    assert e.code == ErrorCode.INTERNAL and e.data == {} and (isinstance(err, dict) or repr(err) in e.message)


def test_an_error_keeps_code_message_and_data_across_the_wire():
    e = RPCError(ErrorCode.OVERLOADED, "queue full", {"pending": 2, "limit": 2})
    assert (wire := e.to_wire()) == {"code": 4, "name": "OVERLOADED", "message": "queue full", "data": e.data}
    back = RPCError.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False))
    assert (back.code, back.message, back.data) == (e.code, e.message, e.data) and str(back) == "OVERLOADED: queue full"


# --- wire sampling -> engine Options ------------------------------------------------------------


def test_sampling_takes_the_engine_defaults_for_each_field_not_sent_or_nil():
    assert all(f.default is None for f in dataclasses.fields(Sampling))  # "not sent" can only mean the default
    assert set(SAMPLING_FIELDS) <= {f.name for f in dataclasses.fields(Options)}
    assert options_of(Sampling()) == Options()
    opts = options_of(from_wire(Sampling, {"top_k": None, "alg_temp": None, "temperature": 1}))
    assert opts == dataclasses.replace(Options(), temperature=1.0) and opts.top_k != 0  # nil: the default, not off
    for field, value in [("max_new_tokens", 7), ("steps", 3), ("top_k", 0), ("temperature", 0.5),
                         ("decoding", "fast"), ("prefix_cache", True), ("alg", "origin")]:  # a field sent: only it
        assert options_of(Sampling(**{field: value})) == dataclasses.replace(Options(), **{field: value}), field


# --- Connection.handle --------------------------------------------------------------------------


class Gate:
    """The scheduler's `get_tasks`: the model thread's first call waits until `opened` (the loop's calls pass)."""

    def __init__(self, tasks):
        self.tasks, self.entered, self.opened = tasks, threading.Event(), threading.Event()

    def __call__(self):
        if threading.current_thread().name == "diffucode-model" and not self.opened.is_set():
            self.entered.set()
            assert self.opened.wait(30), "the test never opened the gate"
        return self.tasks


class Writer:
    """The socket's stand-in: keeps what the Connection writes (the Connection's logic is the real one)."""

    def __init__(self):
        self.data = bytearray()
        self.write = self.data.extend

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        pass

    def frames(self) -> list:  # the messages written since the last call
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(bytes(self.data))
        self.data.clear()
        return list(unpacker)


async def outcomes(gate, jobs, cancel=()) -> list:
    """Cancel `cancel` (no need to run them), open the gate; each job's TaskResult or RPCError."""
    for job in cancel:
        job.cancel("by the test")
    gate.opened.set()
    await asyncio.wait([job.future for job in jobs], timeout=30)
    return [job.future.exception() or job.future.result() for job in jobs]


def served(tasks, body, needs_auth=False):
    """Run `body(conn, gate)` on a Connection of a real DaemonServer that is never started (nothing bound)."""
    async def main():
        gate = Gate(tasks)
        # what status() reads of a ModelState (serve/reload.py: it loads a checkpoint by path and watches it)
        model = SimpleNamespace(tasks=tasks, source="tiny", device="cpu", dtype="float32", quantization="none",
                                memory=lambda: {"weights": 1}, reload_state={"state": "idle", "error": None})
        server = DaemonServer(model, Address(host="127.0.0.1", port=1), ServerLimits(max_queue=4))
        server.scheduler.get_tasks = gate  # what its lambda returns, through the gate
        server._token = TOKEN  # what start() would write to the token file (it would also bind a port)
        try:
            return await body(Connection(server, None, Writer(), needs_auth), gate)
        finally:
            gate.opened.set()
            server.scheduler.stop()
            assert await asyncio.to_thread(server.scheduler.wait_idle, 30)
    return asyncio.run(main())


def answers(tasks, *messages, needs_auth=False):
    """handle() of each message on one connection: [(its return value, the frames it wrote)]."""
    async def body(conn, gate):
        return [(await conn.handle(m), conn.writer.frames()) for m in messages]
    return served(tasks, body, needs_auth)


def error_reply(frames, msgid=None) -> dict:
    assert len(frames) == 1 and frames[0][0] == 1 and frames[0][1] == msgid and frames[0][3] is None, frames
    return frames[0][2]


@pytest.mark.parametrize("message, msgid", [
    ("hello", None), ({"a": 1}, None), ([], None), ([9], None), ([1, 1, None, None], None),  # not a request
    ([0, 1, "status"], None), ([0, 1, "status", {}, 5], None), ([2, "cancel"], None),  # wrong length
    ([0, "1", "status", {}], None), ([0, 1.0, "status", {}], None), ([0, None, "status", {}], None),
    ([0, 1, 7, {}], 1), ([0, 2, None, {}], 2),  # an integer id is answered even with a bad method
])
def test_bad_frames_get_invalid_frame_and_keep_the_connection(tasks, message, msgid):
    [(keep, frames)] = answers(tasks, message)
    assert keep is True and error_reply(frames, msgid)["name"] == "INVALID_FRAME"


def test_an_unknown_method_is_named_with_the_known_ones(tasks):
    (keep, frames), (keep2, frames2) = answers(tasks, [0, 4, "translate", {}], [0, 5, "cancel", {"id": 4}])
    err = error_reply(frames, 4)
    assert keep is True and err["name"] == "METHOD_NOT_FOUND"
    assert err["message"] == f"unknown method 'translate' (known: {', '.join(METHODS)})"
    assert keep2 is True and error_reply(frames2, 5)["name"] == "METHOD_NOT_FOUND"  # cancel is a notification


@pytest.mark.parametrize("first", [[0, 1, "status", {}], [0, 1, "auth", {"token": "0" * 64}], [0, 1, "auth", TOKEN],
                                   [0, 1, "auth", {}], [0, 1, "infill", {"before": "x"}]])
def test_tcp_before_auth_a_request_is_unauthorized_and_closes(tasks, first):
    [(keep, frames)] = answers(tasks, first, needs_auth=True)
    assert keep is False and error_reply(frames, 1)["name"] == "UNAUTHORIZED"


@pytest.mark.parametrize("first", ["hello", [1, 2, 3, 4], [0, 1, "status"], [0, "1", "status", {}]])
def test_tcp_before_auth_any_other_first_message_closes(tasks, first):
    [(keep, frames)] = answers(tasks, first, needs_auth=True)
    assert keep is False and len(frames) == 1


def test_tcp_auth_with_the_token_lets_requests_through(tasks):
    (keep, frames), (keep2, frames2) = answers(tasks, [0, 1, "auth", {"token": TOKEN}], [0, 2, "status", {}],
                                               needs_auth=True)
    assert keep is True and frames == [[1, 1, None, {"ok": True}]]
    [[kind, msgid, err, status]] = frames2
    assert keep2 is True and (kind, msgid, err) == (1, 2, None) and status["model"] == "tiny"
    assert status["protocol"] == 1 and status["queue"] == {"pending": 0, "running": 0, "limit": 4}
    assert status["limits"]["max_canvas_tokens"] == tasks.limits.max_canvas_tokens
    # a notification first has no id to answer: the connection closes at once
    assert answers(tasks, [2, "cancel", {"id": 1}], needs_auth=True) == [(False, [])]


def test_task_requests_cancel_and_progress_through_handle(tasks):
    infill = {"before": "x = ", "sampling": {"max_new_tokens": 2}}
    async def body(conn, gate):
        assert await conn.handle([0, 1, "infill", {**infill, "progress": True}]) is True
        assert await asyncio.to_thread(gate.entered.wait, 10)  # request 1 runs, held at the gate
        for message in ([0, 2, "infill", infill], [2, "cancel", {"id": "x"}], [2, "cancel", "nope"],
                        [2, "cancel", {"id": 99}], [2, "cancel", {"id": 1, "why": 0}]):
            assert await conn.handle(message) is True
        assert conn.writer.frames() == [] and set(conn.jobs) == {1, 2}
        assert not any(job.cancelled.is_set() for job in conn.jobs.values())  # bad cancels changed nothing
        assert await conn.handle([0, 2, "infill", infill]) is True
        assert error_reply(conn.writer.frames(), 2)["message"] == "request id 2 is already in flight"
        assert await conn.handle([0, 3, "infill", {"before": 1}]) is True
        assert error_reply(conn.writer.frames(), 3)["message"] == "params.before must be str, got 1"
        assert await conn.handle([2, "cancel", {"id": 2}]) is True
        await outcomes(gate, list(conn.jobs.values()))
        await asyncio.sleep(0)  # the replies (done callbacks) are written
        return conn.writer.frames(), conn.jobs

    frames, left = served(tasks, body)
    progress = [f[2] for f in frames if f[0] == 2]
    assert [p["step"] for p in progress] == [0, 1] and all(p["id"] == 1 and p["steps"] == 2 for p in progress)
    replies = {f[1]: f for f in frames if f[0] == 1}
    assert max(i for i, f in enumerate(frames) if f[0] == 2) < frames.index(replies[1])  # progress first
    assert replies[1][2] is None and replies[1][3]["steps"] == 2
    assert replies[2][2]["name"] == "CANCELLED" and "cancelled by the client (request 2)" in replies[2][2]["message"]
    assert left == {}


# --- the scheduler ------------------------------------------------------------------------------


def scheduled(tasks, body, **kw):
    """Run `body(sched, gate)` on a fresh Scheduler; afterwards stop it and wait for its thread."""
    async def main():
        gate = Gate(tasks)
        sched = Scheduler(gate, **kw)
        try:
            return await body(sched, gate)
        finally:
            gate.opened.set()
            sched.stop()
            assert await asyncio.to_thread(sched.wait_idle, 30)
    return asyncio.run(main())


def submit(sched, before="a = ", **kw):
    return sched.submit("infill", InfillParams(before=before, **{"sampling": TINY, **kw}))


async def hold(sched, gate):
    """A job the model thread has taken and holds at the gate: the queue behind it stays put."""
    blocker = submit(sched, "x = ")
    assert await asyncio.to_thread(gate.entered.wait, 10)
    return blocker


def test_a_newer_job_of_a_group_cancels_the_older_pending_one(tasks):
    async def body(sched, gate):
        blocker = await hold(sched, gate)
        old, other, new = (submit(sched, group=f"file:///{g}.py") for g in "aba")
        assert [j.cancelled.is_set() for j in (old, other, new)] == [True, False, False]
        assert sched.queue_state() == {"pending": 2, "running": 1, "limit": 16}
        return await outcomes(gate, [blocker, old, other, new]), sched

    (first, old, other, new), sched = scheduled(tasks, body)
    assert isinstance(old, RPCError) and old.code == ErrorCode.CANCELLED and old.data == {"steps_run": 0}
    assert "superseded by a newer request of group 'file:///a.py'" in old.message
    assert all(isinstance(r, TaskResult) and r.steps == 2 for r in (first, other, new))
    assert sched.groups == {}  # finished jobs leave no group behind


def test_queue_limit_and_a_cancelled_job_frees_its_place(tasks):
    async def body(sched, gate):
        blocker = await hold(sched, gate)
        a, b = submit(sched), submit(sched)
        assert sched.queue_state() == {"pending": 2, "running": 1, "limit": 2}
        with pytest.raises(RPCError) as e:
            submit(sched)
        assert e.value.code == ErrorCode.OVERLOADED and e.value.data == {"pending": 2, "limit": 2}
        assert "at its limit of 2" in e.value.message and sched.queue_state()["pending"] == 2
        a.cancel("by the test")
        assert sched.queue_state()["pending"] == 1
        c = submit(sched)
        assert sched.queue_state()["pending"] == 2
        return await outcomes(gate, [blocker, a, b, c], cancel=(blocker, b, c)), sched.counters["cancelled"]

    results, cancelled = scheduled(tasks, body, max_queue=2)
    assert [r.code for r in results] == [ErrorCode.CANCELLED] * 4 and cancelled == 4
    assert results[0].data["steps_run"] == 1  # the running one stopped at its first step


@pytest.mark.parametrize("kw, code, words", [
    ({"sampling": Sampling(max_new_tokens=5000)}, ErrorCode.TOO_LARGE, "a canvas of 5000 tokens exceeds the limit"),
    ({"lengths": [2] * 9}, ErrorCode.TOO_LARGE, "lengths has 9 canvas sizes, over the limit of 8"),
    ({"deadline_ms": -1}, ErrorCode.INVALID_PARAMS, "deadline_ms must be >= 0, got -1"),
    ({"sampling": Sampling(max_new_tokens=2, steps=3)}, ErrorCode.INVALID_PARAMS, "steps must be in [1, max_new"),
])
def test_out_of_range_requests_are_refused_before_taking_a_place(tasks, kw, code, words):
    async def body(sched, gate):
        blocker = await hold(sched, gate)
        mate = submit(sched, group="g")  # the queue is full
        with pytest.raises(RPCError) as e:
            submit(sched, group="g", **kw)
        # refused for itself (not OVERLOADED), and it neither queued nor superseded its group's job
        assert e.value.code == code and words in e.value.message, e.value
        assert sched.queue_state()["pending"] == 1 and sched.groups["g"] is mate and not mate.cancelled.is_set()
        await outcomes(gate, [blocker, mate], cancel=(blocker, mate))

    scheduled(tasks, body, max_queue=1)


@pytest.mark.parametrize("bad", [{"alg": "nope"}, {"decoding": "quick"}, {"eps": 2.0}, {"top_p": 0.0}])
def test_unknown_or_out_of_range_sampler_options_are_refused_at_submit(tasks, bad):
    async def body(sched, gate):
        try:
            job = submit(sched, sampling=Sampling(max_new_tokens=2, **bad))
        except RPCError as e:
            return e.code
        await outcomes(gate, [job], cancel=[job])

    assert scheduled(tasks, body) == ErrorCode.INVALID_PARAMS


def test_stop_cancels_the_pending_and_the_running_jobs(tasks):
    async def body(sched, gate):
        jobs = [await hold(sched, gate), submit(sched), submit(sched)]
        sched.stop()
        assert all(j.cancelled.is_set() for j in jobs)
        return await outcomes(gate, jobs), await asyncio.to_thread(sched.wait_idle, 30)

    results, idle = scheduled(tasks, body)
    assert idle and all(r.code == ErrorCode.CANCELLED and "the daemon is shutting down" in r.message for r in results)


def test_a_job_submitted_after_stop_is_answered(tasks):
    async def body(sched, gate):
        sched.stop()
        assert await asyncio.to_thread(sched.wait_idle, 30)
        try:
            return bool((await asyncio.wait([submit(sched).future], timeout=0.5))[0])
        except RPCError:
            return True  # refused: answered too

    assert scheduled(tasks, body)


def test_jobs_with_and_without_a_deadline_do_not_share_a_batch(tasks):
    async def body(sched, gate):
        jobs = [await hold(sched, gate), submit(sched, deadline_ms=60_000), submit(sched, "b"), submit(sched, "c")]
        return await outcomes(gate, jobs), sched.counters["batched"]

    results, batched = scheduled(tasks, body)
    assert all(isinstance(r, TaskResult) and not r.finished_early for r in results)
    assert batched == 2  # the two without a deadline together; the timed one alone
