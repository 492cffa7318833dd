"""Where to cut a suggestion by the model's confidence: the accepted-as-is rate against the length
of what is shown, for a range of thresholds, on held-out single lines (diffucode.quality's cases).

Each case is a held-out line as an editor meets it: the line emptied, the cursor after its
indentation (where an editor's auto-indent leaves it after Enter), the code after it on the next
lines. The model answers once per case (the engine's defaults, a canvas of --canvas tokens); every
threshold then post-processes the same answer as the language server does (lsp/postprocess.py:
cut before the first token less confident than the threshold, then the other rules). Reported
per threshold, over all cases:

- shown: a suggestion is left to show;
- accepted: it is accepted as-is, i.e. it is the true line (without its indentation) or a prefix
  of it: accepting it keeps all of it and the user types the rest (equal: exact);
- kept/shown: accepted among the shown suggestions;
- length: mean characters of the shown suggestions; chars/case: characters accepted per case.

The rule that picks the default (lsp/settings.py `min_confidence`): the threshold with the most
characters accepted per case, the lower one on a tie; printed with its figures. A second table
compares the cut at the token (inside a word) with the cut back to the start of the word.

    python benchmarks/confidence_cut.py [--model DIR] [--set stdlib|packages] [--samples 150] [--canvas 16]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from diffucode import Engine
from diffucode.daemon.errors import InputError
from diffucode.lsp.postprocess import cut_at_confidence, postprocess
from diffucode.quality import samples

THRESHOLDS = [0.0, 0.05, 0.1, 0.15] + [round(0.1 * i, 1) for i in range(2, 10)]  # finer where the model sits


def editor_case(case) -> tuple[str, str, str]:
    """(before, after, truth): the cursor after the emptied line's indentation."""
    line = case.middle.split("\n", 1)[0]
    indent = line[:len(line) - len(line.lstrip())]
    return case.before + indent, "\n" + case.after, line.strip()


def row(shown: list[str | None], truths: list[str]) -> dict:
    n = max(1, len(truths))
    pairs = [(s, t) for s, t in zip(shown, truths) if s is not None]
    accepted = [s for s, t in pairs if t.startswith(s)]
    return {"shown": round(100 * len(pairs) / n, 1), "accepted": round(100 * len(accepted) / n, 1),
            "exact": round(100 * sum(s == t for s, t in pairs) / n, 1),
            "kept_of_shown": round(100 * len(accepted) / max(1, len(pairs)), 1),
            "length": round(sum(len(s) for s, _ in pairs) / max(1, len(pairs)), 1),
            "chars_per_case": round(sum(len(s) for s in accepted) / n, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--set", dest="which", choices=["stdlib", "packages"], default="stdlib")
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--canvas", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--decoding", choices=["exact", "fast"], default=None, help="default: the engine's (the daemon's)")
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cpu", **({"decoding": args.decoding} if args.decoding else {}))
    cases = [editor_case(c) for c in samples(args.samples, args.seed, args.which)]
    t0 = time.perf_counter()
    answers = [engine.infill(before, after, max_new_tokens=args.canvas) for before, after, _ in cases]
    seconds = time.perf_counter() - t0
    truths = [truth for _, _, truth in cases]

    rows, in_words = {}, {}
    for t in THRESHOLDS:
        rows[t] = row([postprocess(a.text, b, af, a.tokens, a.confidence, t)
                       for a, (b, af, _) in zip(answers, cases)], truths)
        # the same cut left inside a word (no going back to the word's start)
        in_words[t] = row([postprocess(cut_at_confidence(a.text, a.tokens, a.confidence, t, whole_words=False), b, af)
                           for a, (b, af, _) in zip(answers, cases)], truths)
    chosen = max(THRESHOLDS, key=lambda t: (rows[t]["chars_per_case"], -t))

    print(f"confidence cut: {len(cases)} held-out single lines ({args.which}, seed {args.seed}), canvas {args.canvas}, "
          f"decoding {engine.tasks.decoding}; model {seconds:.0f} s on {platform.machine()} {os.cpu_count()} cores")
    print(f"{'threshold':>9s} {'shown':>7s} {'accepted':>8s} {'exact':>6s} {'kept/shown':>10s} {'length':>7s} "
          f"{'chars/case':>10s}   cut inside words: {'accepted':>8s} {'chars/case':>10s}")
    for t in THRESHOLDS:
        r, w = rows[t], in_words[t]
        print(f"{t:9.2f} {r['shown']:6.1f}% {r['accepted']:7.1f}% {r['exact']:5.1f}% {r['kept_of_shown']:9.1f}% "
              f"{r['length']:7.1f} {r['chars_per_case']:10.2f}   {'':18s}{w['accepted']:7.1f}% {w['chars_per_case']:10.2f}")
    r = rows[chosen]
    print(f"chosen: min_confidence {chosen:g} (the most characters accepted as-is per case, the lower threshold on a "
          f"tie): {r['accepted']:.1f}% accepted as-is ({r['kept_of_shown']:.1f}% of the {r['shown']:.1f}% shown), "
          f"mean length {r['length']:.1f} characters, {r['chars_per_case']:.2f} characters kept per case; "
          f"threshold 0: {rows[0.0]['accepted']:.1f}% accepted ({rows[0.0]['kept_of_shown']:.1f}% of shown), "
          f"length {rows[0.0]['length']:.1f}, {rows[0.0]['chars_per_case']:.2f} per case")
    print(json.dumps({"benchmark": "confidence_cut", "set": args.which, "samples": len(cases), "seed": args.seed,
                      "canvas": args.canvas, "decoding": engine.tasks.decoding, "seconds": round(seconds, 1),
                      "chosen": chosen, "rows": {str(t): rows[t] for t in THRESHOLDS},
                      "cut_inside_words": {str(t): in_words[t] for t in THRESHOLDS}}))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as e:
        raise SystemExit(f"confidence_cut.py: {e}")
