"""Pre-quantized checkpoints: written once by `diffucode quantize`, loaded without re-quantizing.

Layout of the output directory: the source's config.json with a `quantization_config` added,
its tokenizer files, and safetensors shards (model.safetensors, or model-0000k-of-0000n plus
model.safetensors.index.json) holding, for every quantized Linear, the stored form described in
linears.py, and every other tensor as the source has it. Each shard's safetensors metadata names
the scheme, the full config, the source and the library versions; the loader checks that they
agree with config.json and picks the handler from the scheme.

Writing streams: tensors are read one at a time from the memory-mapped source, quantized, and
collected into a shard that is written once it reaches `shard_bytes`. Host memory thus stays
near one layer plus one output shard; a 15 GB checkpoint is never held, let alone twice.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffucode.daemon.engine.weights import (check_complete, check_finite, check_tensor, expected_shapes,
                                              iter_tensors, read_config, read_header, resolve_device,
                                              resolve_path, weight_files)
from diffucode.daemon.errors import CheckpointError, QuantizationError
from diffucode.daemon.engine.network import Dream, DreamConfig

from .linears import quantize_linear, stored_spec
from .memory import device_memory
from .schemes import QuantConfig, library_versions, prepare
from .swap import install_prequantized, linear_targets

SCHEME_KEY = "diffucode.quantization.scheme"
CONFIG_KEY = "diffucode.quantization.config"
SOURCE_KEY = "diffucode.quantization.source"
VERSIONS_KEY = "diffucode.quantization.versions"
NEVER_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".py", ".pyc")


def quantized_linears(cfg: DreamConfig, qcfg: QuantConfig) -> dict[str, tuple[int, int]]:
    """Dotted names of the Linear modules the config quantizes -> (in_features, out_features)."""
    with torch.device("meta"):
        net = Dream(cfg)
    return {name: (lin.in_features, lin.out_features) for _, _, name, lin in linear_targets(net, qcfg)}


class ShardWriter:
    """Collects tensors and writes a shard whenever `shard_bytes` are reached."""

    def __init__(self, out: Path, metadata: dict[str, str], shard_bytes: int):
        self.out, self.metadata, self.shard_bytes = out, metadata, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.by_dtype: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        key = str(tensor.dtype).removeprefix("torch.")
        self.by_dtype[key] = self.by_dtype.get(key, 0) + nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        part = self.out / f".part-{len(self.parts) + 1:05d}.safetensors"
        save_file(unshared(self.pending), part, metadata=self.metadata)
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards as Hugging Face does and write the index; returns the file names."""
        self.flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (part, tensors) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{len(self.parts):05d}.safetensors"
            part.rename(self.out / name)
            weight_map.update({t: name for t in tensors})
            names.append(name)
        index = {"metadata": {"total_size": sum(self.by_dtype.values()), "quantization": self.metadata[SCHEME_KEY]},
                 "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (a library may hand out one code table
    twice): such duplicates are cloned, they are small."""
    seen, out = set(), {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if ptr is not None and ptr in seen else t
        seen.add(ptr)
    return out


def check_output_dir(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        raise QuantizationError(f"--out {out} is the source checkpoint; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizationError(f"--out {out} exists and is not an empty directory; choose a new one")


def write_prequantized(model: str | Path, out: str | Path, qcfg: QuantConfig, device: str = "auto",
                       shard_bytes: int = 1 << 30, progress: bool = True) -> dict:
    """Quantize checkpoint `model` into directory `out`, streaming; returns a report (sizes by
    dtype, seconds, device memory) for `diffucode quantize` to print."""
    started = time.perf_counter()
    source, out = resolve_path(model), Path(out).expanduser()
    cfg = read_config(source)
    if "quantization_config" in cfg.extra:
        raise QuantizationError(f"{source} is already quantized "
                                f"({cfg.extra['quantization_config'].get('scheme', '?')}); quantize the original")
    dev = resolve_device(device)
    backend = prepare(qcfg.scheme, dev)
    check_output_dir(source, out)
    expected, targets = expected_shapes(cfg), quantized_linears(cfg, qcfg)
    files = weight_files(source)
    versions = library_versions()
    metadata = {"format": "pt", SCHEME_KEY: qcfg.scheme, CONFIG_KEY: json.dumps(qcfg.to_dict()),
                SOURCE_KEY: str(source), VERSIONS_KEY: json.dumps(versions)}
    out.mkdir(parents=True, exist_ok=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    from tqdm import tqdm

    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, file=sys.stderr,
               desc=f"quantizing to {qcfg.scheme}", disable=not progress)
    writer, seen, source_by_dtype = ShardWriter(out, metadata, shard_bytes), {}, {}
    try:
        for file, name, t in iter_tensors(source):
            check_tensor(file, name, t, expected)
            check_finite(file, name, t)
            nbytes = t.numel() * t.element_size()
            key = str(t.dtype).removeprefix("torch.")
            source_by_dtype[key] = source_by_dtype.get(key, 0) + nbytes
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in targets:
                for suffix, value in quantize_linear(qcfg, t, dev).items():
                    writer.add(f"{module}.{suffix}", value)
            else:
                writer.add(name, t)
            seen[name] = True
            bar.update(nbytes)
        check_complete(source, cfg, seen, expected)
        shards = writer.close()
    except BaseException:
        for part, _ in writer.parts:
            part.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    raw = json.loads((source / "config.json").read_text())
    raw["quantization_config"] = {**qcfg.to_dict(), "source": str(source), "versions": versions}
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for extra in sorted(source.iterdir()):
        if (extra.is_file() and extra.name not in ("config.json", "model.safetensors.index.json")
                and not extra.name.endswith(NEVER_COPIED)):
            shutil.copyfile(extra, out / extra.name)
    return {"scheme": qcfg.scheme, "backend_here": backend, "source": str(source), "out": str(out),
            "shards": shards, "quantized_linears": len(targets), "seconds": time.perf_counter() - started,
            "source_bytes_by_dtype": source_by_dtype, "output_bytes_by_dtype": writer.by_dtype,
            "device": str(dev), **device_memory(dev)}


def stored_config(path: Path, cfg: DreamConfig) -> QuantConfig:
    """The QuantConfig in config.json, checked against every shard's safetensors metadata."""
    qcfg = QuantConfig.from_dict(cfg.extra["quantization_config"], f"{path / 'config.json'}: quantization_config")
    for file in weight_files(path):
        meta = read_header(file).get("__metadata__") or {}
        if meta.get(SCHEME_KEY) != qcfg.scheme:
            found = meta.get(SCHEME_KEY) or "no quantization metadata"
            raise QuantizationError(f"{file.name}: holds {found}, but config.json's quantization_config "
                                    f"says {qcfg.scheme}: the shards and config.json do not belong together")
    return qcfg


def load_prequantized(path: Path, cfg: DreamConfig, device: torch.device, dtype: torch.dtype,
                      asked: str = "none") -> tuple[Dream, QuantConfig]:
    """A network from a pre-quantized directory: stored tensors go straight into the modules."""
    qcfg = stored_config(path, cfg)
    if asked not in ("none", qcfg.scheme):
        raise QuantizationError(f"{path} is pre-quantized to {qcfg.scheme}, but {asked} was asked for; "
                                f"load it without --quantize (or with --quantize {qcfg.scheme}), or "
                                f"quantize the original checkpoint to {asked}")
    prepare(qcfg.scheme, device)
    expected, targets = expected_shapes(cfg), quantized_linears(cfg, qcfg)
    specs = {name: stored_spec(qcfg, *features) for name, features in targets.items()}
    stored: dict[str, dict[str, torch.Tensor]] = {name: {} for name in targets}
    rest: dict[str, torch.Tensor] = {}
    for file, name, t in iter_tensors(path):
        module = next((m for m in _prefixes(name) if m in targets and name[len(m) + 1:] in specs[m]), None)
        if module is None:
            check_tensor(file, name, t, expected)
            check_finite(file, name, t)
            rest[name] = t
            continue
        suffix = name[len(module) + 1:]
        want_dtype, want_shape = specs[module][suffix]
        if t.dtype != want_dtype or (want_shape is not None and tuple(t.shape) != want_shape):
            raise CheckpointError(f"{file.name}: tensor {name!r} has {t.dtype} {list(t.shape)}, expected "
                                  f"{want_dtype} {list(want_shape) if want_shape else '(any shape)'} "
                                  f"for {qcfg.scheme}")
        stored[module][suffix] = t
    missing = [f"{m}.{s}" for m in targets for s in specs[m] if s not in stored[m]]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing quantized tensors {shown}")
    check_complete(path, cfg, {**rest, **{f"{m}.weight": None for m in targets}}, expected)
    if "lm_head.weight" not in rest and "lm_head" not in targets and cfg.tie_word_embeddings:
        rest["lm_head.weight"] = rest["model.embed_tokens.weight"]
    with torch.device("meta"):
        net = Dream(cfg)
    install_prequantized(net, qcfg, stored, rest, device, dtype)
    return net.eval().requires_grad_(False), qcfg


def _prefixes(name: str):
    """'a.b.c.d' -> 'a.b.c', 'a.b', 'a' (the module a stored tensor may belong to)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])

