"""A corpus shard that travels: the run's token streams, compressed, for a training segment on a
machine that cannot build the corpus (a lent GPU reaches no network, and takes 64 MiB of files).

    python training/shard.py --run training/runs/v3 --out training/shards/v3 [--train-tokens 80000000]

writes OUT/train.u16.xz and OUT/held_out.u16.xz (the token ids as little-endian uint16, xz: about
0.45 bytes a token), OUT/corpus.json (the corpus' record, so training.json names the same data)
and OUT/shard.json (token counts, the tokenizer's hash). `train.py --corpus OUT` then reads the
shard instead of tokenizing (objective.cached_stream). The training stream is cut to its first
--train-tokens tokens (the run's windows are drawn from what the shard holds); the held-out
stream travels whole, so held-out losses stay comparable.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
from objective import cached_stream, tokenizer_hash  # noqa: E402

from diffucode.daemon.engine.tokenizer import Tokenizer  # noqa: E402


def write(path: Path, ids: np.ndarray) -> None:
    if ids.size and int(ids.max()) >= 2**16:
        raise SystemExit(f"{path.name}: token id {int(ids.max())} does not fit 16 bits")
    path.write_bytes(lzma.compress(ids.astype("<u2").tobytes(), preset=6))


def read(path: Path) -> np.ndarray:
    return np.frombuffer(lzma.decompress(path.read_bytes()), dtype="<u2").astype(np.int32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the run folder (its tokenizer)")
    ap.add_argument("--corpus", type=Path, default=data.DEFAULT_HOME / "corpus")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-tokens", type=int, default=80_000_000)
    args = ap.parse_args()
    tok = Tokenizer.from_dir(args.run)
    eos = json.loads((args.run / "config.json").read_text())["eos_token_id"]
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, limit in (("train", args.train_tokens), ("held_out", None)):
        ids = cached_stream(args.corpus, split, tok, args.run, eos)[:limit]
        write(args.out / f"{split}.u16.xz", ids)
        sizes[split] = int(len(ids))
    shutil.copy(args.corpus / "corpus.json", args.out / "corpus.json")
    (args.out / "shard.json").write_text(json.dumps({"tokens": sizes, "tokenizer": tokenizer_hash(args.run)}) + "\n")
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"{args.out}: {sizes['train']:,} training and {sizes['held_out']:,} held-out tokens in {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
