"""Train the bundled tiny Dream model on the Python standard library's source.

The masked-diffusion objective of DiffuCoder's pre-training: for each sequence a mask ratio t
is drawn in (eps, 1], each token is masked with probability t, and the cross-entropy on the
masked positions (read through the logit shift, as at inference) is weighted by 1/t. Position 0
is never masked: the shift gives it no left neighbour to be predicted from.

Infill-aware padding: with probability --pad-prob a run of `<|endoftext|>` tokens is inserted
after a line break inside the window. The model thus learns that end tokens inside a span mean
"nothing here", which is how the infill task lets a canvas shrink (daemon/tasks.py).

Data: the .py files of this machine's CPython standard library (PSF licence), tests and
site-packages excluded, split into training and held-out sets by a hash of each file's path,
so the split is deterministic. The tokenizer (byte-level BPE with the special tokens, in the
real checkpoints' file layout) is trained on the training files.

    python training/train.py --out diffucode/models/tiny-stdlib --steps 1500 --seed 0

Writes the checkpoint (config.json, model.safetensors in bf16, tokenizer files) and
training.json (command, seed, data hash, sizes, the loss curve, time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffucode.daemon.network import Dream, DreamConfig
from diffucode.daemon.tiny import write_weights
from diffucode.daemon.tokenizer import train_byte_level_bpe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"]
SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py") if not SKIP_PARTS & set(f.relative_to(root).parts))


def split(files: list[Path], held_out_every: int = 10) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file: a file is held out when the hash of its relative path says so."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for f in files:
        h = int(hashlib.sha256(str(f.relative_to(root)).encode()).hexdigest(), 16)
        (held if h % held_out_every == 0 else train).append(f)
    return train, held


def data_hash(files: list[Path]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def read(f: Path) -> str:
    return f.read_bytes().decode("utf-8", errors="replace")


class Batches:
    """Random windows of the token stream, with infill-aware end-token padding."""

    def __init__(self, docs: list[list[int]], seq_len: int, eos: int, newline_ids: set[int], pad_prob: float,
                 rng: random.Random):
        self.docs = [d for d in docs if len(d) > 16]
        self.weights = [len(d) for d in self.docs]
        self.seq_len, self.eos, self.newlines, self.pad_prob, self.rng = seq_len, eos, newline_ids, pad_prob, rng

    def window(self) -> list[int]:
        doc = self.rng.choices(self.docs, weights=self.weights)[0]
        start = self.rng.randrange(max(1, len(doc) - self.seq_len // 2))
        w = doc[start:start + self.seq_len]
        if self.rng.random() < self.pad_prob:
            breaks = [i + 1 for i, t in enumerate(w[:-1]) if t in self.newlines]
            if breaks:
                at = self.rng.choice(breaks)
                w = w[:at] + [self.eos] * self.rng.randint(1, 12) + w[at:]
        w = w[:self.seq_len]
        return w + [self.eos] * (self.seq_len - len(w))  # short files end in end tokens, as at inference

    def __call__(self, batch: int) -> torch.Tensor:
        return torch.tensor([self.window() for _ in range(batch)])


def diffusion_loss(net: Dream, x0: torch.Tensor, mask_id: int, eps: float, gen: torch.Generator) -> torch.Tensor:
    B, L = x0.shape
    t = eps + (1 - eps) * torch.rand(B, 1, generator=gen)
    masked = torch.rand(B, L, generator=gen) < t
    masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = net(xt).logits  # shifted: row p predicts position p
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
    return (ce * masked / t).sum() / (B * L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--pad-prob", type=float, default=0.5)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()

    train_files, held_files = split(stdlib_files())
    texts = [read(f) for f in train_files]
    print(f"data: {len(train_files)} training files, {len(held_files)} held out", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_byte_level_bpe(texts, args.out, vocab_size=args.vocab, special_tokens=SPECIALS)
    docs = [tok.encode(t) for t in texts]
    eos, mask_id = tok.token_id("<|endoftext|>"), tok.token_id("<|mask|>")
    newline_ids = {i for i in range(tok.vocab_size) if tok.decode([i]).endswith("\n")}
    n_tokens = sum(len(d) for d in docs)
    print(f"tokenizer: {tok.vocab_size} tokens; corpus {n_tokens} tokens", file=sys.stderr)

    cfg_dict = {
        "architectures": ["DreamModel"], "model_type": "Dream", "_name_or_path": "diffucode/tiny-stdlib",
        "vocab_size": (tok.vocab_size + 7) // 8 * 8, "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": args.seq_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": eos, "eos_token_id": eos,
        "pad_token_id": eos, "mask_token_id": mask_id, "use_cache": False, "attention_dropout": 0.0,
        "diffucode_prompt_format": "raw",  # a base model, although its tokenizer has <|dlm_pad|>
    }
    net = Dream(DreamConfig.from_dict(cfg_dict)).to(args.device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    params = sum(p.numel() for p in net.parameters())
    print(f"model: {params / 1e6:.2f} M parameters", file=sys.stderr)

    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = Batches(docs, args.seq_len, eos, newline_ids, args.pad_prob, random.Random(args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    net.train()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = batches(args.batch).to(args.device)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16):
            loss = diffusion_loss(net, x0, mask_id, args.eps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            curve.append({"step": step, "loss": round(loss.item(), 4), "lr": round(lr, 6),
                          "seconds": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)

    net.eval()
    (args.out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in net.state_dict().items()}
    write_weights(state, args.out)
    record = {
        "command": " ".join(["python", "training/train.py", *sys.argv[1:]]), "seed": args.seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python": sys.version.split()[0], "torch": torch.__version__,
        "data": {"source": "CPython standard library .py files (PSF licence)", "train_files": len(train_files),
                 "held_out_files": len(held_files), "train_tokens": n_tokens, "sha256": data_hash(train_files)},
        "parameters": params, "minutes": round((time.time() - started) / 60, 1), "curve": curve,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} in {record['minutes']} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
