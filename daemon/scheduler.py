"""The scheduler: a queue of task requests, one model thread, cancellation between steps.

The asyncio side (the server) submits jobs and awaits their futures; one worker thread runs
them on the model, one at a time, so the event loop never blocks on a forward pass. Every job
carries a cancel flag that the sampler's per-step callback checks, so a cancelled job stops
within one denoising step and frees its tensors. A job may name a group (an editor document):
a newer job of the same group cancels the older. A deadline makes the sampler fill every
remaining mask in one last step. Knows tasks and jobs; not sockets, not msgpack.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Cancelled, DiffucodeError, TooLarge
from .protocol import ErrorCode, RPCError, TaskResult

log = logging.getLogger("diffucode.scheduler")


@dataclass(eq=False)
class Job:
    method: str  # complete | infill | refine
    params: Any  # the protocol's params dataclass
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
    def __init__(self, get_tasks: Callable[[], Any], max_queue: int = 16):
        self.get_tasks = get_tasks  # the current Tasks (hot reload swaps it between jobs)
        self.max_queue = max_queue
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.groups: dict[str, Job] = {}
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0}
        self.last_cancelled_steps: int | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="diffucode-model", daemon=True)
        self._thread.start()

    # --- asyncio side -----------------------------------------------------------------------

    def submit(self, method: str, params, on_progress=None) -> Job:
        """Queue a job; raises RPCError(OVERLOADED) when the queue is full."""
        loop = asyncio.get_running_loop()
        job = Job(method, params, loop, loop.create_future(), on_progress)
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

    def queue_state(self) -> dict:
        with self._wake:
            pending = sum(1 for j in self.pending if not j.cancelled.is_set())
        return {"pending": pending, "running": int(self.running is not None), "limit": self.max_queue}

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            for job in self.pending:
                job.cancel("the daemon is shutting down")
            if self.running:
                self.running.cancel("the daemon is shutting down")
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
                self.running = job
            try:
                self._run(job)
            finally:
                with self._wake:
                    self.running = None
                    if job.params.group is not None and self.groups.get(job.params.group) is job:
                        del self.groups[job.params.group]

    def _finish(self, job: Job, result=None, error: RPCError | None = None) -> None:
        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        job.loop.call_soon_threadsafe(settle)

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        queued_ms = (started - job.created) * 1000
        if job.cancelled.is_set():
            self._cancelled(job)
            return
        p = job.params
        deadline = None if p.deadline_ms is None else job.created + p.deadline_ms / 1000
        finished_early = False

        from .sampler import FINISH  # here, not at the top: `diffucode status` must not import torch

        def on_step(step):
            nonlocal finished_early
            job.steps_run += 1
            if job.cancelled.is_set():
                raise Cancelled(job.cancel_reason)
            if job.on_progress is not None:
                job.loop.call_soon_threadsafe(job.on_progress, {
                    "step": step.index, "steps": step.steps, "masks_left": step.masks_left, "text": step.text})
            if deadline is not None and time.monotonic() >= deadline and step.masks_left:
                finished_early = True
                return FINISH
            return None

        try:
            tasks = self.get_tasks()
            budget = (p.before_tokens, p.after_tokens)
            if job.method == "complete":
                ans = tasks.complete(p.before, p.sampling, callback=on_step, budget=budget)
            elif job.method == "infill":
                ans = tasks.infill(p.before, p.after, p.sampling, lengths=p.lengths, callback=on_step, budget=budget)
            else:
                ans = tasks.refine(p.before, p.span, p.after, p.sampling, fraction=p.fraction, callback=on_step,
                                   budget=budget)
        except Cancelled:
            self._cancelled(job)
            return
        except TooLarge as e:
            self.counters["failed"] += 1
            self._finish(job, error=RPCError(ErrorCode.TOO_LARGE, str(e)))
            return
        except DiffucodeError as e:
            self.counters["failed"] += 1
            self._finish(job, error=RPCError(ErrorCode.INVALID_PARAMS, str(e)))
            return
        except Exception as e:  # a failure inside the model must not kill the worker
            log.exception("%s failed", job.method)
            self.counters["failed"] += 1
            self._finish(job, error=RPCError(ErrorCode.MODEL_ERROR, f"{type(e).__name__}: {e}"))
            return
        self.counters["completed"] += 1
        self._finish(job, TaskResult(
            text=ans.text, tokens=ans.tokens, confidence=ans.confidence, steps=ans.steps_run,
            finished_early=finished_early, elapsed_ms=(time.monotonic() - started) * 1000,
            queued_ms=queued_ms, candidates=[vars(c) for c in ans.candidates]))

    def _cancelled(self, job: Job) -> None:
        self.counters["cancelled"] += 1
        self.last_cancelled_steps = job.steps_run
        log.info("%s cancelled after %d steps: %s", job.method, job.steps_run, job.cancel_reason)
        self._finish(job, error=RPCError(ErrorCode.CANCELLED, f"cancelled after {job.steps_run} steps: "
                                                              f"{job.cancel_reason}",
                                         {"steps_run": job.steps_run}))
