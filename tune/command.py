"""`diffucode tune`: the command around the trainer. It checks the inputs, finds the functions
the repository's tests cover, runs the loop with a progress bar, and saves the adapter (every
`--save-every` steps, at the end, and on Ctrl-C), never touching the repository itself.

    diffucode tune --repo ~/src/project --tests "python -m pytest -q tests" --out ~/adapters/project
    torchrun --nproc_per_node 2 -m diffucode tune ...      # data parallel over processes (gloo on CPU)

Without --tests the reward is reconstruction of the functions' own bodies (edit similarity), so
a repository without tests can be tuned too.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from diffucode.daemon.errors import InputError

from .settings import OBJECTIVES, TuneSettings

DEFAULTS = TuneSettings()


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="coupled-GRPO on a repository: its tests as the reward, a LoRA adapter out",
                       description="Coupled-GRPO on your repository: mask the bodies of functions its tests cover, sample a "
                       "group of completions each, run the tests on a throwaway copy (no network, limits) as the "
                       "reward, and train a LoRA adapter that `--adapter` serves.")
    p.add_argument("--repo", required=True, type=Path, help="the repository (read only: tests run on a throwaway copy)")
    p.add_argument("--tests", default=None,
                   help='the test command, run in the copy\'s root (e.g. "python -m pytest -q"); without it the '
                        "reward is reconstruction of the masked bodies")
    p.add_argument("--out", required=True, type=Path, help="the adapter folder to write (peft's layout + tune.json)")
    p.add_argument("--model", default=None, help="checkpoint directory or cached hub id (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N]")
    p.add_argument("--resume", action="store_true", help="continue the adapter already in --out")
    p.add_argument("--mode", default="body", choices=["body", "lines"],
                   help="mask whole function bodies, or one line of each (default: body)")
    p.add_argument("--held-out", type=float, default=0.25, help="share of files kept out of training (default: 0.25)")
    p.add_argument("--eval", action="store_true",
                   help="measure the held-out functions before and after (greedy answers, rewarded)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (the adapter is saved)")
    p.add_argument("--save-every", type=int, default=10, help="steps between saves (default: 10)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one test run may take (default: 60)")
    p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit of a test run (default: 2048)")
    p.add_argument("--allow-network", action="store_true",
                   help="run the tests even where no network namespace can be made (they could reach the network)")
    g = p.add_argument_group("training (defaults: the paper's where a CPU allows)")
    for f in fields(TuneSettings):
        if f.name in ("objective",):
            continue
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(DEFAULTS, f.name)),
                       default=getattr(DEFAULTS, f.name), help=f"(default: {getattr(DEFAULTS, f.name)})")
    g.add_argument("--objective", default=DEFAULTS.objective, choices=OBJECTIVES,
                   help="grpo (default), or sft: plain fine-tuning on the true bodies, the baseline")
    p.set_defaults(run=run)


def run(args) -> int:
    settings = TuneSettings(**{f.name: getattr(args, f.name) for f in fields(TuneSettings)})
    settings.check()
    repo = args.repo.expanduser().resolve()
    if not repo.is_dir():
        raise InputError(f"--repo {str(args.repo)!r} is not a directory")
    out = args.out.expanduser().resolve()
    if out == repo or repo in out.parents:
        raise InputError(f"--out {str(args.out)!r} is inside the repository; choose a folder outside it")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise InputError(f"--out {str(args.out)!r} exists and is not empty: pass --resume to continue its adapter, "
                         "or choose another folder")
    if not 0.0 <= args.held_out < 1.0:
        raise InputError(f"--held-out must be in [0, 1), got {args.held_out}")
    if args.save_every < 1:
        raise InputError(f"--save-every must be >= 1, got {args.save_every}")
    from contextlib import ExitStack

    from .repo import find_targets, split_targets, trace_tests
    from .reward import ReconstructionReward, TestReward
    from .sandbox import Sandbox
    from .trainer import World

    world = World.from_env()
    say = (lambda msg: print(msg, file=sys.stderr)) if world.rank == 0 else (lambda msg: None)
    with ExitStack() as stack:
        if args.tests:
            sandbox = stack.enter_context(Sandbox(repo, args.tests, timeout=args.timeout, memory_mb=args.memory_mb,
                                                  allow_network=args.allow_network))
            covered, baseline = trace_tests(sandbox)  # one run: does it pass, and which functions ran
            if baseline.pass_rate < 1.0:
                how = (f"{baseline.passed} of {baseline.total} passed" if baseline.total else
                       "timed out" if baseline.timed_out else f"the command exited with {baseline.returncode}")
                raise InputError(f"the tests do not pass on the repository as it is ({how}); tuning needs a "
                                 f"passing command. Its output ends:\n{baseline.output_tail[-1500:]}")
            say(f"tests pass on the repository as it is: {baseline.total or 'all'} in {baseline.seconds:.1f} s")
            reward = TestReward(sandbox)
        else:
            covered, reward = None, ReconstructionReward()
        targets = find_targets(repo, covered, mode=args.mode, seed=settings.seed)
        if not targets:
            raise InputError(f"{repo}: no function found to tune on"
                             + (" among those the tests run" if covered is not None else ""))
        train, held_out = split_targets(targets, args.held_out, settings.seed)
        if not train:
            raise InputError(f"{repo}: every function is held out; lower --held-out")
        say(f"{len(targets)} functions{' the tests cover' if covered is not None else ''}: "
            f"{len(train)} to train on, {len(held_out)} held out")
        return _loop(args, settings, world, train, held_out, reward, out, say)


def _loop(args, settings, world, train, held_out, reward, out: Path, say) -> int:
    import torch
    from tqdm import tqdm

    from diffucode.bench import hardware
    from diffucode.daemon.engine.api import Engine
    from diffucode.daemon.engine.lora import LoraSettings, attach, load_adapter, save_adapter, weights_sha256

    from .trainer import Tuner

    engine = Engine.load(args.model, args.device)
    ckpt = engine.checkpoint
    base_sha = weights_sha256(ckpt.path)
    lora = LoraSettings(rank=settings.rank, alpha=settings.alpha)
    record = {"repo": str(args.repo), "tests": args.tests, "mode": args.mode, "objective": settings.objective,
              "targets": {"train": len(train), "held_out": len(held_out)}, "steps": [], "seconds": 0.0,
              "hardware": hardware(ckpt.device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.resume and (out / "adapter_config.json").is_file():
        info = load_adapter(ckpt.network, out, base_sha)
        lora, record = info.settings, info.record | {"resumed": True}
    else:
        attach(ckpt.network, lora, seed=settings.seed)
    tuner = Tuner(engine, train, reward, settings, world)
    record.update(tuner.record())
    if args.eval and held_out:
        record["held_out_before"] = tuner.evaluate(held_out)
        say(f"held-out before: {json.dumps(record['held_out_before'])}")
    first = len(record["steps"])
    spent = record.get("seconds", 0.0)

    def save(note: str = "") -> None:
        if world.rank == 0:
            save_adapter(ckpt.network, out, lora, base_sha, str(ckpt.path), record | ({"note": note} if note else {}))

    t0 = time.monotonic()
    bar = tqdm(total=first + settings.steps, initial=first, file=sys.stderr, disable=world.rank != 0,
               unit="step", dynamic_ncols=True)
    step = first
    try:
        for step in range(first, first + settings.steps):
            stats = tuner.step(step)
            record["steps"].append(stats)
            record["seconds"] = round(spent + time.monotonic() - t0, 1)
            bar.set_postfix({k: stats[k] for k in ("reward", "code", "loss") if k in stats} | {"s/step": stats["seconds"]})
            bar.update(1)
            if (step + 1 - first) % args.save_every == 0:
                save()
            if args.minutes is not None and time.monotonic() - t0 > args.minutes * 60:
                say(f"--minutes {args.minutes:g} reached after {step + 1 - first} steps")
                break
    except KeyboardInterrupt:
        bar.close()
        save("interrupted")
        say(f"interrupted: the adapter after {len(record['steps'])} steps is in {out}")
        return 130
    bar.close()
    if args.eval and held_out:
        record["held_out_after"] = tuner.evaluate(held_out)
        say(f"held-out after: {json.dumps(record['held_out_after'])}")
    save()
    say(f"adapter ({len(record['steps'])} steps, {record['seconds']:.0f} s) in {out}: "
        f"diffucode serve --adapter {out}")
    if world.size > 1:
        torch.distributed.destroy_process_group()
    return 0
