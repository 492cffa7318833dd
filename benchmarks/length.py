"""The middle's length: fixed canvases against one chosen per request, in one run.

On held-out single- and multi-line cases (diffucode.quality), each infill is decoded with fixed
canvases (8, 16, 32, 64 by default), with the canvas chosen from one forward pass over the upper
bound (`--length auto`, daemon/engine/length.py: end-token density), and by trying every fixed
size and keeping the best mean log-probability per kept token (`--lengths`, the older strategy).
Reported per method: exact match, edit similarity and forward passes per case; the chosen
method's passes against the best fixed canvas's (target: better quality at <= 1.5x its passes).

    python benchmarks/length.py [--model DIR] [--set stdlib|packages] [--samples 60] [--multi-samples 30]
        [--canvases 8,16,32,64] [--decoding fast]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from diffucode import Engine
from diffucode.daemon.engine.options import DECODINGS
from diffucode.daemon.errors import InputError
from diffucode.quality import samples, score


def run_method(engine: Engine, cases, **kw) -> tuple[list[str], float, float]:
    """Answers, mean forward passes per case, seconds."""
    t0 = time.perf_counter()
    answers = [engine.infill(c.before, c.after, **kw) for c in cases]
    return ([a.text for a in answers], statistics.fmean(a.forward_passes for a in answers),
            time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--set", dest="which", choices=["stdlib", "packages"], default="stdlib")
    ap.add_argument("--samples", type=int, default=60, help="single-line cases")
    ap.add_argument("--multi-samples", type=int, default=30, help="multi-line cases (0: none)")
    ap.add_argument("--canvases", default="8,16,32,64", help="fixed canvas sizes; the largest is auto's upper bound")
    ap.add_argument("--decoding", default="fast", choices=DECODINGS)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    canvases = sorted(int(v) for v in args.canvases.split(","))
    engine = Engine.load(args.model, device="cpu")
    kinds = {"single": samples(args.samples, args.seed, args.which, "single")}
    if args.multi_samples:
        kinds["multi"] = samples(args.multi_samples, args.seed, args.which, "multi")
    report = {"benchmark": "length", "set": args.which, "decoding": args.decoding, "canvases": canvases,
              "hardware": f"{platform.machine()} {os.cpu_count()} cores", "kinds": {}}
    for kind, cases in kinds.items():
        methods = {f"fixed {n}": dict(max_new_tokens=n) for n in canvases}
        methods[f"auto (<= {canvases[-1]})"] = dict(max_new_tokens=canvases[-1], length="auto")
        methods[f"try {','.join(map(str, canvases))}"] = dict(max_new_tokens=canvases[-1], lengths=canvases)
        rows = {}
        for name, kw in methods.items():
            preds, passes, seconds = run_method(engine, cases, decoding=args.decoding, **kw)
            rows[name] = {**score(preds, cases, engine.tasks.tok), "passes_per_case": round(passes, 2),
                          "seconds": round(seconds, 1)}
        fixed = {k: v for k, v in rows.items() if k.startswith("fixed")}
        best = max(fixed, key=lambda k: (fixed[k]["exact_match"], fixed[k]["edit_similarity"]))
        lines = statistics.fmean(c.lines for c in cases)
        print(f"{kind}-line infill: {len(cases)} held-out cases ({args.which}, seed {args.seed}, {lines:.1f} lines), "
              f"{args.decoding} decoding; best fixed canvas: {best}")
        print(f"{'method':22s} {'exact':>7s} {'edit sim':>8s} {'parses':>7s} {'passes':>7s} {'vs best':>7s} {'seconds':>8s}")
        for name, r in rows.items():
            ratio = r["passes_per_case"] / max(rows[best]["passes_per_case"], 1e-9)
            print(f"{name:22s} {r['exact_match']:6.1f}% {r['edit_similarity']:7.1f}% {r['parses']:6.1f}% "
                  f"{r['passes_per_case']:7.1f} {ratio:6.2f}x {r['seconds']:8.1f}")
        report["kinds"][kind] = {"samples": len(cases), "best_fixed": best, "rows": rows}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as e:
        raise SystemExit(f"length.py: {e}")
