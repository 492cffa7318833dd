"""Rewards for `diffucode tune`: how good is a completion of a masked function body.

The paper's (DiffuCoder's coupled-GRPO) reward: `2.0 * code + 0.5 * format`, where `format` is 1
when the file with the completion in place parses, and `code` is the share of the repository's
tests that pass with it (`TestReward`, run in the sandbox) or, for a repository without tests,
the edit similarity to the body that was masked (`ReconstructionReward`).

It knows nothing of models or tokens: completions are text, targets come from `tune.repo`. No
torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffucode.quality import parses
from diffucode.tune.repo import Target
from diffucode.tune.sandbox import Sandbox, TestRun

CODE_WEIGHT = 2.0
FORMAT_WEIGHT = 0.5


@dataclass
class Reward:
    """`total` = CODE_WEIGHT * code + FORMAT_WEIGHT * format. `tests`: the test run behind `code`
    (None when the tests were not run: the file did not parse, or a reconstruction reward);
    `exact`: the completion equals the masked body (reconstruction only)."""

    total: float
    code: float
    format: float
    tests: TestRun | None = None
    exact: bool = False


def combine(code: float, fmt: float) -> float:
    return CODE_WEIGHT * code + FORMAT_WEIGHT * fmt


def place(target: Target, completion: str) -> str:
    """The file text with `completion` in place of the target's body, given a trailing newline
    when it has none (the model's text is otherwise inserted as is, indentation included)."""
    if not completion.endswith("\n"):
        completion += "\n"
    return target.before + completion + target.after


class TestReward:
    """Reward by the repository's tests, run in `sandbox` (an open Sandbox): code = pass rate.
    A completion whose file does not parse gets format 0 and code 0 without running the tests;
    identical completions in one call run once."""

    __test__ = False  # not a pytest test class

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox

    def __call__(self, target: Target, completions: list[str]) -> list[Reward]:
        done: dict[str, Reward] = {}
        out = []
        for completion in completions:
            text = place(target, completion)
            if text not in done:
                if not parses(text):
                    done[text] = Reward(total=combine(0.0, 0.0), code=0.0, format=0.0)
                else:
                    run = self.sandbox.run({target.path: text})
                    done[text] = Reward(total=combine(run.pass_rate, 1.0), code=run.pass_rate, format=1.0,
                                        tests=run)
            out.append(done[text])
        return out


def normalized(text: str) -> str:
    """Each line without trailing whitespace, no trailing blank lines (as quality.py scores)."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip("\n")


def levenshtein(a: str, b: str) -> int:
    """Edit distance in characters (insert, delete, substitute), O(len(a) * len(b)) time and
    O(min) memory; the common prefix and suffix are dropped first."""
    if a == b:
        return 0
    i = 0
    while i < len(a) and i < len(b) and a[i] == b[i]:
        i += 1
    a, b = a[i:], b[i:]
    j = 0
    while j < len(a) and j < len(b) and a[-1 - j] == b[-1 - j]:
        j += 1
    if j:
        a, b = a[:-j], b[:-j]
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for x, ca in enumerate(a, 1):
        cur = [x]
        for y, cb in enumerate(b, 1):
            cur.append(min(prev[y] + 1, cur[y - 1] + 1, prev[y - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty strings."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1.0 - levenshtein(a, b) / n


class ReconstructionReward:
    """Reward without tests: code = edit similarity between the completion and the masked body
    (both normalized: trailing whitespace and trailing blank lines ignored); `exact` when equal."""

    def __call__(self, target: Target, completions: list[str]) -> list[Reward]:
        truth = normalized(target.body)
        out = []
        for completion in completions:
            guess = normalized(completion)
            code = edit_similarity(guess, truth)
            fmt = 1.0 if parses(place(target, completion)) else 0.0
            out.append(Reward(total=combine(code, fmt), code=code, format=fmt, exact=guess == truth))
        return out
