"""The order in which a diffusion model wrote an answer, and how autoregressive that order was.

`order[i]` is the step at which the region's token i was revealed (0-based; -1 for a token that
was there before decoding, as the kept tokens of a refinement are). AR-ness is the DiffuCoder
paper's measure (Gong et al. 2025, section 3), with k = 1 and several tokens per step allowed:

- local: the share of revealed tokens whose left neighbour was already known when they were
  revealed (written before, part of the context, or revealed in the same step to their left):
  the answer grows as a run, the way a left-to-right model writes;
- global: the share of revealed tokens that were among the earliest masks still open at their
  step (a step revealing m tokens that picks the m leftmost masks counts fully).

A left-to-right decoding scores 1.0 on both; a random order about 1/n globally.
"""

from __future__ import annotations


def ar_ness(order: list[int]) -> dict[str, float]:
    """{"local": ..., "global": ...} in [0, 1] for a region's reveal steps; 1.0 when nothing was revealed."""
    revealed = [(step, i) for i, step in enumerate(order) if step >= 0]
    if not revealed:
        return {"local": 1.0, "global": 1.0}
    local = earliest = 0
    for step in sorted({s for s, _ in revealed}):
        now = sorted(i for s, i in revealed if s == step)
        still_open = sorted(i for i, s in enumerate(order) if s >= step)
        firsts = set(still_open[:len(now)])
        for i in now:
            left = order[i - 1] if i > 0 else -1
            local += left <= step  # known before, or written in the same step
            earliest += i in firsts
    n = len(revealed)
    return {"local": round(local / n, 4), "global": round(earliest / n, 4)}
