"""Refine against a line broken on purpose: how often it fixes it, and how often it changes a line
that was right, with the line guard (engine/refine.py) and without it, in one run.

Cases: functions of held-out standard-library files (diffucode.heldout) with 3 to 12 body lines;
in each, one line is broken the way people break code: a comparison or arithmetic operator
flipped (`<` for `>`, `==` for `!=`, `+` for `-`, `and` for `or`), or a name replaced by another
name of the same function. The body is refined (`fraction` of its tokens re-masked). Reported:
fixed (the broken line is exactly the original again), harmed (a line that was right is changed),
lines changed per case.

    python benchmarks/refine.py [--model DIR] [--samples 40] [--fraction 0.3]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import time

from diffucode import Engine
from diffucode import heldout

FLIPS = [(" < ", " > "), (" > ", " < "), (" == ", " != "), (" != ", " == "), (" + ", " - "), (" - ", " + "),
         (" and ", " or "), (" or ", " and "), (" <= ", " >= "), (" >= ", " <= ")]
NAME = re.compile(r"\b[a-z_][a-z0-9_]*\b")
KEYWORDS = {"if", "else", "elif", "for", "in", "not", "and", "or", "return", "def", "while", "is", "none",
            "true", "false", "self", "try", "except", "with", "as", "pass", "break", "continue", "lambda", "yield"}


def cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = sorted((d for held, d in heldout.stdlib_docs() if held), key=lambda d: d.path)
    out, tries = [], 0
    while len(out) < n and tries < 200 * n:
        tries += 1
        doc = rng.choice(docs)
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        funcs = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and 3 <= f.end_lineno - f.lineno <= 12]
        if not funcs:
            continue
        f = rng.choice(funcs)
        lines = doc.text.split("\n")
        body = lines[f.body[0].lineno - 1:f.end_lineno]
        if any(len(l) > 100 for l in body):
            continue
        names = sorted({m for l in body for m in NAME.findall(l)} - KEYWORDS)
        spots = [(i, a, b) for i, l in enumerate(body) for a, b in FLIPS if a in l]
        spots += [(i, f"\\b{m}\\b", o) for i, l in enumerate(body) for m in NAME.findall(l) if m in names
                  for o in names[:3] if o != m]
        if not spots:
            continue
        i, a, b = rng.choice(spots)
        broken = re.sub(a, b, body[i], count=1) if a.startswith("\\b") else body[i].replace(a, b, 1)
        if broken == body[i]:
            continue
        before = "\n".join(lines[max(0, f.body[0].lineno - 1 - 60):f.body[0].lineno - 1]) + "\n"
        out.append({"before": before, "body": body, "line": i, "broken": broken,
                    "source": f"{doc.path}:{f.name}"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cpu")
    todo = cases(args.samples, args.seed)
    rows = {}
    for guard in (False, True):
        fixed = harmed = changed = 0
        t0 = time.perf_counter()
        for k, c in enumerate(todo):
            body = list(c["body"])
            body[c["line"]] = c["broken"]
            span = "\n".join(body) + "\n"
            ans = engine.refine(c["before"], span, "\n", fraction=args.fraction, guard=guard, seed=k)
            new = ans.text.split("\n")
            fixed += len(new) > c["line"] and new[c["line"]] == c["body"][c["line"]]
            harmed += any(j != c["line"] and (j >= len(new) or new[j] != c["body"][j]) for j in range(len(body)))
            changed += ans.refined.get("changed", 0)
        name = "with the line guard" if guard else "every rewrite (before)"
        rows[name] = {"fixed": round(100 * fixed / len(todo), 1), "harmed": round(100 * harmed / len(todo), 1),
                      "lines_changed_per_case": round(changed / len(todo), 2),
                      "seconds": round(time.perf_counter() - t0, 1)}
    print(f"refine: {len(todo)} held-out stdlib functions, one line broken (operator or name), fraction "
          f"{args.fraction}; {platform.machine()} {os.cpu_count()} cores")
    print(f"{'refine':26s} {'fixed':>7s} {'harmed':>7s} {'changed':>8s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['fixed']:6.1f}% {r['harmed']:6.1f}% {r['lines_changed_per_case']:8.2f}")
    print(json.dumps({"benchmark": "refine", "samples": len(todo), "fraction": args.fraction, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
