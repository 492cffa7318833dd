"""One Linear layer: its quantized stored form, and the modules that run that form.

The stored form of a Linear named M is the layout of bitsandbytes' own state_dict, so a
pre-quantized checkpoint holds exactly what bitsandbytes serialises:

    nf4   M.weight (uint8, 4-bit codes packed two per byte, shape (out*in/2, 1)),
          M.weight.absmax, M.weight.quant_map, with double quantization also
          M.weight.nested_absmax and M.weight.nested_quant_map, and
          M.weight.quant_state.bitsandbytes__nf4 (the QuantState's non-tensor fields, packed)
    int8  M.weight (int8, (out, in)) and M.SCB (float32, (out,)): w ~ weight * SCB / 127 per row
    both  M.bias, when the Linear has one, stays in the model's dtype (not part of this form)

`quantize_linear` makes that form from a full-precision weight; `build_linear` makes a module
from it. Quantizing in memory is the two in a row, so a network quantized at load time and one
loaded from a pre-quantized checkpoint are the same modules. This module knows single layers;
it does not know the network or files.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .schemes import QuantConfig, backend_for, cpu_flags, import_bitsandbytes

NF4_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
BACKEND_ATTR = "diffucode_backend"  # set on every module build_linear returns


def stored_spec(qcfg: QuantConfig, in_features: int, out_features: int) -> dict[str, tuple]:
    """suffix -> (dtype, shape or None when the shape is the library's business)."""
    if qcfg.scheme == "int8":
        return {"weight": (torch.int8, (out_features, in_features)), "SCB": (torch.float32, (out_features,))}
    spec = {"weight": (torch.uint8, ((out_features * in_features + 1) // 2, 1)),
            "weight.absmax": (torch.uint8 if qcfg.double_quant else torch.float32, None),
            "weight.quant_map": (torch.float32, (16,)),
            NF4_STATE_KEY: (torch.uint8, None)}
    if qcfg.double_quant:
        spec.update({"weight.nested_absmax": (torch.float32, None),
                     "weight.nested_quant_map": (torch.float32, (256,))})
    return spec


@torch.no_grad()
def quantize_linear(qcfg: QuantConfig, weight: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The stored form of one (out, in) weight, computed on `device` (tensors stay there)."""
    if qcfg.scheme == "nf4":
        bnb = import_bitsandbytes("nf4", device)
        w = weight.to(device=device, dtype=qcfg.torch_compute_dtype).contiguous()
        packed, state = bnb.functional.quantize_4bit(w, blocksize=qcfg.blocksize,
                                                     compress_statistics=qcfg.double_quant,
                                                     quant_type="nf4", quant_storage=torch.uint8)
        return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    # int8, LLM.int8()'s row-wise absmax: the same bytes bitsandbytes' int8_vectorwise_quant makes
    w = weight.to(device=device, dtype=torch.float32)
    scb = w.abs().amax(dim=1)
    scb = torch.where(scb > 0, scb, torch.ones_like(scb))  # an all-zero row: codes 0, any scale
    codes = torch.round(w * (127.0 / scb).unsqueeze(1)).to(torch.int8)
    return {"weight": codes, "SCB": scb}


def build_linear(qcfg: QuantConfig, stored: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None, device: torch.device | str, dtype: torch.dtype,
                 backend: str | None = None) -> nn.Module:
    """A module running the stored form on `device`; nothing is quantized here. `backend`
    overrides the device's default (the benchmark measures every CPU option this way)."""
    device = torch.device(device)
    backend = backend or backend_for(qcfg.scheme, device)
    bias = None if bias is None else bias.detach().to(device=device, dtype=dtype)
    if backend == "bitsandbytes-nf4":
        module = _nf4_linear(qcfg, stored, in_features, out_features, bias, device)
    elif backend == "bitsandbytes-int8":
        module = _bnb_int8_linear(qcfg, stored, in_features, out_features, bias, device)
    elif backend == "torch-dynamic-int8":
        module = DynamicInt8Linear(stored["weight"], stored["SCB"], bias)
    elif backend == "int8-weight-only":
        module = Int8WeightOnlyLinear(stored["weight"].to(device), stored["SCB"].to(device), bias)
    else:
        raise ValueError(f"unknown quantization backend {backend!r}")
    setattr(module, BACKEND_ATTR, backend)
    return module.eval()  # bitsandbytes picks its CPU inference kernels only outside training mode


def _nf4_linear(qcfg, stored, in_features, out_features, bias, device) -> nn.Module:
    bnb = import_bitsandbytes("nf4", device)
    module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                               compute_dtype=qcfg.torch_compute_dtype, compress_statistics=qcfg.double_quant,
                               quant_type="nf4", quant_storage=torch.uint8, device="meta")
    stats = {k.removeprefix("weight."): v for k, v in stored.items() if k.startswith("weight.")}
    # from_dict unpacks the non-tensor fields from the packed tensor: no re-quantization
    module.weight = bnb.nn.Params4bit.from_prequantized(stored["weight"], stats, requires_grad=False,
                                                        device=device, module=module)
    module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return module


def _bnb_int8_linear(qcfg, stored, in_features, out_features, bias, device) -> nn.Module:
    bnb = import_bitsandbytes("int8", device)
    module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                 threshold=qcfg.threshold, device="meta")
    codes, scb = stored["weight"].to(device), stored["SCB"].to(device=device, dtype=torch.float32)
    # CB/SCB on the parameter are what Linear8bitLt.forward moves into its matmul state
    module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return module


class DynamicInt8Linear(nn.Module):
    """int8 weights with a scale per output row, activations quantized on each call: torch's
    dynamic int8 kernels (fbgemm / onednn on x86, qnnpack on ARM). The fastest CPU option we
    measured (README). The kernels run in fp32; the output has the input's dtype."""

    reduce_range = None  # None: 7-bit activations unless the CPU has VNNI (see has_vnni)

    def __init__(self, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        codes, scb = codes.to("cpu").contiguous(), scb.to("cpu", torch.float32)
        bias32 = None if bias is None else bias.to("cpu", torch.float32)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized-tensor constructors as deprecated
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(codes, scb.double() / 127.0, zero_points, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias32)
        self.nbytes_by_dtype = {"int8": codes.numel(),
                                "float32": 4 * (scb.numel() + (0 if bias is None else bias.numel()))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce_range = not has_vnni() if self.reduce_range is None else self.reduce_range
        y = torch.ops.quantized.linear_dynamic(x.to(torch.float32), self._packed, reduce_range)
        return y.to(x.dtype)

    def stored(self) -> dict[str, torch.Tensor]:
        """The int8 codes and row scales inside the packed kernel weights (for checks)."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return {"weight": qweight.int_repr(), "SCB": (qweight.q_per_channel_scales() * 127.0).float()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


def has_vnni() -> bool:
    """Whether the CPU has VNNI dot products. Without them fbgemm sums pairs of u8 x s8
    products in int16, which can saturate, so activations are quantized to 7 bits (torch's
    default, `reduce_range`); with them 8 bits are safe and halve the error (README)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


class Int8WeightOnlyLinear(nn.Module):
    """int8 weights converted to the activations' dtype on each call: pure torch, any device.
    Used on CPUs whose torch lacks the dynamic int8 kernels; it saves memory, not time."""

    def __init__(self, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scb.to(torch.float32) / 127.0)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)
