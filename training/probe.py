"""How much does a run's model use the code around a mask? Held-out cross-entropy at several mask
ratios, beside the training unigram's on the same tokens.

A model that reads its context predicts a token far better when little around it is masked
(t = 0.05) than when everything is (t = 1.0, where only the unigram-like prior is left); the gap
and the gain over the unigram say whether training has got past token frequencies at all. It is
the check that found the first v2 attempt stuck near the unigram (README, "Its successor").

    python training/probe.py --run training/runs/v3 [--state FILE] [--windows 16]

Reads the run folder's config, tokenizer and state/model.safetensors (or --state) and the corpus
that `training/data.py build` wrote; writes nothing. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data
from diffucode.daemon.engine.network import Dream, DreamConfig
from diffucode.daemon.engine.tokenizer import Tokenizer
from objective import Windows, cached_stream, held_out_loss, unigram_logprobs
from safetensors.torch import load_file

RATIOS = (0.05, 0.25, 0.5, 0.75, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder of training/train.py")
    ap.add_argument("--state", type=Path, default=None, help="weights to probe (default: RUN/state/model.safetensors)")
    ap.add_argument("--corpus", type=Path, default=data.DEFAULT_HOME / "corpus", help="training/data.py build's --out")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows (those train.py evaluates on)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = args.state or args.run / "state" / "model.safetensors"
    if not state.is_file():
        raise SystemExit(f"{state}: no weights to probe (train the run first, or give --state)")
    cfg = DreamConfig.from_dict(json.loads((args.run / "config.json").read_text()))
    tok = Tokenizer.from_dir(args.run)
    net = Dream(cfg)
    net.load_state_dict(load_file(state))
    eos, seq_len = cfg.eos_token_id, cfg.max_position_embeddings
    unigram = unigram_logprobs(cached_stream(args.corpus, "train", tok, args.run, eos), cfg.vocab_size)
    held = cached_stream(args.corpus, "held_out", tok, args.run, eos)
    windows = Windows.held_out(held, seq_len, tok, eos, args.windows)
    byte_len = torch.ones(cfg.vocab_size)
    rows = {}
    print(f"{state}: held-out nats per masked token ({args.windows} windows of {seq_len})")
    print(f"{'mask ratio':>10} {'model':>8} {'unigram':>8} {'gain':>8}")
    for t in RATIOS:
        h = held_out_loss(net, windows, cfg.mask_token_id, byte_len, "cpu", ts=(t,), unigram=unigram)
        rows[t] = {k: h[k] for k in ("nats_per_token", "unigram_nats_per_token", "context_gain")}
        print(f"{t:>10} {h['nats_per_token']:>8.3f} {h['unigram_nats_per_token']:>8.3f} {h['context_gain']:>8.3f}")
    print(json.dumps({"probe": str(state), "windows": args.windows, "ratios": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
