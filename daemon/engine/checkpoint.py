"""Loading DiffuCoder / Dream checkpoints into our own network, never running shipped code.

A checkpoint is a Hugging Face-format directory (config.json, model.safetensors or shards with
model.safetensors.index.json, tokenizer files) or a hub id found in the local Hugging Face
cache (offline: only `diffucode pull` touches the network). The network is built on the meta
device and the tensors read from the safetensors files (weights.py: each in memory of its own,
checked by name, shape, dtype and finiteness) are assigned to it, so loading costs little more
than reading the files.

Quantized loading is delegated to diffucode.quantization: with `quantize`, the Linear layers are
swapped for quantized ones on the device as they load; a directory whose config.json has a
`quantization_config` (written by `diffucode quantize`) is read by that package's loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from .network import Dream, DreamConfig
from .tokenizer import Tokenizer
from .weights import (HUB_ID, check_complete, check_finite, check_layers, check_tensor, expected_shapes,
                      iter_tensors, read_config, resolve_device, resolve_dtype, resolve_path)

if TYPE_CHECKING:
    from diffucode.quantization.schemes import QuantConfig

WEIGHT_FILES_TO_PULL = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.md"]


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it came from, its config, the network and its tokenizer."""

    path: Path
    config: DreamConfig
    network: Dream
    tokenizer: Tokenizer | None  # None when the directory has no tokenizer files
    device: torch.device
    dtype: torch.dtype
    quant_config: QuantConfig | None = None  # how the Linear layers are quantized; None: not at all

    @property
    def quantization(self) -> str:
        return self.quant_config.scheme if self.quant_config is not None else "none"

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id



def load_weights(path: Path, cfg: DreamConfig, device: torch.device, dtype: torch.dtype) -> Dream:
    expected = expected_shapes(cfg)
    check_layers(path, cfg)
    tensors: dict[str, torch.Tensor] = {}
    for file, name, t in iter_tensors(path):
        check_tensor(file, name, t, expected)
        tensors[name] = t.to(device=device, dtype=dtype)
        check_finite(file, name, tensors[name])
    check_complete(path, cfg, tensors, expected)
    with torch.device("meta"):
        net = Dream(cfg)
    net.load_state_dict(tensors, strict=True, assign=True)
    return net.eval().requires_grad_(False)



def load_checkpoint(model: str | Path, device: str = "auto", dtype: str = "auto",
                    require_tokenizer: bool = True, quantize: str | QuantConfig = "none") -> Checkpoint:
    """Load a checkpoint directory or a locally cached hub id.

    require_tokenizer=False allows directories without tokenizer files (token ids in and out,
    as `diffucode generate` takes). quantize is "none", "nf4", "int8" or a QuantConfig: the
    Linear layers are quantized on the device while loading. A pre-quantized directory (from
    `diffucode quantize`) loads in the scheme it holds, without re-quantizing; "none" accepts
    it, another scheme is an error.
    """
    from diffucode.quantization.schemes import QuantConfig, check_scheme

    scheme = quantize.scheme if isinstance(quantize, QuantConfig) else check_scheme(quantize)
    path = resolve_path(model)
    cfg = read_config(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    tokenizer = Tokenizer.from_dir(path) if (has_tokenizer or require_tokenizer) else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but "
                              f"config.json's vocab_size is {cfg.vocab_size}")
    if "quantization_config" in cfg.extra:
        from diffucode.quantization.prequantized import load_prequantized

        net, qcfg = load_prequantized(path, cfg, dev, dt, asked=scheme)
    elif scheme != "none":
        from diffucode.quantization.schemes import prepare
        from diffucode.quantization.swap import quantize_network

        qcfg = quantize if isinstance(quantize, QuantConfig) else QuantConfig(scheme=scheme)
        prepare(qcfg.scheme, dev)  # a missing library is reported before 15 GB are read
        net = quantize_network(load_weights(path, cfg, torch.device("cpu"), dt), qcfg, dev, dt)
    else:
        net, qcfg = load_weights(path, cfg, dev, dt), None
    return Checkpoint(path=path, config=cfg, network=net, tokenizer=tokenizer, device=dev, dtype=dt,
                      quant_config=qcfg)



def pull(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Download a checkpoint from the Hugging Face hub (the only network access in diffucode).

    Only configs, safetensors and tokenizer files are fetched: no pickles and no Python code.
    huggingface_hub shows a progress bar per file.
    """
    if not HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a hub id (expected owner/name, "
                              f"e.g. apple/DiffuCoder-7B-cpGRPO)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=WEIGHT_FILES_TO_PULL))
