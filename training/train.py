"""Train the bundled Dream model: masked diffusion on code, laid out as the editor asks for it.

The objective is DiffuCoder's pre-training loss: for each window a mask ratio t is drawn in
(eps, 1], each token of the window's region is masked with probability t, and the cross-entropy
on the masked positions (read through the logit shift, as at inference) is weighted by 1/t.
Position 0 is never masked: the shift gives it no left neighbour to be predicted from.

It starts autoregressively (`--ar-steps`, a quarter of the run by default): next-token
cross-entropy with causal attention on plain windows, read through the same shift. Dream and
DiffuCoder start from an autoregressive model (Qwen2.5) for the same reason: from masks alone
this network learned almost nothing beyond token frequencies in 1,822 steps on a CPU (the first
v2 attempt), while 150 autoregressive steps, then diffusion, did as well (README).

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
    nice python training/train.py --run runs/v3 --total-steps 8000 --minutes 60   # create or continue
    python training/train.py --run runs/v3 --export diffucode/models/tiny-code    # the bf16 bundle
    python training/train.py --run /tmp/x --device cuda --dry-run  # two steps on a throwaway copy

`--device cuda` trains in bf16 autocast; on CPU, bf16 autocast is used only where the CPU has
native bf16 (AVX512-BF16 or AMX): elsewhere it is emulated and about 25x slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data
from diffucode.daemon.engine.network import Dream, DreamConfig
from diffucode.daemon.engine.tokenizer import Tokenizer
from objective import Windows, autoregressive_loss, cached_stream, diffusion_loss, held_out_loss, unigram_logprobs
from run_folder import (
    SPECIALS,  # noqa: F401 (tests/test_training.py imports it from here)
    corpus_record,
    create_run,
    export,
    init_weights,
    load_state,
    record,
    save_state,
)

from diffucode.bench import hardware


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_at(step: int, cfg: dict) -> float:
    warm = min(1.0, step / cfg["warmup"])
    frac = min(1.0, step / cfg["total_steps"])
    return cfg["lr"] * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))



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
    held_windows = Windows.held_out(held, seq_len, tok, eos, args.eval_windows)
    unigram = unigram_logprobs(stream, cfg.vocab_size)
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
        h = held_out_loss(net, held_windows, mask_id, byte_len, device, unigram=unigram)
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
        autoregressive = step <= settings.get("ar_steps", 0)  # runs made before the warm start have none
        with autocast:
            if autoregressive:
                loss = autoregressive_loss(net, windows.plain_batch(progress["windows_seen"], batch).to(device))
            else:
                x0, region = windows.batch(progress["windows_seen"], batch)
                gen = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + step)
                loss = diffusion_loss(net, x0.to(device), region.to(device), mask_id, settings["eps"], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        progress.update(step=step, windows_seen=progress["windows_seen"] + batch,
                        tokens_seen=progress["tokens_seen"] + batch * seq_len)
        segment["to_step"], segment["tokens_seen"] = step, segment["tokens_seen"] + batch * seq_len
        last = {"step": step, "loss": round(loss.item(), 4), "lr": round(lr, 7),
                "seconds": round(time.time() - started, 1), **({"objective": "ar"} if autoregressive else {})}
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
    g.add_argument("--batch", type=int, default=None,
                   help="windows per step (8 for a new run; a continued run keeps its own unless given)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--eps", type=float, default=1e-3)
    g.add_argument("--infill-prob", type=float, default=0.5, help="share of windows laid out as infill examples")
    g.add_argument("--ar-steps", type=int, default=None,
                   help="first steps trained autoregressively (causal attention, next token through the same "
                        "shift) before the diffusion loss takes over; default a quarter of --total-steps")
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
