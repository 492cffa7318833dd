"""Alternatives for one cursor, sampled as one batch and ranked by the coupled likelihood.

A higher temperature diversifies the order of decoding as well as the tokens (DiffuCoder's
finding), so alternatives are the greedy answer plus n - 1 rows sampled at `temperature` in one
batch: each row draws its own tokens and its own order. They are de-duplicated by text and ranked
by the coupled complementary-mask estimate of the middle's log-likelihood that coupled-GRPO uses:
with t drawn once per alternative, one pass masks a random fraction t of the middle, a second
masks exactly the rest, a third masks all of it (the code before and after is never masked);

    estimate = ( (1/t) sum_{M1} log p  +  (1/(1-t)) sum_{M2} log p ) / 2,  averaged with sum_{all} log p

divided by the middle's length (a per-token score, so lengths compare fairly). Each token is
scored exactly once in the coupled pair, which is what lowers the variance against one random
mask. The passes of all alternatives run as one left-padded batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .coupled import Pass, complementary, pass_logps
from .options import ALTERNATIVES_TEMPERATURE, Options

if TYPE_CHECKING:  # (tasks.py reaches this module through refine.py)
    from .tasks import Answer, Tasks


@dataclass
class Alternative:
    answer: Answer
    score: float  # coupled log-likelihood per token (higher is more likely); -inf for an empty middle
    temperature: float  # 0: the greedy answer

    @property
    def confidence(self) -> float:
        """Mean confidence of its tokens: the ranking the coupled score is measured against."""
        c = self.answer.confidence
        return sum(c) / len(c) if c else 0.0

    def summary(self) -> dict:
        return {"text": self.answer.text, "score": self.score, "confidence": round(self.confidence, 4),
                "temperature": self.temperature, "tokens": self.answer.tokens, "order": self.answer.order,
                "ar_ness": self.answer.ar_ness}


@torch.inference_mode()
def coupled_logliks(tasks: Tasks, before: list[int], middles: list[list[int]], after: list[int], task: str = "infill",
                    seed: int = 0) -> list[float]:
    """The coupled complementary-mask log-likelihood per token of each middle between the same
    code before and after (see the module docstring); -inf for an empty middle."""
    passes, owners = [], []
    for k, middle in enumerate(middles):
        if not middle:
            continue
        rng = random.Random(f"{seed}:{','.join(map(str, middle))}")  # a middle's masks do not depend on the others
        ids, start = tasks._layout(task, before, middle, after)
        tasks._check_sequence(len(ids))
        first, second, t = complementary(len(middle), rng)
        for masked, weight in ((first, 1 / t), (second, 1 / (1 - t) if t < 1 else 0.0),
                               (list(range(len(middle))), 1.0)):
            passes.append(Pass(ids, start, masked))
            owners.append((k, weight))
    scores = [-math.inf] * len(middles)
    pad = tasks.ckpt.config.pad_token_id if tasks.ckpt.config.pad_token_id is not None else 0
    sums: dict[int, list[float]] = {}
    for (k, weight), logp in zip(owners, pass_logps(tasks.ckpt.network, passes, tasks.ckpt.mask_id, pad)):
        sums.setdefault(k, []).append(weight * float(logp.sum()))
    for k, (pair_a, pair_b, full) in sums.items():
        scores[k] = ((pair_a + pair_b) / 2 + full) / 2 / len(middles[k])
    return scores


def alternatives(tasks: Tasks, before: str, after: str, opts: Options, n: int,
                 temperature: float = ALTERNATIVES_TEMPERATURE, budget: tuple[int | None, int | None] = (None, None),
                 task: str = "infill", callback=None) -> list[Alternative]:
    """Up to n different middles for one cursor, best first by the coupled likelihood: the greedy
    answer and n - 1 sampled in one batch at `temperature`. `callback` is the tasks' per-step
    callback (cancel, deadline), called for the greedy run and the sampled batch."""
    greedy = tasks.infill(before, after, replace(opts, temperature=0.0), task=task, budget=budget, callback=callback)
    found = [(greedy, 0.0)]
    canvas = opts.max_new_tokens
    # the code around the cursor, tokenized once for the sampled rows and the scores (as the greedy run cut it)
    b, a = tasks._context(before, after, budget, reserve=canvas + tasks.template_tokens)
    if n > 1:
        sampled_opts = replace(opts, temperature=temperature, seed=opts.seed + 1)
        ids, start = tasks._layout(task, b, [tasks.ckpt.mask_id] * canvas, a)
        x = torch.tensor([ids] * (n - 1), device=tasks.ckpt.device)
        result = tasks.denoise(x, sampled_opts, canvas, callback, cut_at_end=True)
        for row in range(n - 1):
            _, region, conf, order = tasks.candidate(result, row, start, canvas)
            found.append((tasks.answer(region, conf, result, order), temperature))
    unique: dict[str, tuple[Answer, float]] = {}
    for ans, t in found:
        unique.setdefault(ans.text, (ans, t))
    kept = list(unique.values())
    scores = coupled_logliks(tasks, b, [ans.ids for ans, _ in kept], a, task, seed=opts.seed)
    ranked = [Alternative(ans, round(s, 4) if math.isfinite(s) else s, t) for (ans, t), s in zip(kept, scores)]
    return sorted(ranked, key=lambda alt: alt.score, reverse=True)
