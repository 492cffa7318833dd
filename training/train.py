"""Train the bundled tiny Dream model on the Python standard library's source.

The masked-diffusion objective of DiffuCoder's pre-training: for each sequence a mask ratio t
is drawn in (eps, 1], each token is masked with probability t, and the cross-entropy on the
masked positions (read through the logit shift, as at inference) is weighted by 1/t. Position 0
is never masked: the shift gives it no left neighbour to be predicted from.

End tokens inside a window, so that the model learns that end tokens inside a span mean "nothing
here", which is how the infill task lets a canvas shrink (daemon/tasks.py):
- --pad-prob (0.5; the bundled model's first and third runs): a run of `<|endoftext|>` tokens
  inserted after a line break;
- --infill-prob (0 by default; the bundled model's second and third runs, see README): a window
  laid out as the infill task lays out a request: a middle (lines or a piece of a line), then end
  tokens up to a canvas, and only that canvas masked.

Data: the .py files of this machine's CPython standard library (PSF licence), tests and
site-packages excluded, split into training and held-out sets by a hash of each file's path,
so the split is deterministic. The tokenizer (byte-level BPE with the special tokens, in the
real checkpoints' file layout) is trained on the training files.

    python training/train.py --out diffucode/models/tiny-stdlib --steps 1500 --seed 0

--init DIR continues from an earlier run's checkpoint: its shape, tokenizer and weights are
kept (the optimizer starts afresh, with its own warmup and cosine schedule), and training.json
records the earlier run under "init" so the chain of commands stays reproducible.

Writes the checkpoint (config.json, model.safetensors in bf16, tokenizer files) and
training.json (command, seed, data hash, sizes, the loss curve, time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffucode.daemon.checkpoint import load_weights, read_config
from diffucode.daemon.network import Dream, DreamConfig
from diffucode.daemon.tiny import write_weights
from diffucode.daemon.tokenizer import Tokenizer, train_byte_level_bpe

TOKENIZER_FILES = ["vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"]

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
    """Random windows of the token stream; a share of them laid out as infill examples.

    An infill example is what the infill task gives the model at inference: a middle (one to
    three lines, or a piece of a line) cut out of the window, followed by a run of end tokens
    up to a canvas length, with only the canvas open to masking. The model thus learns where a
    middle ends and that end tokens fill the rest of a canvas (how infill lets a canvas shrink).
    """

    def __init__(self, docs: list[list[int]], seq_len: int, eos: int, newline_ids: set[int], infill_prob: float,
                 rng: random.Random, max_pad: int = 40, pad_prob: float = 0.0):
        self.docs = [d for d in docs if len(d) > 16]
        self.weights = [len(d) for d in self.docs]
        self.seq_len, self.eos, self.newlines, self.infill_prob, self.rng = seq_len, eos, newline_ids, infill_prob, rng
        self.max_pad, self.pad_prob = max_pad, pad_prob

    def window(self) -> tuple[list[int], list[bool]]:
        doc = self.rng.choices(self.docs, weights=self.weights)[0]
        start = self.rng.randrange(max(1, len(doc) - self.seq_len // 2))
        w = doc[start:start + self.seq_len]
        region = [True] * len(w)
        if self.infill_prob and self.rng.random() < self.infill_prob:
            w, region = self.infill(w)
        elif self.pad_prob and self.rng.random() < self.pad_prob:  # end tokens after a line break
            breaks = [i + 1 for i, t in enumerate(w[:-1]) if t in self.newlines]
            if breaks:
                at = self.rng.choice(breaks)
                w = w[:at] + [self.eos] * self.rng.randint(1, 12) + w[at:]
                region = [True] * len(w)
        w, region = w[:self.seq_len], region[:self.seq_len]
        fill = self.seq_len - len(w)  # short files end in end tokens, as at inference
        return w + [self.eos] * fill, region + [True] * fill

    def infill(self, w: list[int]) -> tuple[list[int], list[bool]]:
        """w with a middle followed by end tokens; region marks the canvas (middle + end tokens)."""
        line_starts = [i + 1 for i, t in enumerate(w[:-2]) if t in self.newlines and i + 1 >= 8]
        if line_starts and self.rng.random() < 0.8:
            s = self.rng.choice(line_starts)
            ends = [i for i in range(s + 1, len(w)) if w[i] in self.newlines][:3]
            e = self.rng.choice(ends) if ends else min(len(w), s + self.rng.randint(1, 24))
        else:  # a cursor anywhere: a piece of a line
            s = self.rng.randrange(min(8, len(w) - 1), len(w) - 1)
            e = min(len(w), s + self.rng.randint(1, 24))
        middle = w[s:e][:64]
        pad = [self.eos] * self.rng.randint(0, self.max_pad)
        out = w[:s] + middle + pad + w[s + len(middle):]
        region = [False] * s + [True] * (len(middle) + len(pad)) + [False] * (len(w) - s - len(middle))
        return out, region

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.window() for _ in range(batch)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def init_weights(net: Dream) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)


def diffusion_loss(net: Dream, x0: torch.Tensor, region: torch.Tensor, mask_id: int, eps: float,
                   gen: torch.Generator) -> torch.Tensor:
    """Each row's positions in `region` are masked with probability t; the cross-entropy on the
    masked ones, weighted by 1/t, is averaged over the region (the whole window for plain rows)."""
    B, L = x0.shape
    t = eps + (1 - eps) * torch.rand(B, 1, generator=gen)
    masked = (torch.rand(B, L, generator=gen) < t) & region
    masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = net(xt).logits  # shifted: row p predicts position p
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
    return ((ce * masked / t).sum(dim=1) / region.sum(dim=1).clamp(min=1)).mean()


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
    ap.add_argument("--pad-prob", type=float, default=0.5,
                    help="share of windows with a run of end tokens inserted after a line break")
    ap.add_argument("--infill-prob", type=float, default=0.0, help="share of windows laid out as infill examples")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--init", type=Path, help="continue from this checkpoint (an earlier run's --out)")
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
    if args.init:
        if args.init.resolve() == args.out.resolve():
            raise SystemExit(f"--init {args.init} and --out {args.out} are the same directory; write elsewhere")
        for name in TOKENIZER_FILES:
            shutil.copyfile(args.init / name, args.out / name)
        tok = Tokenizer.from_dir(args.out)
    else:
        tok = train_byte_level_bpe(texts, args.out, vocab_size=args.vocab, special_tokens=SPECIALS)
    docs = [tok.encode(t) for t in texts]
    eos, mask_id = tok.token_id("<|endoftext|>"), tok.token_id("<|mask|>")
    newline_ids = {i for i in range(tok.vocab_size) if tok.decode([i]).endswith("\n")}
    n_tokens = sum(len(d) for d in docs)
    print(f"tokenizer: {tok.vocab_size} tokens; corpus {n_tokens} tokens", file=sys.stderr)

    init_record = None
    if args.init:  # the earlier run's shape (and positions) with its weights
        cfg_dict = json.loads((args.init / "config.json").read_text())
        args.seq_len = cfg_dict["max_position_embeddings"]
        net = load_weights(args.init, read_config(args.init), torch.device(args.device), torch.float32)
        net.requires_grad_(True)
        init_record = {"from": str(args.init),
                       "weights_sha256": hashlib.sha256((args.init / "model.safetensors").read_bytes()).hexdigest(),
                       "record": json.loads((args.init / "training.json").read_text())}
    else:
        cfg_dict = {
            "architectures": ["DreamModel"], "model_type": "Dream", "_name_or_path": "diffucode/tiny-stdlib",
            "vocab_size": (tok.vocab_size + 7) // 8 * 8, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "hidden_act": "silu",
            "max_position_embeddings": args.seq_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": eos,
            "eos_token_id": eos, "pad_token_id": eos, "mask_token_id": mask_id, "use_cache": False,
            "attention_dropout": 0.0,
            "diffucode_prompt_format": "raw",  # a base model, although its tokenizer has <|dlm_pad|>
        }
        net = Dream(DreamConfig.from_dict(cfg_dict)).to(args.device)
        init_weights(net)
    params = sum(p.numel() for p in net.parameters())
    print(f"model: {params / 1e6:.2f} M parameters", file=sys.stderr)

    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = Batches(docs, args.seq_len, eos, newline_ids, args.infill_prob, random.Random(args.seed),
                      pad_prob=args.pad_prob)
    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    net.train()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, region = batches(args.batch)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16):
            loss = diffusion_loss(net, x0.to(args.device), region.to(args.device), mask_id, args.eps, gen)
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
        "init": init_record, "parameters": params, "minutes": round((time.time() - started) / 60, 1), "curve": curve,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} in {record['minutes']} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
