"""Tiny Dream checkpoints with random weights, written in the real checkpoints' file layout.

Tests, benchmarks and examples build them in temp dirs and load them through the real loader:
config.json, model.safetensors (or shards + index), and a byte-level BPE tokenizer trained on a
few lines of code, saved as vocab.json / merges.txt / added_tokens.json / tokenizer_config.json.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .network import Dream, DreamConfig
from .tokenizer import train_byte_level_bpe

SAMPLE_CODE = '''\
def add(a, b):
    """Return the sum of a and b."""
    return a + b


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()
'''


def default_corpus() -> list[str]:
    import json as json_module
    import textwrap

    return [SAMPLE_CODE, inspect.getsource(textwrap), inspect.getsource(json_module.decoder)]


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tokenizer_vocab: int = 400,
    instruct: bool = False,
    shards: int = 1,
    tokenizer_files: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    texts: list[str] | None = None,
) -> Path:
    """Write a randomly initialised Dream checkpoint and return its directory.

    instruct=True adds `<|dlm_pad|>` and a chat template, as the Instruct/cpGRPO checkpoints
    have; shards > 1 writes model-0000k-of-0000n.safetensors plus the index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
    if instruct:
        specials.append("<|dlm_pad|>")
    tok = train_byte_level_bpe(texts or default_corpus(), out, vocab_size=tokenizer_vocab,
                               special_tokens=specials)
    eos, mask = tok.token_id("<|endoftext|>"), tok.token_id("<|mask|>")
    cfg = {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "_name_or_path": "tiny-dream-instruct" if instruct else "tiny-dream-base",
        "vocab_size": (tok.vocab_size + 7) // 8 * 8,  # padded like the real 152064 > 151667
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "mask_token_id": mask,
        "use_cache": False,
        "attention_dropout": 0.0,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    torch.manual_seed(seed)
    net = Dream(DreamConfig.from_dict(cfg))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.08)
    state = {k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}
    write_weights(state, out, shards)

    if not tokenizer_files:
        for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            (out / name).unlink(missing_ok=True)
    return out


def write_weights(state: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json."""
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, out / "model.safetensors", metadata=meta)
        return
    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, out / file, metadata=meta)
        weight_map.update({n: file for n in part})
        total += sum(state[n].numel() * state[n].element_size() for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m diffucode.daemon.engine.tiny OUT_DIR  (writes a tiny random Dream checkpoint)")
    print(write_tiny_checkpoint(sys.argv[1]))
