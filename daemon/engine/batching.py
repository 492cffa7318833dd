"""Requests from different editor windows denoised together: one forward pass per step for all.

Which requests may share a batch (`batch_key`): completions or infills with one canvas size,
the same decoding (exact or fast), the same sampling settings, and deterministic decoding
(temperature 0, no alg_temp, not `origin`), because then a row's result does not depend on its
batch-mates: the batch gives each request what it would get alone. Sampled requests run alone
(their random draws would differ in a batch), and so do requests that use the per-document
prefix cache. (The scheduler adds its own condition: requests with a deadline batch only with
requests that have one, as the earliest deadline finishes the whole batch.)

`run_batch` lays the sequences out as the tasks do, left-pads them (network.padding_inputs: the
reference's rules), denoises them (sampler.denoise or fast.denoise_fast), and calls each
request's own per-step callback with its own row. A request whose callback raises Cancelled is
settled at once (sampler.Drop): fast decoding takes its row out of the batch, exact decoding keeps
computing it and ignores it; the others go on.

Knows tasks, the samplers and callbacks; not sockets, not the scheduler's queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import Cancelled
from .network import padding_inputs
from .options import Options
from .sampler import FINISH, Drop, Step


@dataclass
class BatchItem:
    task: str  # "complete" | "infill"
    before: str
    after: str
    opts: Options
    budget: tuple[int | None, int | None] = (None, None)
    callback: Callable[[Step], str | None] | None = None  # may raise Cancelled, may return FINISH
    lengths: list[int] | None = None


def batch_key(tasks, method: str, s: Options, lengths: list[int] | None = None,
              budget: tuple[int | None, int | None] = (None, None)) -> tuple | None:
    """Requests with equal keys can run as one batch; None: this request runs alone."""
    if method not in ("complete", "infill") or (lengths and len(set(lengths)) > 1):
        return None
    if tasks.uses_prefix_cache(s) or s.length == "auto":  # (auto: each request's canvas is its own)
        return None
    if s.temperature > 0 or s.alg_temp or s.alg == "origin":
        return None
    canvas = lengths[0] if lengths else s.max_new_tokens
    steps = s.steps if lengths is None else (s.steps, s.max_new_tokens)
    return (method, canvas, tasks.decoding_of(s), steps, s.alg, s.top_p, s.top_k, s.eps, s.threshold,
            s.block_size, budget[0] is None, budget[1] is None)


def run_batch(tasks, items: list[BatchItem], settle: Callable[[int, object], None]) -> None:
    """Denoise the items as one batch; `settle(i, outcome)` gets each item's Answer or exception
    as soon as it is known (a cancelled item at the step it is dropped)."""
    mask_id = tasks.ckpt.mask_id
    plans, kept, rows = [], [], []
    for i, item in enumerate(items):
        n = item.lengths[0] if item.lengths else item.opts.max_new_tokens
        try:
            tasks.check(item.opts, item.lengths, before=item.before, after=item.after)
            (plan,), context = tasks.plan_infill(item.task, item.before, item.after, [n], item.budget)
            plans.append(plan)
            kept.append(context)
            rows.append(i)
        except Exception as e:  # a request over a limit fails alone
            settle(i, e)
    if not rows:
        return
    width = max(len(ids) for ids, _, _ in plans)
    pad = tasks.ckpt.config.pad_token_id if tasks.ckpt.config.pad_token_id is not None else 0
    x = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in plans], device=tasks.ckpt.device)
    present = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in plans],
                           device=tasks.ckpt.device)
    attention_mask, position_ids = padding_inputs(present)
    starts = [width - len(ids) + start for ids, start, _ in plans]
    n = plans[0][2]
    alive = set(range(len(rows)))

    def on_step(step: Step):
        dropped, finish = [], False
        for r in sorted(alive):
            item = items[rows[r]]
            if item.callback is None:
                continue
            own = Step(step.index, step.steps, step.x[r:r + 1], step.revealed[r:r + 1],
                       int((step.x[r] == mask_id).sum()))
            own.text = tasks.preview(step.x[r, starts[r]:starts[r] + n].tolist())
            try:
                finish = item.callback(own) == FINISH or finish
            except Cancelled as e:
                dropped.append(r)
                alive.discard(r)
                settle(rows[r], e)
        if dropped:
            if not alive:
                raise Cancelled("every request of the batch was cancelled")
            return Drop(dropped, finish=finish)
        return FINISH if finish else None

    try:
        result = tasks.denoise(x, items[rows[0]].opts, n, on_step, cut_at_end=True,
                               attention_mask=attention_mask, position_ids=position_ids)
    except Cancelled:
        return
    except Exception as e:
        for r in sorted(alive):
            settle(rows[r], e)
        return
    for r in sorted(alive):
        cand, region, conf, order = tasks.candidate(result, r, starts[r], n)
        settle(rows[r], tasks.answer(region, conf, result, order, context=kept[r]))
