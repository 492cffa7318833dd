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
import ast
import difflib
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))

import data
from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.engine.tasks import Options, Tasks

DECODINGS = ("exact", "fast")


@dataclass
class Case:
    before: str  # ends with a newline
    middle: str  # the removed lines, each with its newline
    after: str
    line_above: str
    source: str  # package/path
    kind: str  # single or multi

    @property
    def lines(self) -> int:
        return self.middle.count("\n")


def held_out_docs(which: str) -> list[data.Doc]:
    if which == "stdlib":
        return [d for held, d in data.stdlib_docs() if held]
    corpus = data.DEFAULT_HOME / "corpus"
    if not (corpus / "held_out.jsonl").exists():
        raise SystemExit(f"the held-out packages are not here ({corpus}): build them with "
                         f"`python training/data.py build` (downloads the pinned packages), or use --set stdlib")
    return [d for d in data.read_split(corpus, "held_out") if d.source != "stdlib"]


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def samples(n: int, seed: int, which: str = "stdlib", kind: str = "single", before_lines: int = 200,
            after_lines: int = 80) -> list[Case]:
    """n cases drawn deterministically (seed) from the held-out files that parse."""
    rng = random.Random(f"{seed}:{kind}")
    docs = sorted(held_out_docs(which), key=lambda d: (d.source, d.path))
    parsed: dict[int, bool] = {}
    out: list[Case] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise SystemExit(f"found only {len(out)} {kind} cases of the {n} asked for in the {which} held-out set")
        j = rng.randrange(len(docs))
        lines = docs[j].text.split("\n")
        size = 1 if kind == "single" else rng.randint(2, 6)
        starts = [i for i in range(1, len(lines) - size) if lines[i].strip()
                  and all(len(l) < 100 for l in lines[i:i + size])]
        if not starts:
            continue
        if j not in parsed:
            parsed[j] = _parses(docs[j].text)
        if not parsed[j]:
            continue
        i = rng.choice(starts)
        out.append(Case(before="\n".join(lines[max(0, i - before_lines):i]) + "\n",
                        middle="\n".join(lines[i:i + size]) + "\n",
                        after="\n".join(lines[i + size:i + size + after_lines]),
                        line_above=lines[i - 1], source=f"{docs[j].source}/{docs[j].path}", kind=kind))
    return out


def fill(tasks: Tasks, cases: list[Case], opts: Options) -> list:
    """The model's answer to each case."""
    return [tasks.infill(c.before, c.after, opts) for c in cases]


def first_line(answer) -> str:
    """What is scored of a single-line answer: its first line."""
    return answer.text.split("\n", 1)[0]


def scored_text(text: str, case: Case) -> str:
    """The part of a prediction that is scored, normalised: the first line for a single-line case;
    for several lines, each line without trailing whitespace and no trailing blank lines."""
    if case.kind == "single":
        return text.split("\n", 1)[0].rstrip()
    return "\n".join(l.rstrip() for l in text.split("\n")).rstrip("\n")


def editor_pass(case: Case) -> str:
    above = case.line_above
    indent = above[:len(above) - len(above.lstrip())]
    if above.rstrip().endswith(":"):
        indent += "    "
    return indent + "pass"


def score(preds: list[str], cases: list[Case], tok) -> dict:
    exact = similar = parses = tokens = 0.0
    for pred, case in zip(preds, cases):
        p, t = scored_text(pred, case), scored_text(case.middle, case)
        exact += p == t
        similar += difflib.SequenceMatcher(None, p, t, autojunk=False).ratio()
        placed = p + "\n" if p else ""
        parses += _parses(case.before + placed + case.after)
        tt, pt = tok.encode(t), tok.encode(p)
        tokens += sum(a == b for a, b in zip(tt, pt)) / max(1, len(tt))
    n = max(1, len(cases))
    return {"exact_match": round(100 * exact / n, 1), "edit_similarity": round(100 * similar / n, 1),
            "parses": round(100 * parses / n, 1), "token_accuracy": round(100 * tokens / n, 1)}


BASELINES = {
    "baseline: empty": lambda c: "",
    "baseline: pass": editor_pass,
    "baseline: line above": lambda c: c.line_above,
}


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
            tasks = Tasks(load_checkpoint(m, device="cpu"))
            label = Path(m).name
            for d in decodings:
                t0 = time.perf_counter()
                answers = fill(tasks, cases, Options(max_new_tokens=canvas, steps=args.steps, decoding=d))
                rows[f"{label}, {d}"] = score([a.text for a in answers], cases, tasks.tok)
                passes = sum(a.forward_passes for a in answers)
                kept = sum(len(a.tokens) for a in answers)
                timing[f"{label}, {d}"] = {"seconds": round(time.perf_counter() - t0, 1),
                                           "passes_per_case": round(passes / len(cases), 2),
                                           "passes_per_answer_token": round(passes / max(1, kept), 3),
                                           "answer_tokens": round(kept / len(cases), 1)}
        for name, baseline in BASELINES.items():
            rows[name] = score([baseline(c) for c in cases], cases, tasks.tok)
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
    raise SystemExit(main())
