"""Swapping a network's nn.Linear modules for quantized ones, walking `named_children`.

Two ways in, one way out (`linears.build_linear`):
- `quantize_network`: a network with full-precision weights (the loader leaves them on the CPU,
  memory-mapped) is quantized Linear by Linear on the target device, so device memory never
  holds more than the quantized part plus one full-precision layer; the parameters left
  (embeddings, norms, biases, lm_head) move to the device afterwards.
- `install_prequantized`: a meta-device network receives modules built from a pre-quantized
  checkpoint's stored tensors; nothing is quantized.

This module knows module names and types; it does not read or write files, and the network
module (daemon/network.py) knows nothing of it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .linears import BACKEND_ATTR, build_linear, quantize_linear
from .schemes import QuantConfig

Target = tuple[nn.Module, str, str, nn.Linear]  # (parent, attribute, dotted name, the Linear)


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, dotted name, child) for every submodule, depth first."""
    for attr, child in module.named_children():
        name = prefix + attr
        yield module, attr, name, child
        yield from walk(child, name + ".")


def linear_targets(net: nn.Module, qcfg: QuantConfig) -> list[Target]:
    """The plain nn.Linear modules the config quantizes (bitsandbytes' modules subclass
    nn.Linear, so the type is compared exactly: an already swapped module is never a target)."""
    return [(parent, attr, name, child) for parent, attr, name, child in walk(net)
            if type(child) is nn.Linear and qcfg.quantizes(name)]


def is_quantized(module: nn.Module) -> bool:
    return hasattr(module, BACKEND_ATTR)


def quantized_backends(net: nn.Module) -> dict[str, int]:
    """backend -> number of Linear modules it runs."""
    counts: dict[str, int] = {}
    for module in net.modules():
        if is_quantized(module):
            counts[getattr(module, BACKEND_ATTR)] = counts.get(getattr(module, BACKEND_ATTR), 0) + 1
    return counts


@torch.no_grad()
def quantize_network(net: nn.Module, qcfg: QuantConfig, device: torch.device | str, dtype: torch.dtype,
                     backend: str | None = None,
                     quantize: Callable[..., dict[str, torch.Tensor]] = quantize_linear) -> nn.Module:
    """Quantize `net`'s Linear modules in place on `device`; returns `net`, all of it on `device`."""
    device = torch.device(device)
    for parent, attr, _, linear in linear_targets(net, qcfg):
        stored = quantize(qcfg, linear.weight, device)
        setattr(parent, attr, build_linear(qcfg, stored, linear.in_features, linear.out_features,
                                           linear.bias, device, dtype, backend))
        del stored, linear  # the full-precision weight goes with the replaced module
    move_unquantized(net, device, dtype)
    return net


def install_prequantized(net: nn.Module, qcfg: QuantConfig, stored: dict[str, dict[str, torch.Tensor]],
                         rest: dict[str, torch.Tensor], device: torch.device | str,
                         dtype: torch.dtype) -> nn.Module:
    """Fill a meta-device `net`: quantized modules from `stored` (module name -> suffix ->
    tensor), every other parameter from `rest` (full name -> tensor, biases included)."""
    device = torch.device(device)
    for parent, attr, name, linear in linear_targets(net, qcfg):
        bias = rest.pop(f"{name}.bias", None)
        setattr(parent, attr, build_linear(qcfg, stored[name], linear.in_features, linear.out_features,
                                           bias, device, dtype))
    for full, tensor in rest.items():
        owner, _, leaf = full.rpartition(".")
        module = net.get_submodule(owner)
        module._parameters[leaf] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    move_unquantized(net, device, dtype)
    return net


def move_unquantized(net: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Parameters outside the quantized modules go to `device` in `dtype` (no-op when there)."""
    for module in net.modules():
        if is_quantized(module):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.device.type == "meta":
                raise ValueError(f"parameter {name!r} of {type(module).__name__} was never loaded")
            if p.device != device or p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.detach().to(device=device, dtype=dtype),
                                                        requires_grad=False)
