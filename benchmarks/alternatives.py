"""Alternatives ranked by the coupled likelihood, against the greedy answer and against ranking by
mean confidence, on held-out single lines (diffucode.quality's cases), in one run.

For each case the engine samples the alternatives once (the greedy middle and N - 1 at the
alternatives temperature, one batch); the same set is then ranked two ways. Reported: exact match
and edit similarity of the greedy answer, of the top alternative by coupled likelihood, of the top
by mean confidence, and how often any alternative is right (the ceiling a ranking can reach);
plus the forward passes the ranking costs.

    python benchmarks/alternatives.py [--model DIR] [--set stdlib|packages] [--samples 100] [--n 4]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from diffucode import Engine
from diffucode.daemon.engine.options import ALTERNATIVES_TEMPERATURE
from diffucode.daemon.errors import InputError
from diffucode.quality import samples, score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--set", dest="which", choices=["stdlib", "packages"], default="stdlib")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--n", type=int, default=4, help="alternatives per case")
    ap.add_argument("--temperature", type=float, default=ALTERNATIVES_TEMPERATURE)
    ap.add_argument("--canvas", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cpu", decoding="exact")
    cases = samples(args.samples, args.seed, args.which)
    picks: dict[str, list[str]] = {"greedy": [], "coupled likelihood": [], "mean confidence": []}
    any_right, offered = 0, 0
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        alts = engine.alternatives(case.before, case.after, args.n, temperature=args.temperature,
                                   max_new_tokens=args.canvas, seed=i)
        offered += len(alts)
        first = [a.answer.text.split("\n", 1)[0] for a in alts]
        picks["greedy"].append(next(t for a, t in zip(alts, first) if a.temperature == 0.0))
        picks["coupled likelihood"].append(first[0])  # alts come best first by the coupled likelihood
        picks["mean confidence"].append(max(zip(alts, first), key=lambda p: p[0].confidence)[1])
        truth = case.middle.split("\n", 1)[0].rstrip()
        any_right += any(t.rstrip() == truth for t in first)
    seconds = time.perf_counter() - t0
    tok = engine.tasks.tok
    rows = {name: score(preds, cases, tok) for name, preds in picks.items()}
    rows["any alternative (ceiling)"] = {"exact_match": round(100 * any_right / len(cases), 1)}
    print(f"alternatives: {len(cases)} held-out single lines ({args.which}, seed {args.seed}), canvas {args.canvas}, "
          f"n {args.n} at temperature {args.temperature:g}; {offered / len(cases):.1f} distinct per case; "
          f"{seconds:.0f} s on {platform.machine()} {os.cpu_count()} cores")
    print(f"{'pick':28s} {'exact':>7s} {'edit sim':>8s}")
    for name, r in rows.items():
        sim = f"{r['edit_similarity']:7.1f}%" if "edit_similarity" in r else f"{'':8s}"
        print(f"{name:28s} {r['exact_match']:6.1f}% {sim}")
    print(json.dumps({"benchmark": "alternatives", "set": args.which, "samples": len(cases), "n": args.n,
                      "temperature": args.temperature, "canvas": args.canvas, "distinct_per_case":
                      round(offered / len(cases), 2), "seconds": round(seconds, 1), "rows": rows}))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as e:
        raise SystemExit(f"alternatives.py: {e}")
