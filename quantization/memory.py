"""How much memory a loaded network's weights take: bytes per dtype, and the device's own count.

The bytes are counted module by module without calling `state_dict()`: bitsandbytes' 4-bit
modules re-pack their weights when serialised on CPU, and the daemon answers `status` while a
forward pass may be running in another thread. Quantization state (absmax, code tables, row
scales) is counted with the weights it belongs to; tensors shared between modules count once.
This module reads modules; it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def _tensors(module: nn.Module):
    """The tensors a module owns directly, quantization state included."""
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit
    if state is not None:
        yield from (state.absmax, state.code)
        state2 = state.__dict__.get("state2")  # dropped when the weights are re-packed for CPU kernels
        if state2 is not None:
            yield from (state.offset, state2.absmax, state2.code)
    scb = getattr(weight, "SCB", None)  # bitsandbytes Int8Params, before the first forward
    lt_state = getattr(module, "state", None)  # bitsandbytes Linear8bitLt, after it
    for t in (scb, getattr(lt_state, "SCB", None), getattr(lt_state, "CB", None)):
        if isinstance(t, torch.Tensor):
            yield t


def _unwrap(t):
    """A tensor subclass that stores other tensors (torchao's quantized weights) -> those."""
    if not isinstance(t, torch.Tensor):
        return
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or isinstance(t, nn.Parameter) and type(t) is nn.Parameter:
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        yield from _unwrap(getattr(t, name))


def bytes_by_dtype(net: nn.Module) -> dict[str, int]:
    """dtype name -> bytes held by the network's weights and quantization state."""
    out: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for module in net.modules():
        for dtype, nbytes in getattr(module, "nbytes_by_dtype", {}).items():  # opaque packed kernels
            out[dtype] = out.get(dtype, 0) + nbytes
        for t in (inner for outer in _tensors(module) for inner in _unwrap(outer)):
            if t.numel() == 0 or t.device.type == "meta":
                continue
            key = (str(t.device), t.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            name = str(t.dtype).removeprefix("torch.")
            out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return dict(sorted(out.items()))


def device_memory(device: torch.device | str) -> dict[str, int]:
    """The accelerator's own allocation counters (empty on CPU, where RSS tells instead)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {"cuda_allocated": torch.cuda.memory_allocated(device),
            "cuda_reserved": torch.cuda.memory_reserved(device),
            "cuda_peak_allocated": torch.cuda.max_memory_allocated(device)}


def memory_report(net: nn.Module, device: torch.device | str) -> dict:
    by_dtype = bytes_by_dtype(net)
    return {"weights": sum(by_dtype.values()), "weights_by_dtype": by_dtype, **device_memory(device)}
