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
from .sampler import (CONFIDENCE_OF, FINISH, Result, SamplerConfig, Step, confidence_of, draw_tokens,
                      filtered_probs, masked_logits)

DEFAULT_THRESHOLD = 0.9  # Fast-dLLM's; the quality guard of `diffucode bench` checks it
DEFAULT_BLOCK_SIZE = 32


@dataclass
class FastConfig:
    threshold: float = DEFAULT_THRESHOLD  # reveal every masked token of the block at least this probable
    block_size: int = DEFAULT_BLOCK_SIZE
    context_chunk: int = 64  # far-context chunk (only with a prefix store)
    # End tokens (infill and completion, whose answer is cut at the first end token): once one is
    # revealed in a row's span, the masks after it are filled with it without spending passes.
    end_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if not self.threshold > 0:
            raise InputError(f"threshold must be > 0, got {self.threshold}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise InputError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.context_chunk, int) or self.context_chunk < 1:
            raise InputError(f"context_chunk must be an integer >= 1, got {self.context_chunk!r}")


@dataclass
class Drop:
    """A callback's answer in a batch: stop decoding these rows (indices into the batch)."""

    rows: list[int]
    finish: bool = False  # and, as FINISH, fill the other rows' remaining masks in one last step


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
    logprob[rows, at] = torch.log_softmax(logits[rows, cols], dim=-1).gather(-1, new[:, None]).squeeze(-1)


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
    cfg.check()
    fast = fast or FastConfig()
    fast.check()
    x = x.clone()
    B, N = x.shape
    device = x.device
    history = [] if keep_history else None
    logprob = torch.full((B, N), float("nan"), device=device)
    masked = x == mask_id
    if not masked.any():
        return Result(x=x, history=history, logprob=logprob, steps_run=0, forward_passes=0)
    ar = torch.arange(N, device=device)
    first = torch.where(masked, ar, N).min(dim=1).values
    last = torch.where(masked, ar, -1).max(dim=1).values
    if (last < 0).any() or not bool(((last - first) == (last - first)[0]).all()):
        raise InputError("fast decoding batches rows whose masked spans have the same length; got spans "
                         f"{(last - first + 1).clamp(min=0).tolist()}")
    span = int(last[0] - first[0]) + 1
    key_valid = None if attention_mask is None else attention_mask[:, 0].any(dim=1)  # (B, N)
    if position_ids is None:
        position_ids = ar.expand(B, N)
    cache = cache or DualKVCache(network)
    cache.reserve(B, N)
    frozen = _far_context(cache, x, int(first[0]), fast, prefix) if prefix and B == 1 and key_valid is None else 0

    ends = torch.tensor(fast.end_ids, dtype=x.dtype, device=device) if fast.end_ids else None
    live = torch.arange(B, device=device)  # batch rows still decoding
    total = int(masked.sum(dim=1).max())
    steps_run = passes = 0
    finishing = False

    def after_step(before: torch.Tensor) -> bool:
        """History, callback; applies Drop; True when no row is left."""
        nonlocal steps_run, finishing, live, first, position_ids, key_valid
        steps_run += 1
        if history is not None:
            history.append(x.clone())
        if callback is None:
            return False
        answer = callback(Step(steps_run - 1, cfg.steps, x, before != x, int((x[live] == mask_id).sum())))
        finishing = finishing or answer == FINISH or (isinstance(answer, Drop) and answer.finish)
        if isinstance(answer, Drop) and answer.rows:
            keep = torch.tensor([i for i, r in enumerate(live.tolist()) if r not in set(answer.rows)],
                                dtype=torch.long, device=device)
            if len(keep) == 0:
                return True
            live, first, position_ids = live[keep], first[keep], position_ids[keep]
            key_valid = None if key_valid is None else key_valid[keep]
            cache.select(keep)
        return False

    for b0 in range(0, span, fast.block_size):
        L = min(fast.block_size, span - b0)
        T = min(L + 1, N)
        offsets = b0 + torch.arange(L, device=device)
        block_masks = int((x[live].gather(1, first[:, None] + offsets) == mask_id).sum(dim=1).max())
        if block_masks == 0:
            continue
        budget = max(1, math.ceil(cfg.steps * block_masks / total))
        for j in range(budget):
            if finishing:
                break
            xs = x[live]
            block = first[:, None] + offsets  # (B, L) absolute positions
            bmask = xs.gather(1, block) == mask_id
            if not bmask.any():
                break
            left = bmask.sum(dim=1)
            P = L if cache.graphs is not None else int(left.max())  # graphs: one shape per block size
            where, valid = _masked_first(block, bmask, P)
            if j == 0:
                logits = cache.refresh(xs, position_ids, key_valid, where, frozen)
            else:
                lo = (first + b0 - 1).clamp(min=0, max=N - T)
                logits = cache.step(xs, lo, T, position_ids, key_valid, where - lo[:, None])
            passes += 1
            k_min = torch.where(left > 0, (left + (budget - j) - 1) // (budget - j), 0)
            lp = logprob[live]
            before = x.clone()
            _reveal(xs, logits, where, valid, k_min, cfg, fast.threshold, generator, lp, ends)
            if ends is not None:
                _end_fill(xs, first, span, ends, mask_id)
            x[live], logprob[live] = xs, lp
            if after_step(before):
                return Result(x=x, history=history, logprob=logprob, steps_run=steps_run, forward_passes=passes)
        if finishing:
            break

    xs = x[live]
    masked = xs == mask_id
    if finishing and masked.any():  # the deadline: every remaining mask, one exact forward
        mask2d = None if key_valid is None else key_valid[:, None, None, :] & key_valid[:, None, :, None]
        logits = masked_logits(network, xs, masked, mask2d, position_ids)
        passes += 1
        chosen, tokens = draw_tokens(filtered_probs(logits, cfg), cfg, generator)
        lp = logprob[live]
        lp[masked] = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        xs[masked] = tokens
        before = x.clone()
        x[live], logprob[live] = xs, lp
        after_step(before)
    return Result(x=x, history=history, logprob=logprob, steps_run=steps_run, forward_passes=passes)


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
