"""The scheduler: a queue of task requests, one model thread, cancellation between steps.

The asyncio side (the server) submits jobs and awaits their futures; one worker thread runs
them on the model, so the event loop never blocks on a forward pass. Pending jobs that can
share forward passes (batching.py: same kind, canvas and settings, deterministic decoding) run
as one batch. Every job carries a cancel flag that the sampler's per-step callback checks, so a
cancelled job stops within one denoising step and frees its tensors (in a batch it leaves the
batch; the others go on). A job may name a group (an editor document): a newer job of the same
group cancels the older. A deadline makes the sampler fill every remaining mask in one last
step. Knows tasks and jobs; not sockets, not msgpack."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.options import MAX_ALTERNATIVES, Options
from ..errors import Cancelled, DiffucodeError, TooLarge
from ..rpc.protocol import ErrorCode, RPCError, Sampling, TaskResult

log = logging.getLogger("diffucode.scheduler")


def options_of(sampling: Sampling) -> Options:
    """The wire's sampling fields as the engine's Options: a field not sent takes the engine's default."""
    return Options(**{k: v for k, v in vars(sampling).items() if v is not None})


@dataclass(eq=False)
class Job:
    method: str  # complete | infill | refine
    params: Any  # the protocol's params dataclass
    opts: Options  # its sampling, as the engine takes it
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_progress: Callable[[dict], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    created: float = field(default_factory=time.monotonic)
    steps_run: int = 0

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()


class Scheduler:
    def __init__(self, get_tasks: Callable[[], Any], max_queue: int = 16, max_batch: int = 8,
                 model_lock: threading.Lock | None = None):
        self.get_tasks = get_tasks  # the current Tasks (hot reload swaps it between jobs)
        # held while jobs run: what changes the network in place (an adapter reload) takes it too
        self.model_lock = model_lock if model_lock is not None else contextlib.nullcontext()
        self.max_queue = max_queue
        self.max_batch = max_batch  # jobs that may share forward passes (batching.py)
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.groups: dict[str, Job] = {}
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "batched": 0}
        self.last_cancelled_steps: int | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="diffucode-model", daemon=True)
        self._thread.start()

    # --- asyncio side -----------------------------------------------------------------------

    def submit(self, method: str, params, on_progress=None) -> Job:
        """Queue a job; raises RPCError(OVERLOADED) when the queue is full, and INVALID_PARAMS or
        TOO_LARGE for options or text out of bounds (checked here, before the job takes a place)."""
        if self._stop:
            raise RPCError(ErrorCode.CANCELLED, "the daemon is shutting down")
        opts = options_of(params.sampling)
        self._check(params, opts)
        loop = asyncio.get_running_loop()
        job = Job(method, params, opts, loop, loop.create_future(), on_progress)
        with self._wake:
            group = params.group
            if group is not None and group in self.groups:
                self.groups[group].cancel(f"superseded by a newer request of group {group!r}")
            live = [j for j in self.pending if not j.cancelled.is_set()]
            if len(live) >= self.max_queue:
                raise RPCError(ErrorCode.OVERLOADED, f"queue of {len(live)} requests is at its limit of "
                                                     f"{self.max_queue}; try again later",
                               {"pending": len(live), "limit": self.max_queue})
            if group is not None:
                self.groups[group] = job
            self.pending.append(job)
            self._wake.notify()
        return job

    def _check(self, params, opts: Options) -> None:
        try:
            tasks = self.get_tasks()
        except Exception:  # no model right now: the job reports it when it runs
            return
        if not hasattr(tasks, "check"):
            return
        if params.deadline_ms is not None and params.deadline_ms < 0:
            raise RPCError(ErrorCode.INVALID_PARAMS, f"deadline_ms must be >= 0, got {params.deadline_ms}")
        texts = {k: getattr(params, k) for k in ("before", "after", "span") if hasattr(params, k)}
        n = getattr(params, "alternatives", None)
        if n is not None and not 1 <= n <= MAX_ALTERNATIVES:
            raise RPCError(ErrorCode.INVALID_PARAMS, f"alternatives must be in [1, {MAX_ALTERNATIVES}], got {n}")
        if n and n > 1 and params.lengths:
            raise RPCError(ErrorCode.INVALID_PARAMS, "alternatives and lengths do not combine: send one")
        try:
            tasks.check(opts, getattr(params, "lengths", None), **texts)
        except TooLarge as e:
            raise RPCError(ErrorCode.TOO_LARGE, str(e)) from None
        except DiffucodeError as e:
            raise RPCError(ErrorCode.INVALID_PARAMS, str(e)) from None

    def queue_state(self) -> dict:
        with self._wake:
            pending = sum(1 for j in self.pending if not j.cancelled.is_set())
        return {"pending": pending, "running": len(self.running), "limit": self.max_queue}

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            for job in self.pending:
                job.cancel("the daemon is shutting down")
            for job in self.running:
                job.cancel("the daemon is shutting down")
            self._wake.notify()

    def wait_idle(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- model thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self.pending and not self._stop:
                    self._wake.wait()
                if self._stop and not self.pending:
                    return
                job = self.pending.popleft()
                jobs = [job] + self._companions(job)
                self.running = jobs
            try:
                with self.model_lock:
                    self._run(jobs)
            finally:
                with self._wake:
                    self.running = []
                    for job in jobs:
                        if job.params.group is not None and self.groups.get(job.params.group) is job:
                            del self.groups[job.params.group]

    def _companions(self, job: Job) -> list[Job]:
        """Pending jobs that can share `job`'s forward passes (batching.batch_key); taken off the queue."""
        if self.max_batch < 2 or not self.pending or job.cancelled.is_set():
            return []
        from ..engine.batching import batch_key  # here: the module imports torch

        def key(j: Job):
            p = j.params
            if (getattr(p, "alternatives", None) or 1) > 1:  # a batch of its own already
                return None
            shared = batch_key(tasks, j.method, j.opts, getattr(p, "lengths", None), (p.before_tokens, p.after_tokens))
            # the earliest deadline finishes a whole batch: requests with one batch only together
            return None if shared is None else (*shared, p.deadline_ms is not None)

        try:
            tasks = self.get_tasks()
            mine = key(job)
            if mine is None:
                return []
            mates = [j for j in self.pending if not j.cancelled.is_set() and key(j) == mine][:self.max_batch - 1]
        except DiffucodeError:  # e.g. an unknown decoding: the job runs alone and reports it
            return []
        for j in mates:
            self.pending.remove(j)
        return mates

    def _finish(self, job: Job, result=None, error: RPCError | None = None) -> None:
        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        job.loop.call_soon_threadsafe(settle)

    def _run(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self._cancelled(job)
            else:
                live.append(job)
        if not live:
            return
        watches = [_Watch(job) for job in live]
        try:
            tasks = self.get_tasks()
        except Exception as e:
            for job, watch in zip(live, watches):
                self._settle(job, e, watch, started)
            return
        if len(live) == 1:
            try:
                outcome = self._call(tasks, live[0], watches[0].on_step)
            except Exception as e:
                outcome = e
            self._settle(live[0], outcome, watches[0], started)
            return
        from ..engine.batching import BatchItem, run_batch

        self.counters["batched"] += len(live)
        items = [BatchItem(job.method, job.params.before, getattr(job.params, "after", ""), job.opts,
                           (job.params.before_tokens, job.params.after_tokens), watch.on_step,
                           getattr(job.params, "lengths", None)) for job, watch in zip(live, watches)]
        run_batch(tasks, items, lambda i, outcome: self._settle(live[i], outcome, watches[i], started))

    @staticmethod
    def _call(tasks, job: Job, on_step):
        p, opts = job.params, job.opts
        budget = (p.before_tokens, p.after_tokens)
        if job.method == "complete":
            return tasks.complete(p.before, opts, callback=on_step, budget=budget, group=p.group)
        if job.method == "infill" and (p.alternatives or 1) > 1:
            from ..engine.ranking import alternatives  # here: it imports torch

            ranked = alternatives(tasks, p.before, p.after, opts, p.alternatives, budget=budget, callback=on_step)
            best = ranked[0].answer
            best.alternatives = [a.summary() for a in ranked]
            return best
        if job.method == "infill":
            return tasks.infill(p.before, p.after, opts, lengths=p.lengths, callback=on_step, budget=budget,
                                group=p.group)
        return tasks.refine(p.before, p.span, p.after, opts, fraction=p.fraction, callback=on_step,
                            budget=budget, group=p.group)

    def _settle(self, job: Job, outcome, watch: "_Watch", started: float) -> None:
        """Answer a job with its Answer, or the error its exception means."""
        if isinstance(outcome, Cancelled):
            outcome.__traceback__ = None  # its frames hold the request's tensors: free them now
            self._cancelled(job)
            release_memory()
            return
        if isinstance(outcome, BaseException):
            self.counters["failed"] += 1
            if isinstance(outcome, TooLarge):
                error = RPCError(ErrorCode.TOO_LARGE, str(outcome))
            elif isinstance(outcome, DiffucodeError):
                error = RPCError(ErrorCode.INVALID_PARAMS, str(outcome))
            else:  # a failure inside the model must not kill the worker
                log.error("%s failed", job.method, exc_info=outcome)
                error = RPCError(ErrorCode.MODEL_ERROR, f"{type(outcome).__name__}: {outcome}")
            outcome.__traceback__ = None
            self._finish(job, error=error)
            return
        ans = outcome
        self.counters["completed"] += 1
        self._finish(job, TaskResult(
            text=ans.text, tokens=ans.tokens, confidence=ans.confidence, steps=ans.steps_run,
            finished_early=watch.finished_early, elapsed_ms=(time.monotonic() - started) * 1000,
            queued_ms=(started - job.created) * 1000, candidates=[vars(c) for c in ans.candidates],
            order=ans.order, ar_ness=ans.ar_ness, alternatives=ans.alternatives, refined=ans.refined,
            context=vars(ans.context) if ans.context is not None else {}))

    def _cancelled(self, job: Job) -> None:
        self.counters["cancelled"] += 1
        self.last_cancelled_steps = job.steps_run
        log.info("%s cancelled after %d steps: %s", job.method, job.steps_run, job.cancel_reason)
        self._finish(job, error=RPCError(ErrorCode.CANCELLED, f"cancelled after {job.steps_run} steps: "
                                                              f"{job.cancel_reason}",
                                         {"steps_run": job.steps_run}))


def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise, so a cancelled large
    request would leave the daemon's RSS high until a later request reuses them)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where there is no such function (musl, macOS)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class _Watch:
    """A job's per-step callback: stop when cancelled, send progress, finish at the deadline."""

    def __init__(self, job: Job):
        from ..engine.sampler import FINISH  # here, not at the top: `diffucode status` must not import torch

        self.job, self.finish, self.finished_early = job, FINISH, False
        p = job.params
        self.deadline = None if p.deadline_ms is None else job.created + p.deadline_ms / 1000

    def on_step(self, step):
        job = self.job
        job.steps_run += 1
        if job.cancelled.is_set():
            raise Cancelled(job.cancel_reason)
        if job.on_progress is not None:
            job.loop.call_soon_threadsafe(job.on_progress, {
                "step": step.index, "steps": step.steps, "masks_left": step.masks_left, "text": step.text})
        if self.deadline is not None and time.monotonic() >= self.deadline and step.masks_left:
            self.finished_early = True
            return self.finish
        return None
