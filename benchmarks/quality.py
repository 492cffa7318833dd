"""Infill quality on held-out code, next to trivial baselines, in one run.

Cases come from code the bundled model never trained on: the held-out packages of the corpus
(training/data.py; a package's files are all held out or all trained on), or, with
`--set stdlib`, the held-out files of this Python's standard library (no download needed).
Each case removes whole lines from a file that parses and asks the model to fill them from the
code before and after, the trailing newline being part of the middle:
- single: one non-blank line (under 100 characters); the answer's first line is scored;
- multi: 2 to 6 consecutive lines starting with a non-blank one; the whole answer is scored.

Reported per method: exact match (trailing whitespace and trailing blank lines ignored), edit
similarity (difflib's ratio, as fuzzywuzzy's and CodeXGLUE's), the share of answers with which the
file still parses (ast), and token accuracy (the true tokens matched at the same position).
Baselines, scored the same way: an empty middle; `pass` at the indentation an editor would give
(that of the line above, one level deeper after a colon); a copy of the line above. For each
model and decoding: seconds, forward passes per case and per answer token.

    python benchmarks/quality.py [--model DIR[,DIR2]] [--set packages|stdlib] [--samples 200]
        [--multi-samples 100] [--decoding fast,exact] [--canvas 24] [--multi-canvas 96]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from diffucode.daemon.engine.options import DECODINGS, Options
from diffucode.daemon.errors import InputError

from diffucode import Engine
from diffucode.quality import BASELINES, fill, samples, score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint(s), comma-separated (default: the bundled model)")
    ap.add_argument("--set", dest="which", choices=["packages", "stdlib"], default="packages",
                    help="held-out packages of the corpus (default) or held-out standard-library files")
    ap.add_argument("--samples", type=int, default=200, help="single-line cases")
    ap.add_argument("--multi-samples", type=int, default=100, help="multi-line cases (0: none)")
    ap.add_argument("--canvas", type=int, default=24, help="masks for a single line (end tokens shrink it)")
    ap.add_argument("--multi-canvas", type=int, default=96, help="masks for several lines")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: one per mask)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--decoding", default="fast,exact",
                    help="comma-separated decodings to score, each a row: exact, fast (default both)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    decodings = args.decoding.split(",")
    for d in decodings:
        if d not in DECODINGS:
            raise SystemExit(f"--decoding {d!r} is unknown (use exact, fast or both, comma-separated)")
    from diffucode.models import default_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = args.model.split(",") if args.model else [str(default_model())]
    sets = {"single": (samples(args.samples, args.seed, args.which, "single"), args.canvas)}
    if args.multi_samples:
        sets["multi"] = (samples(args.multi_samples, args.seed, args.which, "multi"), args.multi_canvas)
    report = {"benchmark": "quality", "set": args.which, "seed": args.seed, "steps": args.steps,
              "hardware": f"{platform.machine()} {os.cpu_count()} cores", "models": models, "kinds": {}}
    for kind, (cases, canvas) in sets.items():
        rows, timing = {}, {}
        for m in models:
            engine = Engine.load(m, device="cpu")
            label = Path(m).name
            for d in decodings:
                t0 = time.perf_counter()
                answers = fill(engine, cases, Options(max_new_tokens=canvas, steps=args.steps, decoding=d))
                rows[f"{label}, {d}"] = score([a.text for a in answers], cases, engine.tasks.tok)
                passes = sum(a.forward_passes for a in answers)
                kept = sum(len(a.tokens) for a in answers)
                timing[f"{label}, {d}"] = {"seconds": round(time.perf_counter() - t0, 1),
                                           "passes_per_case": round(passes / len(cases), 2),
                                           "passes_per_answer_token": round(passes / max(1, kept), 3),
                                           "answer_tokens": round(kept / len(cases), 1)}
        for name, baseline in BASELINES.items():
            rows[name] = score([baseline(c) for c in cases], cases, engine.tasks.tok)
        lines = sum(c.lines for c in cases) / len(cases)
        print(f"{kind}-line infill: {len(cases)} held-out cases ({args.which}, seed {args.seed}, {lines:.1f} lines "
              f"each), canvas {canvas}")
        print(f"{'method':34s} {'exact':>7s} {'edit sim':>8s} {'parses':>7s} {'tok acc':>7s} "
              f"{'seconds':>8s} {'passes':>7s} {'per tok':>7s}")
        for name, r in rows.items():
            t = timing.get(name)
            extra = (f" {t['seconds']:8.1f} {t['passes_per_case']:7.1f} {t['passes_per_answer_token']:7.3f}"
                     if t else "")
            print(f"{name:34s} {r['exact_match']:6.1f}% {r['edit_similarity']:7.1f}% {r['parses']:6.1f}% "
                  f"{r['token_accuracy']:6.1f}%{extra}")
        report["kinds"][kind] = {"samples": len(cases), "canvas": canvas, "rows": rows, "timing": timing}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as e:  # e.g. the held-out packages are not built: one line, not a traceback
        raise SystemExit(f"quality.py: {e}")
