"""Train the bundled Dream model: masked diffusion on code, laid out as the editor asks for it.

The objective is DiffuCoder's pre-training loss: for each window a mask ratio t is drawn in
(eps, 1], each token of the window's region is masked with probability t, and the cross-entropy
on the masked positions (read through the logit shift, as at inference) is weighted by 1/t.
Position 0 is never masked: the shift gives it no left neighbour to be predicted from.

Two kinds of windows (`--infill-prob` of them infill examples):
- plain: 1,024 tokens of the training stream (files joined by end tokens), all open to masking;
- infill: the window laid out as daemon/tasks.py lays out an infill request, the code before, the
  middle and the code after each tokenized on its own: [before][middle][end tokens][after], with
  only the canvas (middle + end tokens) open to masking. Middles are what the editor asks for:
  one whole line with its trailing newline, several whole lines, or the rest of a line from a
  cursor inside it (optionally with the lines that follow), whose newline stays in the code after.
  The canvas is a typical request size (8 .. 128) at least as long as the middle, so the end
  tokens say where the middle stops.

Runs last: a run folder (`--run DIR`) holds the config, the tokenizer, and under state/ the fp32
weights, the AdamW moments (safetensors, no pickles) and progress.json (step, windows seen).
Everything random is a pure function of (seed, window index) or (seed, step), so the data
position and the random state are the counters in progress.json: a run stopped (Ctrl-C, SIGTERM,
`--minutes`, `--until-step`) and continued later, on this machine or another, draws exactly what
it would have drawn. The learning-rate schedule (warmup, cosine to a tenth) spans `--total-steps`,
fixed when the run is created. training.json in the run folder records every segment: command,
hardware, steps, tokens seen, minutes, loss curve and held-out loss.

    python training/data.py build                                  # the corpus (training/packages.json)
    nice python training/train.py --run runs/v2 --total-steps 8000 --minutes 60   # create or continue
    python training/train.py --run runs/v2 --export diffucode/models/tiny-code    # the bf16 bundle
    python training/train.py --run /tmp/x --device cuda --dry-run  # two steps on a throwaway copy

`--device cuda` trains in bf16 autocast; on CPU, bf16 autocast is used only where the CPU has
native bf16 (AVX512-BF16 or AMX): elsewhere it is emulated and about 25x slower than fp32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data
from diffucode.daemon.engine.bench import hardware
from diffucode.daemon.engine.network import Dream, DreamConfig
from diffucode.daemon.engine.tokenizer import Tokenizer, train_byte_level_bpe

TOKENIZER_FILES = ["vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"]
CANVASES = (8, 16, 24, 32, 48, 64, 96, 128)  # request sizes an infill example's canvas is drawn from
MAX_MIDDLE = 96  # tokens


# --- data ---------------------------------------------------------------------------------------

def tokenize_stream(docs: list[data.Doc], tok: Tokenizer, eos: int) -> np.ndarray:
    """The documents' ids joined into one stream, each followed by an end token."""
    backend = tok.backend
    backend.encode_special_tokens = True  # special-token strings in code are plain text
    parts = []
    for i in range(0, len(docs), 512):
        for enc in backend.encode_batch([d.text for d in docs[i:i + 512]], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def cached_stream(corpus: Path, split: str, tok: Tokenizer, tok_dir: Path, eos: int) -> np.ndarray:
    """tokenize_stream, cached in the corpus folder by split, corpus and tokenizer hash."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        h.update((tok_dir / name).read_bytes())
    summary = json.loads((corpus / "corpus.json").read_text())
    key = f"{split}-{summary['splits'][split]['sha256'][:12]}-{h.hexdigest()[:12]}"
    path = corpus / f"tokens-{key}.npy"
    if path.exists():
        return np.load(path)
    t0 = time.time()
    stream = tokenize_stream(data.read_split(corpus, split), tok, eos)
    np.save(path.with_suffix(".tmp.npy"), stream)
    path.with_suffix(".tmp.npy").replace(path)
    print(f"tokenized {split}: {len(stream):,} tokens in {time.time() - t0:.0f} s", file=sys.stderr)
    return stream


class Windows:
    """Window k of the run: a pure function of (seed, k).

    The stream is cut into slots of seq_len tokens, visited in a fresh permutation each epoch;
    window k is slot perm[k % slots] of epoch k // slots, laid out as an infill example with
    probability infill_prob (decided, with the example's choices, by a Random seeded with k)."""

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int, tok: Tokenizer, eos: int, infill_prob: float):
        self.stream, self.seq_len, self.seed, self.tok, self.eos = stream, seq_len, seed, tok, eos
        self.infill_prob = infill_prob
        self.slots = len(stream) // seq_len
        if self.slots < 1:
            raise SystemExit(f"the corpus has {len(stream)} tokens, fewer than one window of {seq_len}")
        self._perm: tuple[int, np.ndarray] | None = None
        self.newlines = {i for i in range(tok.vocab_size) if tok.decode([i]).endswith("\n")}

    def slot(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.slots)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.slots))
        start = int(self._perm[1][i]) * self.seq_len
        return self.stream[start:start + self.seq_len]

    def window(self, k: int) -> tuple[list[int], list[bool]]:
        """Token ids and the region open to masking."""
        w = self.slot(k).tolist()
        rng = random.Random(self.seed * 1_000_003 + k)
        if self.infill_prob and rng.random() < self.infill_prob:
            example = self.infill(w, rng)
            if example is not None:
                return example
        return w, [True] * len(w)

    def batch(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.window(first + r) for r in range(n)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def middle(self, w: list[int], rng: random.Random) -> tuple[int, int, bool] | None:
        """[s, e) of the middle in w, and whether the middle is the rest of a line (then the
        newline that ends w[e - 1] belongs to the code after); None when there is no room."""
        ends = [i + 1 for i, t in enumerate(w) if t in self.newlines]  # a line starts at each
        starts = [i for i in ends if 16 <= i < len(w) - 8]
        if not starts:
            return None
        kind = rng.random()
        if kind < 0.7:  # whole lines, the trailing newline included: one (45 %) or several (25 %)
            s = rng.choice(starts)
            following = [e for e in ends if e > s]
            if not following:
                return None
            n = 1 if kind < 0.45 else rng.randint(2, 8)
            return s, following[min(n, len(following)) - 1], False
        # a cursor inside a line: the rest of it (30 % of the time with up to 4 more lines)
        s = rng.randrange(16, len(w) - 8)
        following = [e for e in ends if e > s]
        if not following:
            return None
        more = rng.randint(1, 4) if rng.random() < 0.3 else 0
        return s, following[min(more, len(following) - 1)], True

    def infill(self, w: list[int], rng: random.Random) -> tuple[list[int], list[bool]] | None:
        span = self.middle(w, rng)
        if span is None:
            return None
        s, e, rest_of_line = span
        if self.eos in w[s:e]:
            return None  # a middle never crosses files
        lo = max((i + 1 for i in range(s) if w[i] == self.eos), default=0)  # this file's part of w
        hi = next((i for i in range(e, len(w)) if w[i] == self.eos), len(w))
        dec = self.tok.decode
        before, mid, after = dec(w[lo:s]), dec(w[s:e]), dec(w[e:hi])
        if rest_of_line:  # the line's newline (a token such as ":\n" holds it) goes to the code after
            cut = mid.rstrip("\r\n")
            mid, after = cut, mid[len(cut):] + after
        before, mid, after = self.tok.encode(before), self.tok.encode(mid), self.tok.encode(after)
        if not mid or len(mid) > MAX_MIDDLE or lo + len(before) < 1:
            return None
        fits = [c for c in CANVASES if c >= len(mid)]
        canvas = fits[0] if rng.random() < 0.6 else rng.choice(fits)
        pad = [self.eos] * (canvas - len(mid))
        ids = w[:lo] + before + mid + pad + after + w[hi:]
        at = lo + len(before)
        region = [False] * at + [True] * canvas + [False] * (len(ids) - at - canvas)
        L = self.seq_len
        if len(ids) > L:  # cut the far end of the code after, or the far start of the code before
            cut_front = max(0, at + canvas + 8 - L)
            ids, region = ids[cut_front:cut_front + L], region[cut_front:cut_front + L]
        fill = L - len(ids)  # shorter after re-tokenizing: end tokens, as after a file's end
        return ids + [self.eos] * fill, region + [False] * fill


# --- objective ----------------------------------------------------------------------------------

def diffusion_loss(net: Dream, x0: torch.Tensor, region: torch.Tensor, mask_id: int, eps: float,
                   gen: torch.Generator, t: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's positions in `region` are masked with probability t; the cross-entropy on the
    masked ones, weighted by 1/t, summed and divided by the row's region size, averaged over
    rows. Logits are computed only at masked positions (the lm_head is a large share of a small
    model's compute). `t` (B, 1) may be given; else it is drawn from gen."""
    B, L = x0.shape
    dev = x0.device
    if t is None:
        t = eps + (1 - eps) * torch.rand(B, 1, generator=gen).to(dev)
    masked = (torch.rand(B, L, generator=gen).to(dev) < t) & region
    masked[:, 0] = False
    if not masked.any():
        return torch.zeros((), device=dev)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    P = int(masked.sum(dim=1).max())
    # masked positions first in each row (stable order), padded with position 0 (weight 0)
    order = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)[:, :P]
    valid = torch.gather(masked, 1, order)
    positions = torch.where(valid, order, torch.zeros_like(order))
    logits = net(xt, predict_positions=positions).logits  # (B, P, V), shifted as at inference
    ce = F.cross_entropy(logits.float().transpose(1, 2), torch.gather(x0, 1, positions), reduction="none")
    return ((ce * valid / t).sum(dim=1) / region.sum(dim=1).clamp(min=1)).mean()


@torch.no_grad()
def held_out_loss(net: Dream, windows: list[list[int]], mask_id: int, byte_len: torch.Tensor,
                  device: str, ts=(0.25, 0.5, 0.75)) -> dict:
    """Cross-entropy on held-out windows at fixed mask ratios and fixed masks: nats per masked
    token and bits per byte of the masked tokens (comparable across tokenizers)."""
    was = net.training
    net.eval()
    nats = tokens = nbytes = 0.0
    x0 = torch.tensor(windows, device=device)
    for j, t in enumerate(ts):
        gen = torch.Generator().manual_seed(1000 + j)
        for i in range(0, len(windows), 4):
            x = x0[i:i + 4]
            masked = (torch.rand(x.shape, generator=gen) < t).to(device)
            masked[:, 0] = False
            xt = torch.where(masked, torch.full_like(x, mask_id), x)
            logits = net(xt).logits
            ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
            nats += float((ce * masked).sum())
            tokens += float(masked.sum())
            nbytes += float((byte_len.to(device)[x] * masked).sum())
    net.train(was)
    return {"nats_per_token": round(nats / tokens, 4), "bits_per_byte": round(nats / nbytes / math.log(2), 4)}


# --- the run folder -----------------------------------------------------------------------------

def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_config(args, tok: Tokenizer) -> dict:
    eos, mask_id = tok.token_id("<|endoftext|>"), tok.token_id("<|mask|>")
    return {
        "architectures": ["DreamModel"], "model_type": "Dream", "_name_or_path": "diffucode/tiny-code",
        "vocab_size": (tok.vocab_size + 7) // 8 * 8, "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": args.seq_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": eos,
        "eos_token_id": eos, "pad_token_id": eos, "mask_token_id": mask_id, "use_cache": False,
        "attention_dropout": 0.0,
        "diffucode_prompt_format": "raw",  # a base model, although its tokenizer has <|dlm_pad|>
    }


def init_weights(net: Dream, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def tokenizer_sample(docs: list[data.Doc], limit_bytes: int) -> list[str]:
    """Training files in an order fixed by their hash, up to limit_bytes: what the BPE learns from."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{d.source}/{d.path}".encode()).hexdigest())
    out, total = [], 0
    for d in ranked:
        if total >= limit_bytes:
            break
        out.append(d.text)
        total += len(d.text.encode())
    return out


def save_state(run: Path, net: Dream, opt: torch.optim.Optimizer, progress: dict) -> None:
    """state/: fp32 weights, AdamW moments and the counters, written to state.tmp then swapped in."""
    tmp, state = run / "state.tmp", run / "state"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    names = {id(p): n for n, p in net.named_parameters()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p)
            if s:
                n = names[id(p)]
                moments[f"exp_avg/{n}"] = s["exp_avg"].detach().cpu().contiguous()
                moments[f"exp_avg_sq/{n}"] = s["exp_avg_sq"].detach().cpu().contiguous()
                moments[f"step/{n}"] = torch.as_tensor(s["step"], dtype=torch.float64).reshape(1).cpu()
    save_file(moments, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    (tmp / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")
    old = run / "state.old"
    shutil.rmtree(old, ignore_errors=True)
    if state.exists():
        state.rename(old)
    tmp.rename(state)
    shutil.rmtree(old, ignore_errors=True)


def load_state(run: Path, net: Dream, opt: torch.optim.Optimizer, device: str) -> dict:
    state = run / "state"
    net.load_state_dict(load_file(state / "model.safetensors", device=device))
    moments = load_file(state / "optimizer.safetensors", device=device)
    for n, p in net.named_parameters():
        if f"exp_avg/{n}" in moments:
            opt.state[p] = {"step": moments[f"step/{n}"].reshape(()).float().cpu(),
                            "exp_avg": moments[f"exp_avg/{n}"], "exp_avg_sq": moments[f"exp_avg_sq/{n}"]}
    return json.loads((state / "progress.json").read_text())


def lr_at(step: int, cfg: dict) -> float:
    warm = min(1.0, step / cfg["warmup"])
    frac = min(1.0, step / cfg["total_steps"])
    return cfg["lr"] * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def create_run(args, run: Path) -> dict:
    """A new run folder: the tokenizer trained on the corpus, the config, the run settings."""
    docs = data.read_split(args.corpus, "train")
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_byte_level_bpe(tokenizer_sample(docs, args.tokenizer_bytes), run, vocab_size=args.vocab,
                         special_tokens=SPECIALS)
    print(f"tokenizer: {args.vocab} tokens in {time.time() - t0:.0f} s", file=sys.stderr)
    tok = Tokenizer.from_dir(run)
    (run / "config.json").write_text(json.dumps(model_config(args, tok), indent=2) + "\n")
    settings = {k: getattr(args, k) for k in ("seed", "total_steps", "batch", "lr", "warmup", "eps", "infill_prob",
                                               "weight_decay", "tokenizer_bytes")}
    (run / "run.json").write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def record(run: Path) -> dict:
    path = run / "training.json"
    return json.loads(path.read_text()) if path.exists() else {"segments": []}


def corpus_record(corpus: Path, tok_dir: Path, train_tokens: int) -> dict:
    summary = json.loads((corpus / "corpus.json").read_text())
    return {"manifest": "training/packages.json", "manifest_sha256": summary["manifest_sha256"],
            "python_stdlib": summary["python"], "train_sha256": summary["splits"]["train"]["sha256"],
            "held_out_sha256": summary["splits"]["held_out"]["sha256"],
            "train_files": summary["splits"]["train"]["files"], "held_out_files": summary["splits"]["held_out"]["files"],
            "train_tokens": train_tokens, "skipped": summary["skipped"],
            "held_out_sources": sorted(summary["splits"]["held_out"]["sources"]),
            "licences": summary["licences"]}


# --- training -----------------------------------------------------------------------------------

def train(args) -> int:
    run: Path = args.run
    if args.dry_run:  # a throwaway copy: the run folder is never written
        scratch = Path(tempfile.mkdtemp(prefix="diffucode-dry-run-"))
        if (run / "config.json").exists():
            shutil.copytree(run, scratch / "run")
        run = scratch / "run"
        args.until_step, args.eval_every, args.save_minutes = None, 0, 1e9
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        if not args.dry_run:
            raise SystemExit(f"--device {device}: no CUDA device here (torch {torch.__version__})")
        print(f"note: --device {device} dry run without CUDA: the same path runs on the CPU", file=sys.stderr)
        device = "cpu"
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if args.device.startswith("cuda") or cpu_has_native_bf16() else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    fresh = not (run / "config.json").exists()
    settings = create_run(args, run) if fresh else json.loads((run / "run.json").read_text())
    tok = Tokenizer.from_dir(run)
    cfg_dict = json.loads((run / "config.json").read_text())
    cfg = DreamConfig.from_dict(cfg_dict)
    eos, mask_id = cfg.eos_token_id, cfg.mask_token_id
    seq_len = cfg.max_position_embeddings
    stream = cached_stream(args.corpus, "train", tok, run, eos)
    held = cached_stream(args.corpus, "held_out", tok, run, eos)
    train_tokens = int((stream != eos).sum())
    windows = Windows(stream, seq_len, settings["seed"], tok, eos, settings["infill_prob"])
    held_windows = [Windows(held, seq_len, 12345, tok, eos, 0.0).slot(k).tolist() for k in range(args.eval_windows)]
    byte_len = torch.tensor([len(tok.decode([i]).encode()) if i < tok.vocab_size else 1
                             for i in range(cfg.vocab_size)], dtype=torch.float32)

    net = Dream(cfg)
    init_weights(net, settings["seed"])
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=settings["lr"], betas=(0.9, 0.95),
                            weight_decay=settings["weight_decay"])
    progress = {"step": 0, "windows_seen": 0, "tokens_seen": 0}
    if (run / "state").exists():
        progress = load_state(run, net, opt, device)
    params = sum(p.numel() for p in net.parameters())
    batch = args.batch or settings["batch"]
    stop_step = settings["total_steps"] if args.until_step is None else min(args.until_step, settings["total_steps"])
    if args.dry_run:
        stop_step = progress["step"] + 2
    print(f"run {args.run}: {params / 1e6:.2f} M parameters, {seq_len} positions, vocab {cfg.vocab_size}; "
          f"{train_tokens:,} training tokens; step {progress['step']} of {settings['total_steps']}, "
          f"to {stop_step}; batch {batch}; {device}, {precision}", file=sys.stderr)

    rec = record(run)
    rec.update({"model": {"parameters": params, "config": cfg_dict}, "settings": settings,
                "data": corpus_record(args.corpus, run, train_tokens)})
    segment = {"command": " ".join(["python", "training/train.py", *sys.argv[1:]]), "hardware": hardware(device),
               "device": device, "precision": precision, "python": sys.version.split()[0], "torch": torch.__version__,
               "batch": batch, "from_step": progress["step"], "to_step": progress["step"],
               "tokens_seen": 0, "minutes": 0.0, "curve": [], "held_out": []}
    if not args.dry_run:
        rec["segments"].append(segment)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stopping.append("SIGINT"))
    started = last_save = time.time()
    deadline = started + 60 * args.minutes if args.minutes else None

    def save():
        segment["minutes"] = round((time.time() - started) / 60, 2)
        rec["tokens_seen"] = progress["tokens_seen"]
        rec["steps"] = progress["step"]
        rec["minutes"] = round(sum(s["minutes"] for s in rec["segments"]), 1)
        save_state(run, net, opt, progress)
        (run / "training.json").write_text(json.dumps(rec, indent=1) + "\n")

    def evaluate():
        h = held_out_loss(net, held_windows, mask_id, byte_len, device)
        h["step"] = progress["step"]
        segment["held_out"].append(h)
        print(json.dumps({"held_out": h}), file=sys.stderr, flush=True)

    last = None
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    while progress["step"] < stop_step and not stopping and not (deadline and time.time() > deadline):
        step = progress["step"] + 1
        lr = lr_at(step, settings)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, region = windows.batch(progress["windows_seen"], batch)
        gen = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + step)
        with autocast:
            loss = diffusion_loss(net, x0.to(device), region.to(device), mask_id, settings["eps"], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        progress.update(step=step, windows_seen=progress["windows_seen"] + batch,
                        tokens_seen=progress["tokens_seen"] + batch * seq_len)
        segment["to_step"], segment["tokens_seen"] = step, segment["tokens_seen"] + batch * seq_len
        last = {"step": step, "loss": round(loss.item(), 4), "lr": round(lr, 7),
                "seconds": round(time.time() - started, 1)}
        if step % 25 == 0 or step == segment["from_step"] + 1 or args.dry_run:
            segment["curve"].append(last)
            print(json.dumps(last), file=sys.stderr, flush=True)
        if args.eval_every and step % args.eval_every == 0:
            evaluate()
        if time.time() - last_save > 60 * args.save_minutes:
            save()
            last_save = time.time()
    if args.dry_run:
        evaluate()
        print(f"dry run: {segment['to_step'] - segment['from_step']} steps on {device} ({precision}) in "
              f"{time.time() - started:.1f} s; nothing written to {args.run}", file=sys.stderr)
        shutil.rmtree(run.parent, ignore_errors=True)
        return 0
    if last and (not segment["curve"] or segment["curve"][-1]["step"] != last["step"]):
        segment["curve"].append(last)  # the segment's last step is always on the curve
    if not segment["held_out"] or segment["held_out"][-1]["step"] != progress["step"]:
        evaluate()
    save()
    why = stopping[0] if stopping else ("time" if deadline and time.time() > deadline else "step")
    print(f"stopped at step {progress['step']} ({why}); {progress['tokens_seen']:,} tokens seen in all; "
          f"state in {run / 'state'}", file=sys.stderr)
    return 0


def export(run: Path, out: Path) -> int:
    """The bf16 checkpoint the package ships: config, weights, tokenizer, training.json, SHA256SUMS."""
    if not (run / "state").exists():
        raise SystemExit(f"{run}: no state/ to export (train first)")
    out.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", *TOKENIZER_FILES]:
        shutil.copyfile(run / name, out / name)
    weights = load_file(run / "state" / "model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    rec = record(run)
    rec["exported_from_step"] = json.loads((run / "state" / "progress.json").read_text())["step"]
    (out / "training.json").write_text(json.dumps(rec, indent=1) + "\n")
    sums = [f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}"
            for n in sorted(p.name for p in out.iterdir() if p.name != "SHA256SUMS")]
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print(f"wrote {out} from step {rec['exported_from_step']}", file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the run folder: created if new, else continued")
    ap.add_argument("--corpus", type=Path, default=data.DEFAULT_HOME / "corpus", help="training/data.py build's --out")
    ap.add_argument("--export", type=Path, metavar="OUT", help="write the run's bf16 checkpoint to OUT and stop")
    g = ap.add_argument_group("a new run (fixed when the run folder is created)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--vocab", type=int, default=8192)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=704)
    g.add_argument("--seq-len", type=int, default=1024, help="positions of the model and windows (1024)")
    g.add_argument("--total-steps", type=int, default=8000, help="steps the learning-rate schedule spans")
    g.add_argument("--batch", type=int, default=8, help="windows per step")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--eps", type=float, default=1e-3)
    g.add_argument("--infill-prob", type=float, default=0.5, help="share of windows laid out as infill examples")
    g.add_argument("--tokenizer-bytes", type=int, default=40_000_000, help="training text the BPE learns from")
    s = ap.add_argument_group("this segment")
    s.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    s.add_argument("--until-step", type=int, default=None, help="stop (and save) at this step")
    s.add_argument("--save-minutes", type=float, default=10.0, help="save the state this often")
    s.add_argument("--eval-every", type=int, default=250, help="held-out loss every N steps (0: at the end only)")
    s.add_argument("--eval-windows", type=int, default=16)
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--dry-run", action="store_true", help="two steps on a throwaway copy; the run folder is untouched")
    args = ap.parse_args()
    if args.export:
        return export(args.run, args.export)
    return train(args)


if __name__ == "__main__":
    raise SystemExit(main())
