"""The reference sampler of Dream / DiffuCoder (`diffusion_generate`), generalised to masks
anywhere in the sequence, so that one loop serves completion, infill and refinement.

This module knows token ids and the network; no text, no sockets. Its one window to the
outside is the per-step callback, which can cancel (raise `Cancelled`), watch the canvas
(streaming), or ask to finish (a deadline): the next step then reveals every remaining mask.
`Denoising` holds what a decoder keeps while it runs and interprets the callback's answers; fast
decoding (fast.py) runs on the same `Denoising`, `Result` and log-probability helper.

The arithmetic mirrors the reference step for step (float32 linspace schedule, reveal count
truncated from the float mean mask count, top-k over a full-length confidence row) so that
greedy decoding (temperature 0, alg_temp 0) is token-identical to it. With masks appended
after a prompt this *is* the reference algorithm; `generate` is that case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError
from .network import Dream
from .options import SamplerConfig

FINISH = "finish"  # a callback returns this to fill all remaining masks in one last step


@dataclass
class Drop:
    """A callback's answer in a batch: stop decoding these rows (indices into the batch). Fast
    decoding takes them out of its tensors; exact decoding keeps computing them (their results
    are ignored)."""

    rows: list[int]
    finish: bool = False  # and, as FINISH, fill the other rows' remaining masks in one last step


@dataclass
class Step:
    """What the callback sees after each step."""

    index: int  # 0-based
    steps: int  # the planned number of steps
    x: torch.Tensor  # (B, N) the canvas after this step; do not modify
    revealed: torch.Tensor  # (B, N) bool, positions revealed in this step
    masks_left: int
    text: str | None = None  # the region as text, masks shown as "░"; filled in by the tasks layer


@dataclass
class Result:
    x: torch.Tensor  # (B, N) final sequence
    history: list[torch.Tensor] | None  # x after every step
    logprob: torch.Tensor  # (B, N) float32 log-probability (untempered) of each revealed token; nan elsewhere
    steps_run: int
    forward_passes: int
    order: torch.Tensor | None = None  # (B, N) int: the step that revealed each position; -1 where none did


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose cumulative probability passes top_p (the first
    token is always kept); the rest get the dtype's minimum."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def filtered_probs(logits: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """(M, V) probabilities after temperature, top-p and top-k, as the reference computes them."""
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = top_p_logits(logits, cfg.top_p)
    if cfg.top_k:  # 0 / None: off
        logits = top_k_logits(logits, cfg.top_k)
    return torch.softmax(logits, dim=-1)


def draw_tokens(probs: torch.Tensor, cfg: SamplerConfig,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (M, V) probabilities (sampled when temperature > 0, else the most
    probable), and its probability."""
    if cfg.temperature > 0 and probs.shape[0] > 0:
        # as torch.distributions.Categorical(probs).sample() draws, so a seed gives the same tokens
        tokens = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, True, generator=generator).squeeze(-1)
        return torch.gather(probs, -1, tokens.unsqueeze(-1)).squeeze(-1), tokens
    return probs.max(dim=-1)


def confidence_of(probs: torch.Tensor, chosen: torch.Tensor, confidence: str) -> torch.Tensor:
    """"prob" (probability of the chosen token; maskgit_plus), "margin" (p1 - p2; topk_margin)
    or "neg_entropy" (sum p log p; entropy). Higher is more certain."""
    if confidence == "margin":
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        return top2[..., 0] - top2[..., 1]
    if confidence == "neg_entropy":
        return torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return chosen


def sample_tokens(logits: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator | None = None,
                  confidence: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (M, V) logits, and its confidence (see `confidence_of`)."""
    probs = filtered_probs(logits, cfg)
    chosen, tokens = draw_tokens(probs, cfg, generator)
    return confidence_of(probs, chosen, confidence), tokens


CONFIDENCE_OF = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(M,) log-probability of each row's token under the untempered (M, V) logits."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.clamp(max=logits.shape[-1] - 1)[:, None]).squeeze(-1)


class Denoising:
    """What a decoder keeps while it runs: the canvas, the log-probability of each revealed token,
    the history, the counters, and whether the callback asked to finish."""

    def __init__(self, x: torch.Tensor, cfg: SamplerConfig, callback: Callable[[Step], object] | None,
                 keep_history: bool):
        cfg.check()
        self.x = x.clone()
        self.steps = cfg.steps
        self.callback = callback
        self.history: list[torch.Tensor] | None = [] if keep_history else None
        self.logprob = torch.full(x.shape, float("nan"), device=x.device)
        self.order = torch.full(x.shape, -1, dtype=torch.int32, device=x.device)
        self.steps_run = self.forward_passes = 0
        self.finishing = False

    def after_step(self, index: int, before: torch.Tensor, masks_left: int):
        """A step has changed the canvas from `before`: count it, record it, and ask the callback.
        Returns its answer (None, FINISH or a Drop), having noted a request to finish."""
        self.order[before != self.x] = self.steps_run
        self.steps_run += 1
        if self.history is not None:
            self.history.append(self.x.clone())
        if self.callback is None:
            return None
        answer = self.callback(Step(index, self.steps, self.x, before != self.x, masks_left))
        self.finishing = self.finishing or answer == FINISH or (isinstance(answer, Drop) and answer.finish)
        return answer

    def result(self) -> Result:
        return Result(x=self.x, history=self.history, logprob=self.logprob, steps_run=self.steps_run,
                      forward_passes=self.forward_passes, order=self.order)


def masked_logits(network: Dream, x: torch.Tensor, mask: torch.Tensor, attention_mask, position_ids) -> torch.Tensor:
    """Shifted logits of the masked positions, (total masks, V), in row-major order like
    `logits[mask]`; only those rows go through the lm_head."""
    counts = mask.sum(dim=1)
    P = int(counts.max())
    # masked positions first, in ascending order (stable sort), padded with unmasked ones
    positions = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :P]
    logits = network(x, position_ids=position_ids, attention_mask=attention_mask,
                     predict_positions=positions).logits
    valid = torch.arange(P, device=x.device)[None, :] < counts[:, None]
    return logits[valid]


@torch.inference_mode()
def denoise(
    network: Dream,
    x: torch.Tensor,  # (B, N) with mask_id at the positions to fill; rows need equal mask counts
    mask_id: int,
    cfg: SamplerConfig,
    *,
    attention_mask: torch.Tensor | None = None,  # (B, 1, N, N) bool, for left-padded batches
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[Step], str | None] | None = None,
    keep_history: bool = False,
) -> Result:
    run = Denoising(x, cfg, callback, keep_history)
    x = run.x
    B, N = x.shape
    device = x.device
    timesteps = torch.linspace(1, cfg.eps, cfg.steps + 1, device=device)
    for i in range(cfg.steps):
        mask = x == mask_id
        if not mask.any():  # (origin can reveal everything early) the reference's later steps
            if run.history is not None:  # change nothing: record them without running the model
                run.history.append(x.clone())
            continue
        last = run.finishing or i == cfg.steps - 1
        logits = masked_logits(network, x, mask, attention_mask, position_ids)
        run.forward_passes += 1
        t, s = timesteps[i], timesteps[i + 1]
        before = x.clone()
        if cfg.alg == "origin":
            p_transfer = 1 - s / t if not last else 1
            x0 = torch.full_like(x[mask], mask_id)
            transfer = torch.rand(*x0.shape, device=device, generator=generator) < p_transfer
            _, x0[transfer] = sample_tokens(logits[transfer], cfg, generator)
            x[mask] = x0
        else:
            conf, x0 = sample_tokens(logits, cfg, generator, CONFIDENCE_OF[cfg.alg])
            masks_per_row = mask.sum() / mask.shape[0]
            k = int(masks_per_row * (1 - s / t)) if not last else int(masks_per_row)
            full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_conf[mask] = conf
            if k > 0:
                if not cfg.alg_temp:
                    _, chosen = torch.topk(full_conf, k)
                else:
                    weights = F.softmax(full_conf / cfg.alg_temp, dim=-1)
                    chosen = torch.multinomial(weights, num_samples=k, generator=generator)
                proposal = torch.full_like(x, mask_id)
                proposal[mask] = x0
                rows = torch.arange(B, device=device).unsqueeze(1).expand_as(chosen)
                x[rows, chosen] = proposal[rows, chosen]
        revealed = (before != x)
        if revealed.any():  # log-probabilities of what was revealed, from the untempered distribution
            lp_all = torch.full((B, N), float("nan"), device=device)
            lp_all[mask] = token_logprobs(logits, x[mask])
            run.logprob[revealed] = lp_all[revealed]
        # a batch's callback may answer Drop: here the dropped rows are still computed (their
        # results are ignored), and Drop(finish=True) finishes as FINISH does
        run.after_step(i, before, int((x == mask_id).sum()))
        if last:
            break
    return run.result()


def generate(
    network: Dream,
    prompt: torch.Tensor,  # (B, T) token ids, left-padded when rows differ in length
    max_new_tokens: int,
    mask_id: int,
    cfg: SamplerConfig,
    prompt_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = left padding
    **kwargs,
) -> Result:
    """The reference `diffusion_generate`: prompt followed by max_new_tokens masks."""
    from .network import padding_inputs

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    x = F.pad(prompt, (0, max_new_tokens), value=mask_id)
    if prompt_mask is not None and bool((prompt_mask == 0).any()):
        full = F.pad(prompt_mask, (0, max_new_tokens), value=1)
        kwargs["attention_mask"], kwargs["position_ids"] = padding_inputs(full)
    return denoise(network, x, mask_id, cfg, **kwargs)
