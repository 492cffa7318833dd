"""The daemon's current model and LoRA adapter, and hot reload when their files change on disk.

watchdog watches the checkpoint directory and, with `--adapter`, the adapter folder. Once the
files have been quiet for `settle_s`:

- new weights: the checkpoint (and the adapter on it) is loaded into a new Engine in a
  background thread and swapped in between requests (the scheduler reads `tasks` when it starts
  a job, so a running job finishes on the model it began with);
- a new adapter (`diffucode tune` rewrites its folder, file by file through a rename): only the
  adapter is loaded, in place on the running network, so the base weights are not read again.
  In place means between jobs: the scheduler holds `in_use` while a job runs, and the swap
  takes it. The fast decoder's cached keys and values are dropped with the old adapter.

A failed reload keeps the running model and adapter and reports the error in `reload_state`.
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
                 cuda_graphs: bool = False, prefix_cache: bool = False, adapter: str | Path | None = None):
        self.source = model
        self.adapter_path = Path(adapter).expanduser().absolute() if adapter is not None else None
        self._load_args = (device, dtype, prompt_format, limits, quantize, decoding, cuda_graphs, prefix_cache,
                           self.adapter_path)
        self.in_use = threading.Lock()  # held by the scheduler's model thread while a job runs
        self.engine = self._load()
        self.path: Path = self.engine.checkpoint.path
        self.reload_state = {"state": "idle", "error": None, "at": None, "reloads": 0, "adapter_reloads": 0}
        self._observer = None
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()
        self._reloading = threading.Lock()  # one reload at a time (the model's or the adapter's)

    def _load(self) -> Engine:
        device, dtype, prompt_format, limits, quantize, decoding, cuda_graphs, prefix_cache, adapter = self._load_args
        return Engine.load(self.source, device, dtype, quantize, decoding, prompt_format=prompt_format, limits=limits,
                           cuda_graphs=cuda_graphs, prefix_cache=prefix_cache, adapter=adapter)

    @property
    def tasks(self) -> Tasks:
        return self.engine.tasks

    @property
    def adapter(self) -> dict | None:
        """The adapter's summary (lora.AdapterInfo.summary) for `status`; None without one."""
        info = self.engine.adapter
        return info.summary() if info is not None else None

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
            def __init__(self, what: str, reload):
                self.what, self.reload = what, reload

            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return
                state._changed(self.what, self.reload, settle_s)

        # a hub snapshot's files are symlinks into blobs/: watch the real directory too
        self._observer = Observer()
        self._observer.schedule(OnChange("model", self.reload), str(self.path), recursive=False)
        if self.adapter_path is not None and self.adapter_path.resolve() != self.path.resolve():
            self._observer.schedule(OnChange("adapter", self.reload_adapter), str(self.adapter_path.resolve()),
                                    recursive=False)
        self._observer.daemon = True
        self._observer.start()
        log.info("watching %s for new weights%s", self.path,
                 f" and {self.adapter_path} for a new adapter" if self.adapter_path else "")

    def _changed(self, what: str, reload, settle_s: float) -> None:
        with self._lock:  # restart the settle timer on every event
            if what in self._timers:
                self._timers[what].cancel()
            timer = self._timers[what] = threading.Timer(settle_s, reload)
            timer.daemon = True
            timer.start()

    def reload(self) -> None:
        with self._reloading:
            self.reload_state.update(state="loading", at=time.time())
            log.info("reloading %s", self.path)
            try:
                resolve_path(self.source)
                engine = self._load()
            except Exception as e:
                log.error("reload failed, keeping the running model: %s", e)
                self.reload_state.update(state="failed", error=str(e), at=time.time())
                return
            self.engine = engine  # swapped between jobs: the scheduler reads `tasks` when a job starts
            self.reload_state.update(state="ok", error=None, at=time.time(),
                                     reloads=self.reload_state["reloads"] + 1)
            log.info("reloaded %s", self.path)

    def reload_adapter(self) -> None:
        """Load the adapter folder again, in place on the running network, between jobs."""
        with self._reloading:
            self.reload_state.update(state="loading", at=time.time())
            log.info("reloading the adapter %s", self.adapter_path)
            try:
                with self.in_use:  # no job runs on the network while its layers change
                    info = self.engine.load_adapter(self.adapter_path)
            except Exception as e:
                log.error("adapter reload failed, keeping the running adapter: %s", e)
                self.reload_state.update(state="failed", error=f"adapter: {e}", at=time.time())
                return
            self.reload_state.update(state="ok", error=None, at=time.time(),
                                     adapter_reloads=self.reload_state["adapter_reloads"] + 1)
            summary = info.summary()
            log.info("reloaded the adapter %s (rank %d, %d steps, last reward %s)", self.adapter_path,
                     summary["rank"], summary["steps"], summary["last_reward"])

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
