"""The short sweep that chose the bundled model's tokenizer and size: CPU throughput and loss.

Each candidate (vocabulary, width, depth) trains for the same wall-clock time from scratch with
train.py's recipe (1,024 positions, batch 8, the same seed and data order), then reports:
training tokens per second, held-out loss in bits per byte of the masked tokens (comparable
across tokenizers), parameters and bf16 size, and the time of one inference forward pass over
1,024 tokens (what a request's first block costs in the daemon).

    python training/sweep.py --minutes 6 [--only A,B] [--out /tmp/sweep]

Last line: JSON. Runs one candidate after another (they would share the cores otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

CANDIDATES = {  # name: (vocab, hidden, layers, heads, kv heads, intermediate)
    "A": (4096, 256, 6, 4, 2, 704),  # the first bundled model's shape
    "B": (8192, 256, 6, 4, 2, 704),
    "C": (16384, 256, 6, 4, 2, 704),
    "D": (8192, 320, 8, 5, 1, 864),
}


def forward_ms(run: Path) -> float:
    """Median time of one inference forward pass over 1,024 tokens (fp32, this CPU)."""
    sys.path.insert(0, str(HERE.parent))
    from diffucode import Engine

    net = Engine.load(run / "export", device="cpu", require_tokenizer=False).checkpoint.network
    x = torch.randint(0, 1000, (1, 1024))
    times = []
    with torch.inference_mode():
        for _ in range(6):
            t0 = time.perf_counter()
            net(x, predict_positions=torch.arange(990, 1024)[None])
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/diffucode-sweep"))
    ap.add_argument("--corpus", default=None)
    args = ap.parse_args()
    rows = {}
    for name in args.only.split(","):
        vocab, hidden, layers, heads, kv, inter = CANDIDATES[name]
        run = args.out / name
        cmd = [sys.executable, str(HERE / "train.py"), "--run", str(run), "--vocab", str(vocab), "--hidden",
               str(hidden), "--layers", str(layers), "--heads", str(heads), "--kv-heads", str(kv),
               "--intermediate", str(inter), "--total-steps", "4000", "--warmup", "50", "--minutes",
               str(args.minutes), "--eval-every", "0", "--eval-windows", "8"]
        if args.corpus:
            cmd += ["--corpus", args.corpus]
        if not (run / "state").exists():
            subprocess.run(cmd, check=True)
        subprocess.run([sys.executable, str(HERE / "train.py"), "--run", str(run), "--export", str(run / "export")],
                       check=True)
        rec = json.loads((run / "training.json").read_text())
        seg = rec["segments"][0]
        curve = seg["curve"]
        tps = (curve[-1]["step"] - curve[0]["step"]) * seg["batch"] * 1024 / (curve[-1]["seconds"] - curve[0]["seconds"])
        params = rec["model"]["parameters"]
        rows[name] = {"vocab": vocab, "hidden": hidden, "layers": layers, "parameters_m": round(params / 1e6, 2),
                      "bf16_mb": round(2 * params / 2**20, 1), "tokens_per_s": round(tps),
                      "steps": seg["to_step"], "tokens_seen": seg["tokens_seen"],
                      "held_out_bits_per_byte": seg["held_out"][-1]["bits_per_byte"],
                      "held_out_nats_per_token": seg["held_out"][-1]["nats_per_token"],
                      "forward_1024_ms": round(forward_ms(run), 1)}
        print(json.dumps({name: rows[name]}), flush=True)
    print(f"{'':3s} {'vocab':>6s} {'hidden':>6s} {'layers':>6s} {'params':>7s} {'bf16':>7s} {'tok/s':>6s} "
          f"{'steps':>6s} {'bits/byte':>9s} {'fwd 1k ms':>9s}")
    for name, r in rows.items():
        print(f"{name:3s} {r['vocab']:6d} {r['hidden']:6d} {r['layers']:6d} {r['parameters_m']:6.2f}M "
              f"{r['bf16_mb']:5.1f}MB {r['tokens_per_s']:6d} {r['steps']:6d} {r['held_out_bits_per_byte']:9.3f} "
              f"{r['forward_1024_ms']:9.1f}")
    print(json.dumps({"sweep": rows, "minutes": args.minutes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
