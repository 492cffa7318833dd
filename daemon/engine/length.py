"""The middle's length, chosen per request from one forward pass (`Options.length = "auto"`).

A fixed canvas is the largest quality loss of diffusion infill: too short cuts the middle, too
long invites filler. The bundled model (and DiffuCoder's training) fills the positions after a
middle with end tokens, so one forward pass over a fully masked canvas of the upper bound
(`max_new_tokens`) says, at each position, how likely the middle has already ended there. The
chosen length is the expected number of positions that are not an end token (the sum of
1 - P(end) over the canvas: end-token density), rounded up, plus a little slack so that a middle
the model is unsure about is not cut; the middle is then decoded on a canvas of that size. One
forward pass more than a fixed canvas; benchmarks/length.py measures it against fixed canvases
and against trying several sizes (`lengths`).
"""

from __future__ import annotations

import math

import torch

SLACK = 1.25  # canvas = expected length x SLACK (at least +2 positions), within [1, max_new_tokens]


@torch.inference_mode()
def end_probabilities(tasks, ids: list[int], start: int, n: int) -> list[float]:
    """P(an end token) at each of the n masked positions from `start`, all of them masked."""
    x = torch.tensor([ids], device=tasks.ckpt.device)
    positions = torch.arange(start, start + n, device=x.device)[None]
    logits = tasks.ckpt.network(x, predict_positions=positions).logits[0].float()  # (n, V)
    probs = torch.softmax(logits, dim=-1)
    ends = torch.tensor(list(tasks.end_ids), dtype=torch.long, device=x.device)
    return probs[:, ends].sum(dim=-1).tolist()


def chosen_length(p_end: list[float]) -> int:
    """The canvas for a middle whose end probabilities over the upper-bound canvas are p_end."""
    expected = sum(1.0 - p for p in p_end)
    return max(1, min(len(p_end), math.ceil(max(expected * SLACK, expected + 2))))
