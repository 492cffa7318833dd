"""Fast decoding: block-wise denoising on a dual KV cache, revealing in parallel every token the
model is confident about (Fast-dLLM, training-free).

`denoise_fast` takes what `sampler.denoise` takes and returns the same `Result`, with the same
callback contract (cancel by raising, FINISH to fill every remaining mask in one last step), so
the tasks and the scheduler choose between them freely. What differs:

- The masked region [first mask, last mask] is decoded in blocks of `block_size` positions, left
  to right. A block's first step is a full forward (the cache's refresh: K/V of every position);
  its other steps recompute only the block and the position before it (the logit shift reads
  position p's prediction from p - 1) against the cached K/V of everything else.
- Each step reveals every masked token of the block whose probability (under the sampling
  settings) reaches `threshold`, and at least ceil(masks left / steps left) of the most confident
  (by `alg`), so a block never takes more than its share of `steps`: one token per step at the
  default steps, everything at the block's last allowed step. threshold > 1 never passes, which
  is the one-token-per-step schedule.
- With `end_ids` (the infill and completion tasks, which cut their answer at the first end
  token), an end token revealed in a row's span fills every mask after it at once: those
  positions would be thrown away, and the model learnt end tokens to run to a canvas' end. A
  short middle in a long canvas then costs passes for the middle only. An end token is revealed
  only at a row's first masked position, unless a step's minimum leaves no
  other choice: a model that learnt to end a canvas is confident of end tokens far from the
  cursor, and revealing those first, right to left, fixes a short answer before any of it is
  written (greedy picks "end here" whenever it is more likely than not, at every position).
- In a batch, a callback may answer `Drop(rows)`: those rows stop (their canvas stays as it is)
  and leave the batch's tensors, the others go on unchanged.
- With a `prefix` (a PrefixStore and a group), the far context before the cursor is encoded
  chunk-causally once and reused by the group's next request (see kvcache.py).

Greedy decoding is deterministic; it is not token-identical to the reference sampler (it reveals
in another order and attends to K/V that are up to one block stale): `sampler.denoise` stays the
exact mode. This module knows token ids, the network and the cache; no text, no sockets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError
from .kvcache import DualKVCache, PrefixStore
from .network import Dream
from .options import FastConfig, SamplerConfig
from .sampler import (CONFIDENCE_OF, Denoising, Drop, Result, Step, confidence_of, draw_tokens, filtered_probs,
                      masked_logits, token_logprobs)

__all__ = ["Drop", "FastConfig", "denoise_fast"]  # Drop and FastConfig live in sampler.py and options.py

def _reveal(x, logits, where, valid, k_min, cfg: SamplerConfig, threshold: float, generator, logprob,
            ends: torch.Tensor | None = None) -> None:
    """Reveal, per row, the valid positions whose token passes `threshold`, and at least k_min of
    the most confident. x (B, N), logits (B, P, V) predicting positions where (B, P), the masked
    ones first and in order. With `ends`, an end token is revealed only at a row's first masked
    position, or when k_min leaves no other choice (see the module's docstring)."""
    B, P, V = logits.shape
    probs = filtered_probs(logits.reshape(B * P, V), cfg)
    chosen, tokens = draw_tokens(probs, cfg, generator)
    chosen, tokens = chosen.view(B, P), tokens.view(B, P)
    if cfg.alg == "origin":  # random order, as origin reveals random positions
        conf = torch.rand(B, P, device=x.device, generator=generator)
    else:
        conf = confidence_of(probs, chosen.reshape(-1), CONFIDENCE_OF[cfg.alg]).view(B, P)
    # An end token with a mask to its left waits: revealed, it would fix the answer's length before
    # the answer is written (confident end tokens everywhere squeeze the middle, see the docstring).
    late_end = (valid & torch.isin(tokens, ends) & (torch.arange(P, device=x.device) > 0) if ends is not None
                else torch.zeros_like(valid))
    eligible = valid & ~late_end
    if cfg.alg_temp and cfg.alg != "origin":
        pick = torch.zeros(B, P, dtype=torch.bool, device=x.device)
        for b in range(B):
            k = min(int(k_min[b]), int(eligible[b].sum()))
            if k > 0:
                weights = F.softmax(conf[b].masked_fill(~eligible[b], -torch.inf) / cfg.alg_temp, dim=-1)
                pick[b, torch.multinomial(weights, k, generator=generator)] = True
            if k < k_min[b]:  # the rest from the waiting end tokens, leftmost first
                pick[b, late_end[b].nonzero().flatten()[: int(k_min[b]) - k]] = True
    else:  # rank: eligible by confidence, then waiting end tokens, then the rest (never picked)
        key = torch.where(eligible, conf, torch.where(late_end, conf - 1e4, -torch.inf))
        order = key.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(P, device=x.device).expand(B, P))
        pick = rank < k_min[:, None]
    pick &= valid
    pick |= eligible & (chosen >= threshold)
    rows, cols = pick.nonzero(as_tuple=True)
    at, new = where[rows, cols], tokens[rows, cols]
    x[rows, at] = new
    logprob[rows, at] = token_logprobs(logits[rows, cols], new)


def _end_fill(x: torch.Tensor, first: torch.Tensor, span: int, ends: torch.Tensor, mask_id: int) -> None:
    """In each row of x (B, N) whose span [first, first + span) holds an end token, fill the
    masks after the first one with it."""
    index = first[:, None] + torch.arange(span, device=x.device)  # (B, span)
    tokens = x.gather(1, index)
    is_end = torch.isin(tokens, ends)
    at = is_end.to(torch.int8).argmax(dim=1, keepdim=True)  # the first end token (0 if none)
    after = is_end.any(dim=1, keepdim=True) & (torch.arange(span, device=x.device) > at) & (tokens == mask_id)
    if after.any():
        x.scatter_(1, index, torch.where(after, tokens.gather(1, at), tokens))


def _masked_first(block: torch.Tensor, masked: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of a block (B, L) with the masked ones first (in order), the first P of them,
    and which of those are masked."""
    order = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :P]
    return block.gather(1, order), masked.gather(1, order)


@dataclass
class _Rows:
    """The batch rows still decoding (indices into the batch) and their per-row inputs."""

    live: torch.Tensor  # (B',) row indices
    first: torch.Tensor  # (B',) each row's first masked position
    position_ids: torch.Tensor  # (B', N)
    key_valid: torch.Tensor | None  # (B', N) bool: which positions are tokens (left padding: not)

    def drop(self, rows: list[int], cache: DualKVCache) -> bool:
        """Take these batch rows out (the cache too); True when none is left."""
        gone = set(rows)
        keep = torch.tensor([i for i, r in enumerate(self.live.tolist()) if r not in gone],
                            dtype=torch.long, device=self.live.device)
        if len(keep) == 0:
            return True
        self.live, self.first, self.position_ids = self.live[keep], self.first[keep], self.position_ids[keep]
        self.key_valid = None if self.key_valid is None else self.key_valid[keep]
        cache.select(keep)
        return False


def _after_step(run: Denoising, before: torch.Tensor, rows: _Rows, cache: DualKVCache, mask_id: int) -> bool:
    """The shared step contract, plus Drop: True when no row is left."""
    answer = run.after_step(run.steps_run, before, int((run.x[rows.live] == mask_id).sum()))
    return isinstance(answer, Drop) and bool(answer.rows) and rows.drop(answer.rows, cache)


@torch.inference_mode()
def denoise_fast(
    network: Dream,
    x: torch.Tensor,  # (B, N) with mask_id at the positions to fill; rows need equal masked spans
    mask_id: int,
    cfg: SamplerConfig,
    *,
    fast: FastConfig | None = None,
    attention_mask: torch.Tensor | None = None,  # (B, 1, N, N) bool padding mask (network.padding_inputs)
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[Step], str | Drop | None] | None = None,
    keep_history: bool = False,
    cache: DualKVCache | None = None,  # reused between calls: its buffers are allocated once
    prefix: tuple[PrefixStore, str] | None = None,  # (store, group): reuse the far context's K/V
) -> Result:
    run = Denoising(x, cfg, callback, keep_history)
    fast = fast or FastConfig()
    fast.check()
    x = run.x
    B, N = x.shape
    device = x.device
    masked = x == mask_id
    if not masked.any():
        return run.result()
    ar = torch.arange(N, device=device)
    first = torch.where(masked, ar, N).min(dim=1).values
    last = torch.where(masked, ar, -1).max(dim=1).values
    if (last < 0).any() or not bool(((last - first) == (last - first)[0]).all()):
        raise InputError("fast decoding batches rows whose masked spans have the same length; got spans "
                         f"{(last - first + 1).clamp(min=0).tolist()}")
    span = int(last[0] - first[0]) + 1
    key_valid = None if attention_mask is None else attention_mask[:, 0].any(dim=1)  # (B, N)
    rows = _Rows(torch.arange(B, device=device), first, ar.expand(B, N) if position_ids is None else position_ids,
                 key_valid)
    cache = cache or DualKVCache(network)
    cache.reserve(B, N)
    frozen = _far_context(cache, x, int(first[0]), fast, prefix) if prefix and B == 1 and key_valid is None else 0
    if _decode_blocks(run, network, mask_id, cfg, fast, rows, cache, span, frozen, generator):
        return run.result()  # every row was dropped
    if run.finishing:
        _finish(run, network, mask_id, cfg, rows, cache, generator)
    return run.result()


def _decode_blocks(run: Denoising, network: Dream, mask_id: int, cfg: SamplerConfig, fast: FastConfig, rows: _Rows,
                   cache: DualKVCache, span: int, frozen: int, generator) -> bool:
    """The masked span, block by block: a full forward (the cache's refresh) then cached steps,
    each revealing what passes the threshold and at least the block's share of the step budget.
    Stops early when the callback asks to finish. True when every row was dropped."""
    x, logprob = run.x, run.logprob
    N = x.shape[1]
    device = x.device
    ends = torch.tensor(fast.end_ids, dtype=x.dtype, device=device) if fast.end_ids else None
    total = int((x == mask_id).sum(dim=1).max())
    for b0 in range(0, span, fast.block_size):
        L = min(fast.block_size, span - b0)
        T = min(L + 1, N)
        offsets = b0 + torch.arange(L, device=device)
        block_masks = int((x[rows.live].gather(1, rows.first[:, None] + offsets) == mask_id).sum(dim=1).max())
        if block_masks == 0:
            continue
        budget = max(1, math.ceil(cfg.steps * block_masks / total))
        for j in range(budget):
            if run.finishing:
                break
            xs = x[rows.live]
            block = rows.first[:, None] + offsets  # (B, L) absolute positions
            bmask = xs.gather(1, block) == mask_id
            if not bmask.any():
                break
            left = bmask.sum(dim=1)
            P = L if cache.graphs is not None else int(left.max())  # graphs: one shape per block size
            where, valid = _masked_first(block, bmask, P)
            if j == 0:
                logits = cache.refresh(xs, rows.position_ids, rows.key_valid, where, frozen)
            else:
                lo = (rows.first + b0 - 1).clamp(min=0, max=N - T)
                logits = cache.step(xs, lo, T, rows.position_ids, rows.key_valid, where - lo[:, None])
            run.forward_passes += 1
            k_min = torch.where(left > 0, (left + (budget - j) - 1) // (budget - j), 0)
            lp = logprob[rows.live]
            before = x.clone()
            _reveal(xs, logits, where, valid, k_min, cfg, fast.threshold, generator, lp, ends)
            if ends is not None:
                _end_fill(xs, rows.first, span, ends, mask_id)
            x[rows.live], logprob[rows.live] = xs, lp
            if _after_step(run, before, rows, cache, mask_id):
                return True
        if run.finishing:
            break
    return False


def _finish(run: Denoising, network: Dream, mask_id: int, cfg: SamplerConfig, rows: _Rows, cache: DualKVCache,
            generator) -> None:
    """The deadline: every remaining mask in one exact forward pass."""
    x, logprob = run.x, run.logprob
    xs = x[rows.live]
    masked = xs == mask_id
    if not masked.any():
        return
    kv = rows.key_valid
    mask2d = None if kv is None else kv[:, None, None, :] & kv[:, None, :, None]
    logits = masked_logits(network, xs, masked, mask2d, rows.position_ids)
    run.forward_passes += 1
    _, tokens = draw_tokens(filtered_probs(logits, cfg), cfg, generator)
    lp = logprob[rows.live]
    lp[masked] = token_logprobs(logits, tokens)
    xs[masked] = tokens
    before = x.clone()
    x[rows.live], logprob[rows.live] = xs, lp
    _after_step(run, before, rows, cache, mask_id)


def _far_context(cache: DualKVCache, x: torch.Tensor, first: int, fast: FastConfig,
                 prefix: tuple[PrefixStore, str]) -> int:
    """Encode the far context (whole chunks ending at least a block before the first mask),
    reusing the group's stored K/V where its tokens are unchanged. Returns its length."""
    store, group = prefix
    chunk = fast.context_chunk
    upto = max(0, first - fast.block_size) // chunk * chunk
    if upto == 0:
        return 0
    tokens = x[0, :upto].tolist()
    reuse, kv = store.lookup(group, tokens, chunk)
    reuse = min(reuse, upto)
    if kv is not None and reuse:
        cache.load_context(kv[0], kv[1], reuse)
    cache.encode_context(x, upto, chunk, reuse)
    store.save(group, tokens, *cache.context(upto))
    return upto
