"""How far a quantized network's logits are from the full-precision ones, on fixed inputs.

The inputs are what the sampler feeds the network: random token ids with about half of the
positions masked, from a fixed seed, so two runs (and two machines) compare the same thing.
Two numbers: the relative error of all logits (||q - f|| / ||f||) and the share of positions
whose most probable token agrees. This module knows networks and tensors, not files.
"""

from __future__ import annotations

import torch
from torch import nn


def fixed_inputs(vocab_size: int, mask_id: int, batch: int = 2, length: int = 64, mask_share: float = 0.5,
                 seed: int = 1234) -> torch.Tensor:
    """(batch, length) token ids, the same for the same arguments on every machine."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
    masked = torch.rand(batch, length, generator=gen) < mask_share
    return ids.masked_fill(masked, mask_id)


@torch.no_grad()
def logits_on(net: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits on the CPU for every position of `input_ids` (run on the net's device)."""
    device = next(p.device for p in net.parameters() if p.device.type != "meta")
    return net(input_ids.to(device)).logits.float().cpu()


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """relative_error and top1_agreement of candidate logits against reference logits."""
    rel = (candidate - reference).norm() / reference.norm()
    top1 = (candidate.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"relative_error": float(rel), "top1_agreement": float(top1)}


def check_checkpoints(full: str, quantized: str, device: str = "auto", batch: int = 2, length: int = 64) -> dict:
    """Load a full checkpoint and its quantized copy (one after the other) and compare logits."""
    import gc

    from diffucode.daemon.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(full, device, require_tokenizer=False)
    ids = fixed_inputs(ckpt.config.vocab_size, ckpt.mask_id, batch=batch, length=length)
    reference = logits_on(ckpt.network, ids)
    del ckpt
    gc.collect()
    result = compare(reference, logits_on(load_checkpoint(quantized, device, require_tokenizer=False).network, ids))
    return {**result, "positions": batch * length}
