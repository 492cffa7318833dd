"""Reading a checkpoint's files: where it is (a directory, or a hub id in the local cache), its
config.json, and its safetensors tensors, each checked against the network config.json describes.

Each tensor is read into memory of its own, never served from a memory map: a checkpoint
overwritten or truncated in place while the daemon runs then cannot take it down (a mapped page
that vanishes is a SIGBUS), and a file cut short while it is read is an error naming it. Every
name, shape and dtype is checked first, and every value must be finite; an error names the file
and the tensor, what was expected and what was found. checkpoint.py builds the network from
these; diffucode.quantization's pre-quantized reader uses them too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError
from .network import Dream, DreamConfig


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")



def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for but CUDA is not available here")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise CheckpointError(f"unknown device {device!r} (use auto, cpu or cuda)") from e



def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (use auto, {', '.join(sorted(set(DTYPES)))})")
    return DTYPES[dtype]



def resolve_path(model: str | Path) -> Path:
    """A checkpoint directory, or a hub id looked up in the local Hugging Face cache only."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model {str(model)!r} is a file; expected a checkpoint directory")
    if not HUB_ID.match(str(model)):
        raise CheckpointError(f"model {str(model)!r}: no such directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"model {str(model)!r} is not in the local Hugging Face cache; "
                              f"download it once with `diffucode pull {model}`") from e



def read_config(path: Path) -> DreamConfig:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type")
    if str(model_type).lower() != "dream":
        raise CheckpointError(f"{file}: model_type {model_type!r} is not a Dream checkpoint "
                              f"(expected 'Dream', as DiffuCoder, Dream and Dream-Coder have)")
    try:
        cfg = DreamConfig.from_dict(raw)
    except TypeError as e:
        raise CheckpointError(f"{file}: {e}") from e
    problems = cfg.check()
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    return cfg



def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it is sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {', '.join(others)}: only safetensors are loaded, never pickles)" if others else ""
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json{hint}")



def expected_shapes(cfg: DreamConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, by name, with its shape."""
    with torch.device("meta"):
        net = Dream(cfg)
    return {name: tuple(p.shape) for name, p in net.state_dict().items()}



SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit



def safetensors_header(f, file: Path, size: int) -> tuple[dict, int]:
    """The JSON header of an open safetensors file and where its data starts."""
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
    n = int.from_bytes(raw, "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{file}: not a safetensors file (header of {n} bytes in a file of {size})")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n



def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor entries and __metadata__), nothing more read."""
    try:
        with open(file, "rb") as f:
            return safetensors_header(f, file, os.fstat(f.fileno()).st_size)[0]
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from e



def _entry(file: Path, name: str, info, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry ({e!r})") from e
    numel = 1
    for d in shape:
        numel *= d
    want = numel * torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != want:
        raise CheckpointError(f"{file}: tensor {name!r} spans bytes {begin}..{end}, but {info['dtype']} "
                              f"{shape} needs {want}")
    if end > data_size:
        raise CheckpointError(f"{file}: tensor {name!r} ends at byte {end} of the data, but the file holds "
                              f"only {data_size} (truncated?)")
    return dtype, shape, begin, end



def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one safetensors file, in file order, each read into fresh memory (no
    memory map: the file may change under a running daemon without harm)."""
    try:
        f = open(file, "rb")
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        header, start = safetensors_header(f, file, size)
        entries = {k: _entry(file, k, v, size - start) for k, v in header.items() if k != "__metadata__"}
        for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            t = torch.empty(shape, dtype=dtype)
            if end > begin:
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.seek(start + begin)
                got = 0
                while got < end - begin:
                    n = f.readinto(view[got:])
                    if not n:
                        raise CheckpointError(f"{file}: tensor {name!r} is cut short at byte {begin + got} "
                                              f"(the file changed or was truncated while it was read)")
                    got += n
            yield name, t



def iter_tensors(path: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) for every tensor of a checkpoint, one at a time, each in its own memory."""
    for file in weight_files(path):
        for name, tensor in read_tensors(file):
            yield file, name, tensor



def check_tensor(file: Path, name: str, t: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> None:
    """A full-precision tensor's name, shape and dtype against the network config.json describes."""
    if name not in expected:
        raise CheckpointError(f"{file.name}: unexpected tensor {name!r} "
                              f"(not part of a Dream network with this config.json)")
    if tuple(t.shape) != expected[name]:
        raise CheckpointError(f"{file.name}: tensor {name!r} has shape {list(t.shape)}, "
                              f"expected {list(expected[name])} from config.json")
    if not t.is_floating_point():
        raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {t.dtype}, "
                              f"expected a floating-point dtype")



def check_finite(file: Path, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{file.name}: tensor {name!r} holds {bad} NaN or infinite value{'s' * (bad > 1)}")



def check_layers(path: Path, cfg: DreamConfig) -> None:
    """Whole layers beyond num_hidden_layers (0..N-1 all there, N too many): config.json's count
    is what is wrong, so say so. (A stray tensor is an unexpected tensor, reported as such.)"""
    found = set()
    for file in weight_files(path):
        found |= {int(m.group(1)) for k in read_header(file) if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if found and max(found) >= cfg.num_hidden_layers and found == set(range(max(found) + 1)):
        raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers is {cfg.num_hidden_layers}, but the "
                              f"weights hold layers 0..{max(found)} ({len(found)} layers)")



def check_complete(path: Path, cfg: DreamConfig, tensors: dict, expected) -> None:
    """Every expected tensor is there (a tied lm_head may borrow the embeddings)."""
    if "lm_head.weight" not in tensors and cfg.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = [n for n in expected if n not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensors {shown}")
