"""Checkpoint faults: broken files at load, and files changed in place while serving (issue 14).

Load: tiny real checkpoints (diffucode.daemon.engine.tiny) broken one way each - truncated weights, a
tensor of the wrong shape, a missing tensor, missing tokenizer files, a missing shard, a NaN or
an infinite weight, the wrong model_type, pickle-only weights (pytorch_model.bin), num_hidden_layers
0, max_position_embeddings 0, config.json that is not JSON, weights that are empty or garbage -
and for each `python -m diffucode infill FILE --line 2 --column 12 --model DIR` is run. Goals:
a non-zero exit, stderr one line naming the file or tensor at fault, no traceback.

Serving: a daemon with hot reload on (no --no-watch) serves a fp32 checkpoint; its
model.safetensors is truncated, overwritten in place with other bytes, overwritten in place with a
copy holding a NaN (as `cp new old` does), and deleted; between faults the good file is written
back. After each fault: the daemon is alive, its answer (greedy) is the one it gave before, both
at once and after the reload, and status()["reload"] says "failed" with the error.

    python benchmarks/hardening/checkpoints.py [--part load|serving|all] [--faults a,b] [--jobs 2] [--threads N]

The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import (
    SMALL_INFILL,
    Daemon,
    Report,
    add_threads_option,
    kill_group,
    scratch,
    tiny_model,
    torch_env,
    track_group,
)

TENSOR = "model.layers.1.mlp.up_proj.weight"
SOURCE = "def f(x):\n    return \n"


# --- breaking a checkpoint: each takes the copy's directory, returns the names stderr must hold --

def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


def _save(d: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def truncated(d: Path):
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    return ["model.safetensors"]


def wrong_shape(d: Path):
    t = _tensors(d)
    t[TENSOR] = t[TENSOR][:-1].contiguous()
    _save(d, t)
    return [TENSOR]


def missing_tensor(d: Path):
    t = _tensors(d)
    del t[TENSOR]
    _save(d, t)
    return [TENSOR]


def missing_tokenizer(d: Path):
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (d / name).unlink(missing_ok=True)
    return ["tokenizer"]


def missing_shard(d: Path):
    shard = "model-00002-of-00003.safetensors"
    (d / shard).unlink()
    return [shard]


def nan_weight(d: Path):
    t = _tensors(d)
    t[TENSOR][3, 5] = float("nan")
    _save(d, t)
    return [TENSOR]


def inf_weight(d: Path):
    t = _tensors(d)
    t[TENSOR][0, 0] = float("-inf")
    _save(d, t)
    return [TENSOR]


def wrong_model_type(d: Path):
    _config(d, model_type="llama")
    return ["config.json", "model_type"]


def pickle_only(d: Path):
    import torch

    torch.save(_tensors(d), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return ["pytorch_model.bin"]


def zero_layers(d: Path):
    _config(d, num_hidden_layers=0)
    return ["config.json", "num_hidden_layers"]


def zero_positions(d: Path):
    _config(d, max_position_embeddings=0)
    return ["config.json", "max_position_embeddings"]


def config_not_json(d: Path):
    (d / "config.json").write_text('{"model_type": "Dream", ')
    return ["config.json"]


def empty_weights(d: Path):
    (d / "model.safetensors").write_bytes(b"")
    return ["model.safetensors"]


def garbage_weights(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(random.Random(5).randbytes(f.stat().st_size))
    return ["model.safetensors"]


FAULTS = {f.__name__: f for f in (truncated, wrong_shape, missing_tensor, missing_tokenizer, missing_shard,
                                  nan_weight, inf_weight, wrong_model_type, pickle_only, zero_layers,
                                  zero_positions, config_not_json, empty_weights, garbage_weights)}
SHARDED = {"missing_shard"}


@dataclass
class LoadResult:
    fault: str
    exit_code: int
    stderr: str
    names: list[str]
    seconds: float

    @property
    def one_line(self) -> bool:
        return len(self.stderr.strip().splitlines()) == 1

    @property
    def named(self) -> bool:
        return all(n in self.stderr for n in self.names)

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr

    @property
    def ok(self) -> bool:
        return self.exit_code != 0 and self.one_line and self.named and not self.traceback


THREADS: int | None = None  # --threads


def run_cli(args: list[str], timeout: float = 300.0) -> tuple[int, str, float]:
    """`python -m diffucode ARGS` in its own process group: (exit code, stderr, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "diffucode", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            env=torch_env(THREADS))
    track_group(proc.pid)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        _, err = proc.communicate()
        err += f"\n(killed after {timeout:g} s)"
    return proc.returncode, err, time.monotonic() - t0


def load_fault(fault: str, pristine: dict[str, Path], work: Path, source: Path) -> LoadResult:
    d = work / fault
    shutil.copytree(pristine["sharded" if fault in SHARDED else "single"], d)
    names = FAULTS[fault](d)
    code, err, secs = run_cli(["infill", str(source), "--line", "2", "--column", "12", "--model", str(d)])
    return LoadResult(fault, code, err, names, secs)


def load_part(report: Report, work: Path, faults: list[str], jobs: int) -> list[LoadResult]:
    pristine = {"single": tiny_model(work / "pristine"), "sharded": tiny_model(work / "pristine-sharded", shards=3)}
    source = work / "f.py"
    source.write_text(SOURCE)
    good_code, good_err, _ = run_cli(["infill", str(source), "--line", "2", "--column", "12",
                                      "--model", str(pristine["single"])])
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda f: load_fault(f, pristine, work, source), faults))
    report.section("load: `diffucode infill --model BROKEN` (goal: exit != 0, one line naming the file or tensor, "
                   "no traceback)")
    report.figure("intact_exit", "the intact checkpoint's exit code", good_code, "", "0", good_code == 0)
    if good_code != 0:
        report.note(good_err.strip()[-500:])
    for r in results:
        first = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "(no stderr)"
        report.note(f"{r.fault:<18} exit {r.exit_code:<3} lines {len(r.stderr.strip().splitlines()):<2} "
                    f"names {'yes' if r.named else 'NO ':<3} traceback {'YES' if r.traceback else 'no ':<3} "
                    f"{'ok' if r.ok else 'FAILED'}  {first[:150]}")
    failing = {r.fault: r.stderr.strip()[-300:] for r in results if not r.ok}
    for key in ("load_nonzero", "load_one_line", "load_named", "load_tracebacks"):
        report.evidence(key, failing)
    report.figure("load_faults", "faults tried", len(results))
    report.figure("load_nonzero", "non-zero exits", sum(r.exit_code != 0 for r in results), "", f"{len(results)}",
                  all(r.exit_code != 0 for r in results))
    report.figure("load_one_line", "stderr of one line", sum(r.one_line for r in results), "", f"{len(results)}",
                  all(r.one_line for r in results))
    report.figure("load_named", "naming the file or tensor", sum(r.named for r in results), "", f"{len(results)}",
                  all(r.named for r in results))
    report.figure("load_tracebacks", "with a traceback", sum(r.traceback for r in results), "", "0",
                  not any(r.traceback for r in results))
    return results


# --- in place, while serving ----------------------------------------------------------------------

def answer(daemon: Daemon) -> str | None:
    """The daemon's greedy answer to the small infill (None when it cannot answer)."""
    try:
        conn = daemon.connect(timeout=60)
        err, result = conn.reply(conn.request("infill", SMALL_INFILL))
        conn.close()
    except (OSError, ConnectionError):
        return None
    return None if err is not None else result["text"]


def reload_state(daemon: Daemon) -> dict | None:
    try:
        conn = daemon.connect(timeout=10)
        state = conn.call("status")["reload"]
        conn.close()
        return state
    except (OSError, ConnectionError, AssertionError):
        return None


def next_reload(daemon: Daemon, last_at, timeout: float = 30.0) -> dict | None:
    """The reload that settles (ok or failed) after the one recorded at last_at."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.alive():
        state = reload_state(daemon)
        if state and state["state"] in ("ok", "failed") and state["at"] != last_at:
            return state
        time.sleep(0.1)
    return None


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file's bytes in place (same inode, as `cp new old` does)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def serving_part(report: Report, work: Path) -> list[dict]:
    model = tiny_model(work / "served", seed=3)  # fp32 on disk: a candidate for serving straight from a map
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    poisoned_dir = tiny_model(work / "poisoned", seed=3)
    nan_weight(poisoned_dir)
    poisoned = (poisoned_dir / "model.safetensors").read_bytes()
    changes = [
        ("truncated in place", lambda: os.truncate(weights, len(good) // 2)),
        ("overwritten in place, other bytes", lambda: write_in_place(weights, random.Random(7).randbytes(len(good)))),
        ("overwritten in place, a NaN copy", lambda: write_in_place(weights, poisoned)),
        ("deleted", lambda: weights.unlink()),
    ]
    ddir = work / "daemon"
    ddir.mkdir()
    daemon = Daemon(model, ddir, env=torch_env(THREADS))  # hot reload on
    rows = []
    try:
        first = answer(daemon)
        if first is None:
            raise RuntimeError(f"the daemon did not answer before any change:\n{daemon.log_text()[-2000:]}")
        last_at = (reload_state(daemon) or {}).get("at")
        for label, change in changes:
            change()
            at_once = answer(daemon)  # before the reload has even begun
            state = next_reload(daemon, last_at)
            after = answer(daemon)
            rows.append({"change": label, "alive": daemon.alive(), "same_at_once": at_once == first,
                         "same_after": after == first, "state": state["state"] if state else None,
                         "error": (state or {}).get("error"), "exit": daemon.proc.returncode})
            last_at = state["at"] if state else last_at
            if not daemon.alive():
                break
            if weights.exists():
                write_in_place(weights, good)
            else:
                weights.write_bytes(good)
            restored = next_reload(daemon, last_at)
            rows[-1]["restored"] = restored["state"] if restored else None
            rows[-1]["same_restored"] = answer(daemon) == first
            last_at = restored["at"] if restored else last_at
        tracebacks = daemon.tracebacks()
    finally:
        daemon.stop()
    report.section("serving: model.safetensors changed in place under a daemon with hot reload")
    for r in rows:
        alive = "yes" if r["alive"] else f"NO (exit {r['exit']})"
        report.note(f"{r['change']:<36} alive {alive:<4} "
                    f"same answer at once {'yes' if r['same_at_once'] else 'NO':<3} after reload "
                    f"{'yes' if r['same_after'] else 'NO':<3} reload {r['state']}: {str(r['error'])[:110]}")
        if "restored" in r:
            report.note(f"{'':<36} good file written back: reload {r['restored']}, same answer "
                        f"{'yes' if r['same_restored'] else 'NO'}")
    n = len(changes)
    for key in ("serving_alive", "serving_same", "serving_failed_state", "serving_restored"):
        report.evidence(key, rows)
    report.figure("serving_alive", "changes the daemon survived", sum(r["alive"] for r in rows), "", f"{n}",
                  len(rows) == n and all(r["alive"] for r in rows))
    report.figure("serving_same", "answers unchanged (at once and after reload)",
                  sum(r["same_at_once"] and r["same_after"] for r in rows), "", f"{n}",
                  len(rows) == n and all(r["same_at_once"] and r["same_after"] for r in rows))
    report.figure("serving_failed_state", 'reload state "failed" with an error',
                  sum(r["state"] == "failed" and bool(r["error"]) for r in rows), "", f"{n}",
                  len(rows) == n and all(r["state"] == "failed" and r["error"] for r in rows))
    report.figure("serving_restored", "good file written back: reload ok, same answer",
                  sum(r.get("restored") == "ok" and r.get("same_restored", False) for r in rows), "", f"{n}",
                  all(r.get("restored") == "ok" and r.get("same_restored") for r in rows))
    report.figure("serving_tracebacks", "tracebacks in the daemon's log", tracebacks, "", "0", tracebacks == 0)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["load", "serving", "all"], default="all")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"load faults to try (default all: {', '.join(FAULTS)})")
    p.add_argument("--jobs", type=int, default=2, help="CLI runs at once (2)")
    add_threads_option(p)
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    loads = args.part in ("load", "all")
    report = Report("checkpoints", {"part": args.part, "faults": len(faults) if loads else 0, "jobs": args.jobs,
                                    "threads": args.threads})
    work = scratch("ckpt")
    load, serving = [], []
    if loads:
        load = load_part(report, work, faults, args.jobs)
    if args.part in ("serving", "all"):
        serving = serving_part(report, work)
    report.finish(load=[{"fault": r.fault, "exit": r.exit_code, "stderr": r.stderr.strip()[-600:], "one_line": r.one_line,
                         "named": r.named, "traceback": r.traceback, "ok": r.ok} for r in load],
                  serving=serving)
    return 0


if __name__ == "__main__":
    sys.exit(main())
