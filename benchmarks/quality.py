"""Single-line infill quality on held-out standard-library files, next to trivial baselines.

For each sampled line of a held-out file (training/train.py's deterministic split), the line is
removed and the model fills it from the code before and after. Reported per method:
- exact match: the filled line equals the true one (trailing whitespace ignored);
- token accuracy: share of the true line's tokens matched at the same position;
- bracket balance: the filled line opens and closes brackets as the true line does.
Baselines: an empty line; a copy of the line above. This is also the quality guard for the fast
decoding to come: run it before and after.

    python benchmarks/quality.py [--model DIR] [--samples 200] [--canvas 24] [--decoding exact,fast]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))

from train import data_hash, read, split, stdlib_files  # noqa: E402

from diffucode.daemon.checkpoint import load_checkpoint  # noqa: E402
from diffucode.daemon.tasks import Options, Tasks  # noqa: E402


def balance(line: str) -> tuple[int, int, int]:
    return tuple(line.count(o) - line.count(c) for o, c in ("()", "[]", "{}"))


def samples(n: int, seed: int, max_context_lines: int = 60) -> list[tuple[str, str, str, str]]:
    """(before, line, after, line above) for n lines of held-out files, chosen deterministically."""
    _, held = split(stdlib_files())
    rng = random.Random(seed)
    out = []
    files = [read(f).split("\n") for f in held]
    while len(out) < n:
        lines = rng.choice(files)
        candidates = [i for i in range(1, len(lines) - 1) if lines[i].strip() and len(lines[i]) < 100]
        if not candidates:
            continue
        i = rng.choice(candidates)
        before = "\n".join(lines[max(0, i - max_context_lines):i]) + "\n"
        after = "\n" + "\n".join(lines[i + 1:i + 1 + max_context_lines // 2])
        out.append((before, lines[i], after, lines[i - 1]))
    return out


def fill(tasks: Tasks, cases, opts: Options) -> list:
    """The model's answer to each case."""
    return [tasks.infill(before, after, opts) for before, _, after, _ in cases]


def first_line(answer) -> str:
    """What is scored of an answer: its first line (the case is one line)."""
    return answer.text.split("\n", 1)[0]


def score(preds: list[str], cases, tok) -> dict:
    exact = tokens = bal = 0.0
    for pred, (_, truth, _, _) in zip(preds, cases):
        exact += pred.rstrip() == truth.rstrip()
        t, p = tok.encode(truth.rstrip()), tok.encode(pred.rstrip())
        tokens += sum(a == b for a, b in zip(t, p)) / max(1, len(t))
        bal += balance(pred) == balance(truth)
    n = len(cases)
    return {"exact_match": round(100 * exact / n, 1), "token_accuracy": round(100 * tokens / n, 1),
            "bracket_balance": round(100 * bal / n, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--canvas", type=int, default=24, help="masks per line (end tokens shrink it)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: one per mask)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--decoding", default="exact",
                    help="comma-separated decodings to score, each a row: exact, fast (default exact)")
    args = ap.parse_args()
    decodings = args.decoding.split(",")
    for d in decodings:
        if d not in ("exact", "fast"):
            raise SystemExit(f"--decoding {d!r} is unknown (use exact, fast or both, comma-separated)")
    from diffucode.models import default_model

    model = args.model or str(default_model())
    tasks = Tasks(load_checkpoint(model, device="cpu"))
    cases = samples(args.samples, args.seed)
    rows, timing = {}, {}
    for d in decodings:
        t0 = time.perf_counter()
        answers = fill(tasks, cases, Options(max_new_tokens=args.canvas, steps=args.steps, decoding=d))
        rows[f"model, {d}"] = score([first_line(a) for a in answers], cases, tasks.tok)
        passes = sum(a.forward_passes for a in answers)
        timing[d] = {"seconds": round(time.perf_counter() - t0, 1), "forward_passes_per_line": round(passes / len(cases), 2)}
    rows["baseline: empty line"] = score([""] * len(cases), cases, tasks.tok)
    rows["baseline: line above"] = score([c[3] for c in cases], cases, tasks.tok)
    print(f"single-line infill on {len(cases)} held-out lines (seed {args.seed}), canvas {args.canvas}, "
          f"model {model}")
    print(f"{'method':24s} {'exact match':>12s} {'token acc.':>11s} {'brackets':>9s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['exact_match']:11.1f}% {r['token_accuracy']:10.1f}% {r['bracket_balance']:8.1f}%")
    for d, t in timing.items():
        print(f"model time, {d}: {t['seconds']:.1f} s, {t['forward_passes_per_line']:.1f} forward passes per line, "
              f"{platform.machine()} {os.cpu_count()} cores")
    print(json.dumps({"benchmark": "quality", "samples": len(cases), "seed": args.seed, "canvas": args.canvas,
                      "steps": args.steps, "held_out_sha256": data_hash(split(stdlib_files())[1]),
                      "rows": rows, "timing": timing}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
