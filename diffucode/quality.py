"""Infill quality on code the model never trained on, scored beside trivial baselines.

Each case removes whole lines from a held-out file that parses (diffucode.heldout: the split the
training data uses) and asks the model to fill them from the code before and after, the trailing
newline being part of the middle:
- single: one non-blank line (under 100 characters); the answer's first line is scored;
- multi: 2 to 6 consecutive lines starting with a non-blank one; the whole answer is scored.

Scores: exact match (trailing whitespace and trailing blank lines ignored), edit similarity
(difflib's ratio, as fuzzywuzzy's and CodeXGLUE's), the share of answers with which the file still
parses (ast), and token accuracy (the true tokens matched at the same position). Baselines,
scored the same way: an empty middle; `pass` at the indentation an editor would give (that of the
line above, one level deeper after a colon); a copy of the line above. benchmarks/quality.py
runs it from the command line; `diffucode bench` uses it for its quality guard.
"""

from __future__ import annotations

import ast
import difflib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffucode import heldout
from diffucode.daemon.errors import InputError

if TYPE_CHECKING:
    from diffucode.daemon.engine.api import Engine
    from diffucode.daemon.engine.options import Options


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


def held_out_docs(which: str) -> list[heldout.Doc]:
    """The held-out standard-library files ("stdlib", always here), or the held-out packages
    ("packages", from the corpus that `python training/data.py build` writes)."""
    if which == "stdlib":
        return [d for held, d in heldout.stdlib_docs() if held]
    corpus = heldout.DEFAULT_HOME / "corpus"
    if not (corpus / "held_out.jsonl").exists():
        raise InputError(f"the held-out packages are not here ({corpus}): build them with "
                         f"`python training/data.py build` (downloads the pinned packages), or use --set stdlib")
    return [d for d in heldout.read_split(corpus, "held_out") if d.source != "stdlib"]


def parses(text: str) -> bool:
    """Whether `text` is valid Python (ast.parse); also tune's format reward."""
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
            raise InputError(f"found only {len(out)} {kind} cases of the {n} asked for in the {which} held-out set")
        j = rng.randrange(len(docs))
        lines = docs[j].text.split("\n")
        size = 1 if kind == "single" else rng.randint(2, 6)
        starts = [i for i in range(1, len(lines) - size) if lines[i].strip()
                  and all(len(l) < 100 for l in lines[i:i + size])]
        if not starts:
            continue
        if j not in parsed:
            parsed[j] = parses(docs[j].text)
        if not parsed[j]:
            continue
        i = rng.choice(starts)
        out.append(Case(before="\n".join(lines[max(0, i - before_lines):i]) + "\n",
                        middle="\n".join(lines[i:i + size]) + "\n",
                        after="\n".join(lines[i + size:i + size + after_lines]),
                        line_above=lines[i - 1], source=f"{docs[j].source}/{docs[j].path}", kind=kind))
    return out


def fill(engine: Engine, cases: list[Case], opts: Options) -> list:
    """The model's answer to each case."""
    return [engine.infill(c.before, c.after, opts=opts) for c in cases]


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
    exact = similar = parsed = tokens = 0.0
    for pred, case in zip(preds, cases):
        p, t = scored_text(pred, case), scored_text(case.middle, case)
        exact += p == t
        similar += difflib.SequenceMatcher(None, p, t, autojunk=False).ratio()
        placed = p + "\n" if p else ""
        parsed += parses(case.before + placed + case.after)
        tt, pt = tok.encode(t), tok.encode(p)
        tokens += sum(a == b for a, b in zip(tt, pt)) / max(1, len(tt))
    n = max(1, len(cases))
    return {"exact_match": round(100 * exact / n, 1), "edit_similarity": round(100 * similar / n, 1),
            "parses": round(100 * parsed / n, 1), "token_accuracy": round(100 * tokens / n, 1)}


BASELINES = {
    "baseline: empty": lambda c: "",
    "baseline: pass": editor_pass,
    "baseline: line above": lambda c: c.line_above,
}
