"""Complementary masks, and one batched forward pass that scores masked positions.

Coupled sampling (DiffuCoder's coupled-GRPO) estimates a masked diffusion model's likelihood of
a span from two passes whose masks are complements: a random fraction t of the span masked in
one, exactly the rest in the other, so every token is predicted exactly once, weighted 1/t or
1/(1-t). Against independent random masks this is an antithetic pair: it lowers the variance of
the estimate at the same number of forward passes (benchmarks/coupled_variance.py measures it).

Two users share these pieces: ranking.py scores alternatives for one cursor (no gradient), and
tune/grpo.py trains on the same estimate (with a gradient through a LoRA adapter). Token ids and
the network only: no text, no sampling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from .network import padding_inputs

T_RANGE = (0.2, 0.8)  # away from 0 and 1, where 1/t or 1/(1-t) would blow up one side


def complementary(n: int, rng: random.Random) -> tuple[list[int], list[int], float]:
    """Positions 0..n-1 split into a random fraction t (drawn from T_RANGE) and the rest, both
    sorted, and the fraction actually taken (each side non-empty when n > 1)."""
    if n <= 1:
        return list(range(n)), [], 1.0
    t = rng.uniform(*T_RANGE)
    first = sorted(rng.sample(range(n), max(1, min(n - 1, round(t * n)))))
    taken = set(first)
    return first, [i for i in range(n) if i not in taken], len(first) / n


@dataclass
class Pass:
    """One row of the batch: the sequence with `masked` positions (counted from `start`) replaced
    by the mask token, scored against the original ids there."""

    ids: list[int]  # the whole sequence, unmasked
    start: int  # where the scored span starts in ids
    masked: list[int]  # offsets from start


def pass_logps(network: nn.Module, passes: list[Pass], mask_id: int, pad_id: int) -> list[torch.Tensor]:
    """log p(original token) at each masked position of each pass, from one left-padded batch:
    one tensor (len(masked),) per pass, in `masked` order. Differentiable when grad is enabled."""
    if not passes:
        return []
    device = next(network.parameters()).device
    width = max(len(p.ids) for p in passes)
    rows, truth = [], []
    for p in passes:
        row = list(p.ids)
        for i in p.masked:
            row[p.start + i] = mask_id
        rows.append([pad_id] * (width - len(row)) + row)
        truth.append([p.ids[p.start + i] for i in p.masked])
    x = torch.tensor(rows, device=device)
    present = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in passes], device=device)
    attention_mask, position_ids = padding_inputs(present)
    P = max(1, max(len(p.masked) for p in passes))
    predict = torch.zeros(len(passes), P, dtype=torch.long, device=device)
    target = torch.zeros(len(passes), P, dtype=torch.long, device=device)
    for r, p in enumerate(passes):
        if p.masked:
            predict[r, :len(p.masked)] = torch.tensor([width - len(p.ids) + p.start + i for i in p.masked])
            target[r, :len(p.masked)] = torch.tensor(truth[r])
    logits = network(x, attention_mask=attention_mask, position_ids=position_ids, predict_positions=predict).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None])[..., 0]  # (B, P)
    return [logp[r, :len(p.masked)] for r, p in enumerate(passes)]
