"""The coupled-GRPO objective (DiffuCoder, arXiv 2506.20639), on token ids and the network.

A completion is the canvas the sampler filled between the code before and after: the middle,
then end tokens to the canvas's end (as the bundled model was trained and as the daemon samples).
Its token log-likelihood under a masked diffusion model is estimated from three passes that
never mask the prompt (daemon/engine/coupled.py):

    full    every canvas position masked
    pair    a random fraction t masked in one pass, exactly the rest in another (weights 1/t, 1/(1-t))

    logp_i = ( full_i + w_i * pair_i ) / 2        for each scored token i (the middle and its first end token)

which is the per-token estimate of the reference implementation. GRPO then compares the policy
with itself before the update (ratio, clipped to 1 +- clip) and with the base model (KL, the k3
estimator), with group-relative advantages from the rewards of the group's completions:

    A_j = r_j - mean_{k != j} r_k                                       (leave-one-out baseline)
    loss = sum_tokens [ -min(ratio * A, clip(ratio) * A) + beta * (exp(ref - new) - (ref - new) - 1) ] / tokens

The masks of update iteration m are drawn from (seed, m, completion index) alone, so the
"old", reference and new estimates of one iteration see the same masks, and a completion's masks
do not depend on which process or batch it lands in (data parallel gives the same update).
No text, no files, no sampling here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from diffucode.daemon.engine.coupled import Pass, complementary, pass_logps


@dataclass
class Completion:
    """One sampled canvas in its prompt, as token ids."""

    ids: list[int]  # the whole sequence: prompt layout with the canvas filled in
    start: int  # where the canvas starts in ids
    canvas: int  # canvas length
    scored: int  # leading canvas tokens in the loss: the middle and the end token that stops it
    key: str  # names it for its masks: the same completion gets the same masks wherever it is scored


def coupled_token_logps(network: nn.Module, completions: list[Completion], mask_id: int, pad_id: int,
                        seed: int) -> list[torch.Tensor]:
    """The coupled per-token log-likelihood estimate of each completion's scored tokens (module
    docstring): one tensor (scored,) each; differentiable when grad is enabled."""
    passes, plan = [], []
    for c in completions:
        rng = random.Random(f"{seed}:{c.key}")
        first, second, t = complementary(c.canvas, rng)
        in_first = torch.zeros(c.canvas, dtype=torch.bool)
        in_first[first] = True
        weights = torch.where(in_first, 1 / t, 1 / (1 - t) if t < 1 else 0.0)
        passes += [Pass(c.ids, c.start, list(range(c.canvas))), Pass(c.ids, c.start, first), Pass(c.ids, c.start, second)]
        plan.append((first, second, weights))
    logps = pass_logps(network, passes, mask_id, pad_id)
    out = []
    for k, (c, (first, second, weights)) in enumerate(zip(completions, plan)):
        full, a, b = logps[3 * k: 3 * k + 3]
        pair = torch.empty(c.canvas, dtype=full.dtype, device=full.device)
        if first:
            pair[first] = a
        if second:
            pair[second] = b
        out.append(((full + weights.to(full.device) * pair) / 2)[:c.scored])
    return out


def leave_one_out(rewards: list[float]) -> list[float]:
    """GRPO's group-relative advantage with a leave-one-out baseline (0 for a group of one)."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    total = sum(rewards)
    return [r - (total - r) / (n - 1) for r in rewards]


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # summed over tokens: divide by all tokens of the update (all processes)
    tokens: int
    kl_sum: float
    clipped: int  # tokens whose ratio was clipped against their advantage


def grpo_loss(new: list[torch.Tensor], old: list[torch.Tensor], ref: list[torch.Tensor], advantages: list[float],
              clip: float, beta: float) -> LossParts:
    """The clipped surrogate and the KL term of every scored token, summed (module docstring)."""
    loss, tokens, kl_sum, clipped = None, 0, 0.0, 0
    for lp, lp_old, lp_ref, adv in zip(new, old, ref, advantages):
        if lp.numel() == 0:
            continue
        ratio = torch.exp(lp - lp_old)
        bounded = torch.clamp(ratio, 1 - clip, 1 + clip)
        surrogate = -torch.minimum(ratio * adv, bounded * adv)
        kl = torch.exp(lp_ref - lp) - (lp_ref - lp) - 1
        term = (surrogate + beta * kl).sum()
        loss = term if loss is None else loss + term
        tokens += lp.numel()
        kl_sum += float(kl.detach().sum())
        clipped += int(((ratio < 1 - clip) & (adv < 0) | (ratio > 1 + clip) & (adv > 0)).sum())
    if loss is None:
        loss = torch.zeros((), requires_grad=True)
    return LossParts(loss, tokens, kl_sum, clipped)
