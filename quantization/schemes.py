"""What `--quantize none|nf4|int8` means on each device, and the settings a checkpoint records.

A scheme names a stored format; a backend is the code that runs it on one device:

    scheme  stored per Linear                         CUDA backend           CPU backend
    nf4     4-bit NF4 codes + absmax (bitsandbytes     bitsandbytes           bitsandbytes Linear4bit
            QuantState, optionally double-quantized)   Linear4bit, bf16 math  (saves memory, not time)
    int8    int8 weights + one fp32 scale per output   bitsandbytes           torch dynamic int8
            row (LLM.int8()'s CB / SCB)                Linear8bitLt           (the fastest CPU option
                                                                              measured, README)

The same files therefore load on either device. This module knows the settings and which
libraries are needed; it does not know files or the network's layout.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from diffucode.daemon.errors import QuantizationError

SCHEMES = ("none", "nf4", "int8")
QUANTIZED = ("nf4", "int8")
INSTALL_HINT = "pip install 'diffucode[quant]' (or: pip install bitsandbytes)"


@dataclass
class QuantConfig:
    """How the Linear layers of one network are quantized (written to config.json as
    `quantization_config`, and to every shard's safetensors metadata)."""

    scheme: str = "nf4"
    double_quant: bool = True  # nf4: quantize the absmax statistics too (bitsandbytes' compress_statistics)
    blocksize: int = 64  # nf4: weights sharing one absmax
    compute_dtype: str = "bfloat16"  # nf4: the dtype the matmul runs in
    threshold: float = 6.0  # int8 on CUDA: LLM.int8() outlier threshold on activations (0 = off)
    # Linear modules kept in the model's dtype. The embeddings are never quantized: a lookup
    # reads a few rows, and their size (1.1 GB in bf16 for the 7B) is what `--quantize-lm-head` saves
    # on the other end of the network.
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        check_scheme(self.scheme)
        if self.scheme == "none":
            raise QuantizationError("a QuantConfig needs a quantizing scheme (nf4 or int8), not 'none'")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise QuantizationError(f"compute dtype {self.compute_dtype!r} is not bfloat16, float16 or float32")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantizationError(f"nf4 blocksize {self.blocksize} is not a power of two in 64..4096")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)

    def quantizes(self, module_name: str) -> bool:
        """Whether the Linear at this dotted name is quantized (names as in Dream.named_modules)."""
        return not any(module_name == s or module_name.endswith("." + s) for s in self.skip_modules)

    def to_dict(self) -> dict:
        return {"quant_method": "diffucode", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantization_config") -> "QuantConfig":
        if not isinstance(d, dict) or "scheme" not in d:
            raise QuantizationError(f"{where}: expected an object with a 'scheme' (written by "
                                    f"`diffucode quantize`), found {d!r}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise QuantizationError(f"{where}: {e}") from e


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r} (use {', '.join(SCHEMES)})")
    return scheme


def cpu_int8_available() -> bool:
    """torch's dynamic int8 linear (fbgemm / onednn / qnnpack kernels) is present in this torch."""
    quantized = getattr(torch.ops, "quantized", None)
    try:
        return (quantized is not None and hasattr(quantized, "linear_dynamic")
                and hasattr(quantized, "linear_prepack") and torch.backends.quantized.engine != "none")
    except RuntimeError:
        return False


def backend_for(scheme: str, device: torch.device | str) -> str:
    """The backend that runs `scheme` on `device`, in words (also the key the modules use)."""
    check_scheme(scheme)
    kind = torch.device(device).type
    if scheme == "none":
        return "none"
    if scheme == "nf4":
        return "bitsandbytes-nf4"
    if kind == "cuda":
        return "bitsandbytes-int8"
    return "torch-dynamic-int8" if cpu_int8_available() else "int8-weight-only"


def prepare(scheme: str, device: torch.device | str) -> str:
    """Check that `scheme` can run on `device` (its library is installed); returns the backend."""
    backend = backend_for(scheme, device)
    if backend.startswith("bitsandbytes"):
        import_bitsandbytes(scheme, device)
    return backend


def import_bitsandbytes(scheme: str = "nf4", device: torch.device | str = "cpu"):
    """bitsandbytes, imported quietly; a clear error naming the scheme when it is missing.

    On CPUs with AVX512-BF16 its import logs that an optional kernel from a hub is absent and
    that it falls back to its own; that line is noise for our users, so it is held back.
    """
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationError(f"--quantize {scheme} on {torch.device(device).type} needs bitsandbytes, "
                                f"which is not installed: {INSTALL_HINT}") from e
    finally:
        noisy.setLevel(level)
    return bitsandbytes


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def library_versions() -> dict[str, str]:
    """Versions recorded in a pre-quantized checkpoint's metadata."""
    from diffucode import __version__

    versions = {"diffucode": __version__, "torch": torch.__version__.split("+")[0]}
    with contextlib.suppress(QuantizationError):
        versions["bitsandbytes"] = import_bitsandbytes().__version__
    return versions
