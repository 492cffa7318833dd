"""LoRA adapters on the network's linear layers: attach, switch off, save, load (issue 18).

`diffucode tune` trains them; `--adapter` on infill, refine and serve applies them. A LoRA layer
wraps any module that maps (..., in_features) to (..., out_features) — a plain nn.Linear or one
of quantization/'s int8 and nf4 layers — and adds a low-rank path beside it:

    y = base(x) + (B @ A)(dropout(x)) * alpha / rank        A: (rank, in), B: (out, rank), B starts at 0

so a fresh adapter changes nothing, and the base weights are never touched (an adapter on a
quantized model needs no merge). The files are peft's layout, so peft and the tools around it
read them: `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` with
keys `base_model.model.<module>.lora_A.weight`. Our own record sits beside them in `tune.json`:
the base model's sha256 (an adapter loads only on the weights it was trained on), the settings,
the reward per step, the time.

We wrap the layers ourselves rather than through peft: peft imports transformers and
bitsandbytes (seconds at every daemon start, and bitsandbytes reaches for the hub at import),
and it does not know quantization/'s CPU int8 layers. tests/test_lora.py checks that peft,
reading our files, computes the same outputs.

Tensors and files only: no tokenizer, no sampling, no training loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InputError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE = "adapter_config.json", "adapter_model.safetensors", "tune.json"
PEFT_PREFIX = "base_model.model."
MAX_RANK = 256


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS  # the last name of each wrapped module

    def check(self) -> None:
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise InputError(f"LoRA rank must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise InputError(f"LoRA targets must be some of {', '.join(TARGETS)}; got {list(self.targets)}")


class LoraLinear(nn.Module):
    """`base` plus a low-rank path (module docstring). `enabled = False` gives the base alone."""

    def __init__(self, base: nn.Module, settings: LoraSettings, device: torch.device, seed: int = 0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = settings.rank, settings.alpha / settings.rank
        # the low-rank path trains and runs in fp32 whatever the base's dtype (it is small)
        self.lora_A = nn.Linear(self.in_features, settings.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(settings.rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        gen = torch.Generator(device=device).manual_seed(seed)  # the same start in every process
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=gen)  # peft's initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.lora_B(self.lora_A(self.dropout(x.float()))) * self.scaling).to(y.dtype)


def _wrapped(network: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in network.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def attached(network: nn.Module) -> bool:
    return any(True for _ in _wrapped(network))


def attach(network: nn.Module, settings: LoraSettings, seed: int = 0) -> list[str]:
    """Wrap every target layer in a fresh LoraLinear (B = 0: outputs unchanged); the names wrapped.
    A's random start depends on `seed` and the layer's name only."""
    settings.check()
    if attached(network):
        raise InputError("the network already carries a LoRA adapter; detach it first")
    device = next(network.parameters()).device
    names = []
    for parent_name, parent in list(network.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in settings.targets and hasattr(child, "in_features"):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                layer_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
                setattr(parent, child_name, LoraLinear(child, settings, device, layer_seed))
                names.append(name)
    if not names:
        raise InputError(f"no layer named {', '.join(settings.targets)} to carry a LoRA adapter")
    return names


def detach(network: nn.Module) -> None:
    """Put the base layers back (the adapter is dropped)."""
    for parent in list(network.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, child_name, child.base)


def lora_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The adapter's weights: what `tune` trains (everything else stays frozen)."""
    return [p for _, m in _wrapped(network) for p in (m.lora_A.weight, m.lora_B.weight)]


@contextmanager
def disabled(network: nn.Module):
    """The base model alone for a while: GRPO's reference policy without a second copy."""
    layers = [m for _, m in _wrapped(network)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(layers, before):
            m.enabled = state


def lora_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names."""
    state = {}
    for name, m in _wrapped(network):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    return state


def weights_sha256(checkpoint_dir: Path) -> str:
    """sha256 over the checkpoint's weight files (sorted by name, contents concatenated): which
    base model an adapter belongs to. Cached by path, size and mtime (a 7B reads 15 GB once)."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise InputError(f"{checkpoint_dir}: no .safetensors files to fingerprint")
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffucode" / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        known[key] = digest
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs the hash next time
    return digest


@dataclass
class AdapterInfo:
    """What `--adapter` loaded, for `diffucode status` and logs."""

    path: str
    settings: LoraSettings
    base_sha256: str
    layers: int
    record: dict = field(default_factory=dict)  # tune.json: settings, reward per step, time

    def summary(self) -> dict:
        steps = self.record.get("steps", [])
        return {"path": self.path, "rank": self.settings.rank, "alpha": self.settings.alpha, "layers": self.layers,
                "base_sha256": self.base_sha256, "steps": len(steps),
                "last_reward": steps[-1].get("reward") if steps else None}


def save_adapter(network: nn.Module, folder: Path, settings: LoraSettings, base_sha256: str, base_path: str,
                 record: dict | None = None) -> Path:
    """Write the adapter (peft's two files and our tune.json) into `folder`, atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "r": settings.rank, "lora_alpha": settings.alpha,
              "lora_dropout": settings.dropout, "target_modules": sorted(settings.targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": base_path}
    ours = {"base_sha256": base_sha256, "base_model": base_path, "lora": asdict(settings) | {"targets": list(settings.targets)},
            **(record or {})}
    for name, write in ((WEIGHTS_FILE, lambda p: save_file(lora_state(network), str(p), metadata={"format": "pt"})),
                        (CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=1) + "\n")),
                        (RECORD_FILE, lambda p: p.write_text(json.dumps(ours, indent=1) + "\n"))):
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        write(tmp)
        tmp.replace(folder / name)
    return folder


def read_adapter(folder: Path) -> tuple[LoraSettings, dict[str, torch.Tensor], dict]:
    """Settings, tensors and record of an adapter folder, checked; InputError naming what is wrong."""
    folder = Path(folder)
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{folder}: not a LoRA adapter folder (missing {', '.join(missing)})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        record = json.loads((folder / RECORD_FILE).read_text()) if (folder / RECORD_FILE).is_file() else {}
    except ValueError as e:
        raise InputError(f"{folder}: unreadable adapter JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise InputError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    targets = config.get("target_modules") or []
    settings = LoraSettings(rank=config.get("r"), alpha=config.get("lora_alpha"), dropout=config.get("lora_dropout", 0.0),
                            targets=tuple(targets) if isinstance(targets, list) else (targets,))
    settings.check()
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise InputError(f"{folder / WEIGHTS_FILE}: unreadable ({e})") from None
    return settings, tensors, record


def load_adapter(network: nn.Module, folder: Path, base_sha256: str | None) -> AdapterInfo:
    """Attach the adapter in `folder` to `network` (replacing one attached before). When the
    adapter records its base model, `base_sha256` must match it."""
    settings, tensors, record = read_adapter(folder)
    trained_on = record.get("base_sha256")
    if base_sha256 is not None and trained_on and trained_on != base_sha256:
        raise InputError(f"{folder}: the adapter was trained on base weights sha256 {trained_on[:12]}…, "
                         f"this checkpoint's are {base_sha256[:12]}…")
    expected = {}
    for name, module in network.named_modules():
        leaf = name.rpartition(".")[2]
        base = module.base if isinstance(module, LoraLinear) else module
        if leaf in settings.targets and hasattr(base, "in_features"):
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (settings.rank, base.in_features)
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (base.out_features, settings.rank)
    unknown = sorted(set(tensors) - set(expected))
    absent = sorted(set(expected) - set(tensors))
    if unknown or absent:
        raise InputError(f"{folder}: the adapter does not fit this network ("
                         + "; ".join(x for x in (f"unexpected {unknown[:3]}" if unknown else "",
                                                 f"missing {absent[:3]}" if absent else "") if x) + ")")
    wrong = [f"{k} is {tuple(t.shape)}, expected {expected[k]}" for k, t in tensors.items() if tuple(t.shape) != expected[k]]
    if wrong:
        raise InputError(f"{folder}: the adapter does not fit this network ({'; '.join(wrong[:3])})")
    detach(network)
    attach(network, settings)
    with torch.no_grad():
        for name, m in _wrapped(network):
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    network.eval()
    return AdapterInfo(path=str(folder), settings=settings, base_sha256=trained_on or "", layers=len(expected) // 2,
                       record=record)
