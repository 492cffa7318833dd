"""`diffucode tune` measured: pass rate of masked function bodies on held-out files of a real
repository, before and after coupled-GRPO, against plain fine-tuning on the same code for the
same time; step time and memory on this machine.

The repository is a package the bundled model never trained on (diffucode.heldout's split), taken
from the pinned source distribution in the training manifest (training/packages.json; the archive
must be in the training-data cache: `python training/data.py build` fetches it), with a test
command that runs part of its own test suite. Functions the tests cover are split by file into
train and held-out; each arm starts from the same fresh adapter, trains for `--minutes`, and is
measured on the held-out functions with greedy answers, rewarded by the tests in the sandbox.

    python benchmarks/tune.py [--package click] [--tests CMD] [--minutes 8] [--model DIR]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path


from diffucode import Engine
from diffucode.bench import hardware
from diffucode.daemon.engine.lora import LoraSettings, attach
from diffucode.heldout import DEFAULT_HOME, package_held_out
from diffucode.tune.repo import find_targets, split_targets, trace_tests
from diffucode.tune.reward import TestReward
from diffucode.tune.sandbox import Sandbox
from diffucode.tune.settings import TuneSettings
from diffucode.tune.trainer import Tuner

MANIFEST = Path(__file__).resolve().parent.parent / "training" / "packages.json"
CLICK_TESTS = ("python -m pytest -q -x -p no:cacheprovider tests/test_parser.py tests/test_formatting.py "
               "tests/test_normalization.py tests/test_types tests/test_utils")


def unpack(package: str, into: Path) -> Path:
    entry = next((p for p in json.loads(MANIFEST.read_text())["packages"] if p["name"] == package), None)
    if entry is None:
        raise SystemExit(f"{package}: not in {MANIFEST}")
    if not package_held_out(package):
        raise SystemExit(f"{package}: the bundled model trained on it; choose a held-out package")
    archive = DEFAULT_HOME / "archives" / entry["filename"]
    data = archive.read_bytes() if archive.is_file() else b""
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SystemExit(f"{archive}: missing or not the pinned file; run `python training/data.py build` first")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return next(into.iterdir())


def arm(name: str, args, train, held_out, reward, before: dict | None) -> dict:
    engine = Engine.load(args.model, device="cpu")
    attach(engine.checkpoint.network, LoraSettings(rank=args.rank), seed=0)
    settings = TuneSettings(objective=name, steps=1_000_000, group=args.group, prompts=args.prompts,
                            canvas=args.canvas, context=args.context, lr=args.lr, rank=args.rank,
                            temperature=args.temperature)
    tuner = Tuner(engine, train, reward, settings)
    if before is None:
        before = tuner.evaluate(held_out)
    t0, steps = time.monotonic(), []
    while time.monotonic() - t0 < args.minutes * 60:
        steps.append(tuner.step(len(steps)))
        print(f"  {name} step {len(steps)}: {json.dumps(steps[-1])}", file=sys.stderr, flush=True)
    after = tuner.evaluate(held_out)
    train_after = tuner.evaluate(train)
    return {"before": before, "after": after, "train_after": train_after, "steps": len(steps),
            "s_per_step": round(sum(s["seconds"] for s in steps) / max(len(steps), 1), 2),
            "mean_reward_first": steps[0].get("reward") if steps else None,
            "mean_reward_last": steps[-1].get("reward") if steps else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--package", default="click", help="a held-out package of the training manifest")
    ap.add_argument("--tests", default=CLICK_TESTS, help="the test command, run in the package's root")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of each arm")
    ap.add_argument("--max-lines", type=int, default=6, help="bodies of at most this many lines")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--canvas", type=int, default=48)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=TuneSettings.temperature)
    ap.add_argument("--mode", choices=["body", "lines"], default="body", help="mask whole bodies or one line")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffucode-bench-tune-") as tmp:
        repo = unpack(args.package, Path(tmp))
        with Sandbox(repo, args.tests, timeout=120) as sandbox:
            covered, baseline = trace_tests(sandbox)
            if baseline.pass_rate < 1.0:
                raise SystemExit(f"the tests fail on {repo.name} as it is:\n{baseline.output_tail[-2000:]}")
            targets = find_targets(repo, covered, mode=args.mode, max_lines=args.max_lines)
            train, held_out = split_targets(targets, 0.3, seed=0)
            print(f"{repo.name}: {len(targets)} covered functions of <= {args.max_lines} lines, {len(train)} train, "
                  f"{len(held_out)} held out; a test run takes {baseline.seconds:.1f} s", file=sys.stderr)
            reward = TestReward(sandbox)
            rows, t0 = {}, time.perf_counter()
            rows["coupled-GRPO"] = arm("grpo", args, train, held_out, reward, None)
            rows["plain fine-tuning"] = arm("sft", args, train, held_out, reward, rows["coupled-GRPO"]["before"])
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tune: {repo.name}, {len(held_out)} held-out functions (bodies <= {args.max_lines} lines), "
          f"{args.minutes:g} min of training per arm; {hardware('cpu')}; peak RSS {rss_mb:.0f} MB; {seconds:.0f} s in all")
    print("held-out functions: 'all pass' = every test passes with the greedy answer in place; 'tests' = share "
          "of tests passed, averaged; 'parses' = the file parses")
    print(f"{'arm':20s} {'steps':>5s} {'s/step':>7s} {'all pass':>17s} {'tests':>17s} {'parses':>17s} {'reward':>15s}")
    for name, r in rows.items():
        b, a = r["before"], r["after"]
        print(f"{name:20s} {r['steps']:5d} {r['s_per_step']:7.2f} "
              + " ".join(f"{100 * b[k]:7.1f}%->{100 * a[k]:6.1f}%" for k in ("all_pass", "pass_rate", "parses"))
              + f" {b['reward']:6.3f}->{a['reward']:6.3f}")
    print(json.dumps({"benchmark": "tune", "package": repo.name, "tests": args.tests, "minutes": args.minutes,
                      "mode": args.mode, "temperature": args.temperature,
                      "held_out": len(held_out), "train": len(train), "peak_rss_mb": round(rss_mb),
                      "seconds": round(seconds), "model": str(args.model or "bundled"), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
