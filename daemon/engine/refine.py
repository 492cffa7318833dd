"""Refine: rewrite a span in place, and keep only the lines the model itself prefers rewritten.

The span's tokens are scored by the model (Tasks.score: each token with a share of its
neighbours masked), the least confident `fraction` re-masked and denoised again. A rewrite can be
worse than what was there, by the model's own measure: so each line of the span whose tokens
changed is judged with the coupled likelihood (ranking.py) of the whole span, with that line as it
was and as rewritten (the others as they were), and the rewrite is kept only where the span scores
higher with it. The answer says how many lines changed and how many were kept ("the model preferred
them"). End tokens revealed inside the span delete that position; nothing outside the span
changes.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..errors import InputError
from .options import Options
from .ranking import coupled_logliks


def line_of_each_token(tok, ids: list[int]) -> list[int]:
    """The line (0-based, within the span) where each token's text starts."""
    lines, line = [], 0
    for t in ids:
        lines.append(line)
        line += tok.decode([t]).count("\n")
    return lines


def refine_span(tasks, before: str, span: str, after: str, opts: Options, fraction: float, callback, budget,
                group, guard: bool = True):
    tasks.check(opts, before=before, span=span, after=after)
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise InputError(f"fraction must be in (0, 1], got {fraction}")
    s = tasks.tok.encode(span)
    if not s:
        raise InputError("the span to refine is empty")
    tasks._check_canvas(len(s))
    b, a = tasks._context(before, after, budget, reserve=len(s) + tasks.template_tokens)
    lp = tasks.score(b, s, a)
    k = max(1, round(fraction * len(s)))
    remask = sorted(range(len(s)), key=lambda i: lp[i])[:k]
    canvas = list(s)
    for i in remask:
        canvas[i] = tasks.ckpt.mask_id
    ids, start = tasks._layout("refine", b, canvas, a)
    result = tasks._run(ids, replace(opts, max_new_tokens=k, steps=opts.steps and min(opts.steps, k)),
                        k, callback, slice(start, start + len(s)), group)
    region = result.x[0, start:start + len(s)].tolist()
    new_lp = result.logprob[0, start:start + len(s)].tolist()
    steps = result.order[0, start:start + len(s)].tolist()
    lines = line_of_each_token(tasks.tok, s)
    if guard:
        changed, kept = guard_lines(tasks, b, s, lines, region, a, opts.seed)
    else:
        changed, kept = changed_lines(s, lines, region), []
    back = [i for i, line in enumerate(lines) if line in kept]
    for i in back:  # the model preferred what was there: those positions go back
        region[i], steps[i] = s[i], -1
    redone = set(remask) - set(back)
    ids_out, conf, order = [], [], []
    for i, t in enumerate(region):
        if t in tasks.end_ids:
            continue
        ids_out.append(t)
        conf.append(math.exp(new_lp[i] if i in redone else lp[i]))
        order.append(steps[i])
    ans = tasks.answer(ids_out, conf, result, order, context=tasks._kept(before, after, b, a))
    ans.refined = {"lines": len(set(lines)), "changed": len(changed), "kept": len(kept)}
    if ids_out == s:  # unchanged: hand back the caller's exact text
        ans.text = span
    return ans


def changed_lines(s: list[int], lines: list[int], region: list[int]) -> list[int]:
    return sorted({lines[i] for i in range(len(s)) if region[i] != s[i]})


def guard_lines(tasks, before: list[int], s: list[int], lines: list[int], region: list[int], after: list[int],
                seed: int) -> tuple[list[int], list[int]]:
    """The changed lines whose rewrite the model prefers, and those where it prefers what was
    there (to be put back). The span is scored as it was and, for each changed line, with that
    line rewritten (the other lines as they were): all in one batch, the original scored once."""
    touched, variants = [], []
    for line in sorted(set(lines)):
        at = [i for i, n in enumerate(lines) if n == line]
        old = [s[i] for i in at]
        new = [region[i] for i in at if region[i] not in tasks.end_ids]
        if new != old:
            # the whole span with this line rewritten: a rewrite must make the span as a whole more
            # likely (per token), so a deleted or garbled line also costs the lines around it
            touched.append(line)
            variants.append(s[:at[0]] + new + s[at[-1] + 1:])
    if not touched:
        return [], []
    was, *rewritten = coupled_logliks(tasks, before, [s] + variants, after, "refine", seed)
    changed = [line for line, score in zip(touched, rewritten) if score > was]
    return changed, [line for line in touched if line not in changed]
