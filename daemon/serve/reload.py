"""The daemon's current model, and hot reload when its files change on disk.

watchdog watches the checkpoint directory; once the files have been quiet for `settle_s`, the
new checkpoint is loaded in a background thread and swapped in between requests (the scheduler
reads `tasks` when it starts a job, so a running job finishes on the model it began with).
A failed reload keeps the running model and reports the error in `reload_state`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..engine.api import Engine
from ..engine.options import DEFAULT_DECODING, Limits
from ..engine.tasks import Tasks
from ..engine.weights import resolve_path

log = logging.getLogger("diffucode.model")


class ModelState:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", prompt_format: str = "auto",
                 limits: Limits | None = None, quantize: str = "none", decoding: str = DEFAULT_DECODING,
                 cuda_graphs: bool = False, prefix_cache: bool = False):
        self.source = model
        self._load_args = (device, dtype, prompt_format, limits, quantize, decoding, cuda_graphs, prefix_cache)
        self.tasks = self._load()
        self.path: Path = self.tasks.ckpt.path
        self.reload_state = {"state": "idle", "error": None, "at": None, "reloads": 0}
        self._observer = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def _load(self) -> Tasks:
        device, dtype, prompt_format, limits, quantize, decoding, cuda_graphs, prefix_cache = self._load_args
        return Engine.load(self.source, device, dtype, quantize, decoding, prompt_format=prompt_format, limits=limits,
                           cuda_graphs=cuda_graphs, prefix_cache=prefix_cache).tasks

    @property
    def device(self) -> str:
        return str(self.tasks.ckpt.device)

    @property
    def dtype(self) -> str:
        return str(self.tasks.ckpt.dtype).removeprefix("torch.")

    @property
    def quantization(self) -> str:
        return self.tasks.ckpt.quantization

    def memory(self) -> dict:
        """Weight bytes per dtype (quantization state included), peak RSS, CUDA counters."""
        from diffucode.quantization.memory import memory_report

        from .server import rss_bytes

        return {**memory_report(self.tasks.ckpt.network, self.tasks.ckpt.device), "rss_peak": rss_bytes()}

    # --- hot reload -------------------------------------------------------------------------

    def watch(self, settle_s: float = 1.0) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        state = self

        class OnChange(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return
                state._changed(settle_s)

        # a hub snapshot's files are symlinks into blobs/: watch the real directory too
        self._observer = Observer()
        self._observer.schedule(OnChange(), str(self.path), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        log.info("watching %s for new weights", self.path)

    def _changed(self, settle_s: float) -> None:
        with self._lock:  # restart the settle timer on every event
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(settle_s, self.reload)
            self._timer.daemon = True
            self._timer.start()

    def reload(self) -> None:
        self.reload_state.update(state="loading", at=time.time())
        log.info("reloading %s", self.path)
        try:
            resolve_path(self.source)
            tasks = self._load()
        except Exception as e:
            log.error("reload failed, keeping the running model: %s", e)
            self.reload_state.update(state="failed", error=str(e), at=time.time())
            return
        self.tasks = tasks  # swapped between jobs: the scheduler reads it when a job starts
        self.reload_state.update(state="ok", error=None, at=time.time(),
                                 reloads=self.reload_state["reloads"] + 1)
        log.info("reloaded %s", self.path)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        if self._timer is not None:
            self._timer.cancel()
