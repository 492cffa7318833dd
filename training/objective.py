"""The objective and its data: training windows (plain or laid out as infill requests) and the
masked-diffusion loss, as described in train.py's docstring.

Window k of a run depends only on (seed, k), and the loss's mask ratios and masks only on the
generator it is given (train.py seeds it with (seed, step)), so a resumed run draws what it would
have drawn. Token streams are cached in the corpus folder, keyed by split, corpus and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import data
import numpy as np
import torch
import torch.nn.functional as F
from diffucode.daemon.engine.network import Dream
from diffucode.daemon.engine.tokenizer import Tokenizer
from run_folder import TOKENIZER_FILES

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


def tokenizer_hash(tok_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        h.update((tok_dir / name).read_bytes())
    return h.hexdigest()[:12]


def cached_stream(corpus: Path, split: str, tok: Tokenizer, tok_dir: Path, eos: int) -> np.ndarray:
    """tokenize_stream, cached in the corpus folder by split, corpus and tokenizer hash; or, when
    `corpus` is a shard (training/shard.py), the shard's stream."""
    if (corpus / "shard.json").exists():
        from shard import read

        made_with = json.loads((corpus / "shard.json").read_text())["tokenizer"]
        if made_with != tokenizer_hash(tok_dir):
            raise SystemExit(f"{corpus} was packed with another tokenizer ({made_with}) than {tok_dir}'s")
        return read(corpus / f"{split}.u16.xz")
    summary = json.loads((corpus / "corpus.json").read_text())
    key = f"{split}-{summary['splits'][split]['sha256'][:12]}-{tokenizer_hash(tok_dir)}"
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

    def plain_batch(self, first: int, n: int) -> torch.Tensor:
        """Windows first .. first + n - 1 as plain text (the autoregressive warm start's)."""
        return torch.tensor(np.stack([self.slot(first + r) for r in range(n)]).astype(np.int64))

    @classmethod
    def held_out(cls, held: np.ndarray, seq_len: int, tok: Tokenizer, eos: int, n: int) -> list[list[int]]:
        """The n held-out windows that training evaluates on and training/probe.py probes: fixed by
        their own seed, whatever the run's."""
        windows = cls(held, seq_len, 12345, tok, eos, 0.0)
        return [windows.slot(k).tolist() for k in range(n)]

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


def unigram_logprobs(stream, vocab_size: int) -> torch.Tensor:
    """log p(token) of the training stream's token frequencies (add-one smoothed): the baseline a
    model that ignores all context reaches, and that held_out_loss reports beside the model's."""
    counts = np.bincount(np.asarray(stream), minlength=vocab_size)[:vocab_size].astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def autoregressive_loss(net: Dream, x0: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with causal attention, read through the same logit shift as the
    diffusion loss (position p from the hidden state at p - 1): the warm start that Dream and
    DiffuCoder get from Qwen2.5, which the shift exists to carry over. Every position is
    supervised and the first positions see only a few tokens, so the network learns to read
    nearby code far sooner than from masks alone (README: 150 such steps did better than 1,822
    diffusion steps on this CPU)."""
    B, L = x0.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=x0.device).tril()[None, None].expand(B, 1, L, L)
    logits = net(x0, attention_mask=causal, rows_attend=True).logits  # row p predicts position p
    return F.cross_entropy(logits[:, 1:].float().transpose(1, 2), x0[:, 1:])


@torch.no_grad()
def held_out_loss(net: Dream, windows: list[list[int]], mask_id: int, byte_len: torch.Tensor,
                  device: str, ts=(0.25, 0.5, 0.75), unigram: torch.Tensor | None = None) -> dict:
    """Cross-entropy on held-out windows at fixed mask ratios and fixed masks: nats per masked
    token and bits per byte of the masked tokens (comparable across tokenizers). With `unigram`
    (unigram_logprobs), also the same tokens' cross-entropy under the training unigram
    (`unigram_nats_per_token`) and how far the model is below it (`context_gain`): a model that
    learns nothing from the code around a mask stays near 0 (the first v2 attempt, 0.23 after
    15 M tokens, is why this is reported)."""
    was = net.training
    net.eval()
    nats = tokens = nbytes = uni = 0.0
    x0 = torch.tensor(windows, device=device)
    byte_len = byte_len.to(device)
    unigram = unigram.to(device) if unigram is not None else None
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
            nbytes += float((byte_len[x] * masked).sum())
            if unigram is not None:
                uni -= float((unigram[x] * masked).sum())
    net.train(was)
    out = {"nats_per_token": round(nats / tokens, 4), "bits_per_byte": round(nats / nbytes / math.log(2), 4)}
    if unigram is not None:
        out["unigram_nats_per_token"] = round(uni / tokens, 4)
        out["context_gain"] = round((uni - nats) / tokens, 4)
    return out
