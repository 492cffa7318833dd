"""`diffucode bench`: exact against fast decoding on the same workloads, in one run.

Workloads, on token ids (the text matters only through the model's confidence):
- infill: 32 masks in 1,024 tokens of context (3/4 before, 1/4 after);
- function: 256 tokens generated after a 64-token prompt;
each decoded the reference-equivalent way ("exact": a full forward pass per step, one token per
step) and the fast way (dual KV cache, parallel decoding), on the same network in the same run.
A model with fewer positions gets the context that fits, and the output says so. Then the cost
of one cached block step at 1k and 4k tokens of context, and the quality guard: exact against
fast decoding on held-out single-line infill (diffucode.quality's samples and scoring).
The timed workloads decode every canvas position (no stop at end tokens, so tokens/s counts
tokens really decoded); the quality guard runs through the tasks, as the daemon does, where fast
decoding stops at an end token (passes are reported per canvas position and per kept token).

Random weights (`--shape`) are never confident, so there the step budget forces
`--tokens-per-step` tokens per step, the rate parallel decoding reaches on a trained model (the
quality guard measures it). This module must not import torch at import time: the CLI's parser
imports `add_arguments`. It knows the network, the samplers and the cache; not sockets.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocab
    "tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512),
    "small": dict(layers=6, hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=4096),  # the bundled model's
    "7b": dict(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064),  # DiffuCoder-7B
}


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="random weights in this shape built on the device, nothing downloaded: 7b = "
                        "DiffuCoder-7B, small = the bundled model's shape with 32k positions, tiny")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    p.add_argument("--requests", type=int, default=5, help="timed requests per workload and decoding (5)")
    p.add_argument("--context", type=int, default=1024, help="infill context tokens (1024)")
    p.add_argument("--canvas", type=int, default=32, help="infill masks (32)")
    p.add_argument("--generate", type=int, default=256, help="function tokens generated (256)")
    p.add_argument("--threshold", type=float, default=None, help="fast decoding's threshold (default 0.9)")
    p.add_argument("--block-size", type=int, default=32, help="fast decoding's block (32)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="fast: step budget canvas / N (default: none for trained models, 4 for --shape)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay cached steps from CUDA graphs (auto: on with CUDA)")
    p.add_argument("--quality-samples", type=int, default=200, help="held-out lines for the quality guard (0: skip)")
    p.add_argument("--thresholds", default="0.7,0.8,0.9,0.95", help="thresholds the quality guard tries")
    p.add_argument("--order-samples", type=int, default=40,
                   help="held-out lines for AR-ness against temperature (0: skip)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny shape, small workloads)")


def run(args) -> int:
    import torch

    from diffucode.daemon.engine.options import DEFAULT_THRESHOLD

    if args.quick:
        args.shape = args.shape or "tiny"
        args.requests, args.context, args.generate = min(args.requests, 2), min(args.context, 96), min(args.generate, 32)
        args.quality_samples = args.order_samples = 0
    args.threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    net, tok, mask_id, label, device, dtype = _network(args)
    positions = net.config.max_position_embeddings
    tps = args.tokens_per_step or (4 if args.shape else None)
    graphs = args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and device.type == "cuda")
    notes = []
    if tps:
        notes.append(f"fast step budget: {tps} tokens per step (random weights are never confident)")
    ids = _text_ids(tok, net.config.vocab_size)
    context = min(args.context, positions - args.canvas)
    prompt = 64
    gen = min(args.generate, positions - prompt)
    if context < args.context or gen < args.generate:
        notes.append(f"the model has {positions} positions: infill context {context} (asked {args.context}), "
                     f"function {gen} tokens (asked {args.generate})")
    workloads = {
        f"infill {args.canvas} in {context}": [_infill_case(ids, context, args.canvas, r, mask_id, device)
                                               for r in range(args.requests + 1)],
        f"function {gen} after {prompt}": [_generate_case(ids, prompt, gen, r, mask_id, device)
                                           for r in range(args.requests + 1)],
    }
    print(f"diffucode bench: {label}; {hardware(device)}; dtype {str(dtype).removeprefix('torch.')}; "
          f"torch {torch.__version__}; batch 1; fast: threshold {args.threshold}, block {args.block_size}, "
          f"CUDA graphs {'on' if graphs else 'off'}")
    for note in notes:
        print(f"  note: {note}")
    rows = {}
    print(f"{'workload':28s} {'decoding':8s} {'ms/step':>8s} {'p50 ms':>8s} {'p90 ms':>8s} {'tok/s':>8s} "
          f"{'passes/tok':>10s} {'peak MiB':>9s} {'warm-up s':>9s}")
    for name, cases in workloads.items():
        for decoding in ("exact", "fast"):
            r = _time_decoding(net, cases, mask_id, decoding, args, tps, graphs, device)
            rows[f"{name} / {decoding}"] = r
            print(f"{name:28s} {decoding:8s} {r['ms_per_step']:8.2f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} "
                  f"{r['tokens_per_s']:8.1f} {r['passes_per_token']:10.3f} {r['peak_mib']:9.1f} {r['warmup_s']:9.2f}")
        e, f = rows[f"{name} / exact"], rows[f"{name} / fast"]
        print(f"{'':28s} fast vs exact: {e['p50_ms'] / f['p50_ms']:.2f}x lower p50 latency, "
              f"{f['tokens_per_s'] / e['tokens_per_s']:.2f}x tokens/s")
    steps = _step_costs(net, positions, args.block_size, graphs, device, quick=args.quick)
    for ctx, ms in steps.items():
        print(f"cached step, block {args.block_size} + 1 over {ctx} cached tokens: {ms:.2f} ms")
    if len(steps) == 2:
        a, b = steps.values()
        print(f"cached step cost 4k / 1k: {b / a:.2f}x")
    quality = _quality_guard(args, tok) if args.quality_samples and tok is not None else None
    order = _order_vs_temperature(args) if args.order_samples and tok is not None else None
    print(json.dumps({"benchmark": "decoding", "model": label, "hardware": hardware(device), "device": str(device),
                      "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                      "threshold": args.threshold, "block_size": args.block_size, "cuda_graphs": graphs,
                      "tokens_per_step_budget": tps, "notes": notes, "workloads": rows,
                      "cached_step_ms": {str(k): round(v, 3) for k, v in steps.items()}, "quality": quality,
                      "ar_ness_by_temperature": order}))
    return 0


# --- setup --------------------------------------------------------------------------------------

def _network(args):
    import torch

    from diffucode.daemon.engine.weights import resolve_device
    from diffucode.daemon.engine.network import Dream, DreamConfig

    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.shape is None:
        from diffucode import Engine

        ckpt = Engine.load(args.model, str(device), args.dtype, require_tokenizer=False).checkpoint
        return ckpt.network, ckpt.tokenizer, ckpt.mask_id, str(ckpt.path), device, ckpt.dtype
    s = SHAPES[args.shape]
    cfg = DreamConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=32768, rope_theta=1e6, mask_token_id=s["vocab"] - 1,
                      pad_token_id=s["vocab"] - 2, eos_token_id=s["vocab"] - 2, bos_token_id=s["vocab"] - 2)
    with torch.device("meta"):
        net = Dream(cfg).to(dtype)
    net = net.to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    params = sum(p.numel() for p in net.parameters()) / 1e9
    return net, None, cfg.mask_token_id, f"random weights, {args.shape} shape ({params:.3f} B parameters)", device, dtype


def _text_ids(tok, vocab: int) -> list[int]:
    """Real code as token ids when the model has a tokenizer (standard-library source), else random ids."""
    if tok is None:
        import random

        rng = random.Random(0)
        return [rng.randrange(vocab - 2) for _ in range(40000)]
    import difflib
    import inspect
    import textwrap

    return tok.encode(inspect.getsource(difflib) + inspect.getsource(textwrap))


def _infill_case(ids, context, canvas, r, mask_id, device):
    import torch

    before = context * 3 // 4
    at = before + (r * 997) % max(1, len(ids) - context - canvas - before)
    seq = ids[at - before:at] + [mask_id] * canvas + ids[at + canvas:at + canvas + context - before]
    return torch.tensor([seq], device=device), canvas


def _generate_case(ids, prompt, gen, r, mask_id, device):
    import torch

    at = prompt + (r * 1499) % max(1, len(ids) - prompt)
    return torch.tensor([ids[at - prompt:at] + [mask_id] * gen], device=device), gen


def hardware(device) -> str:
    """The device in words: the GPU's name, or the CPU's model, cores and torch threads (also
    what training/train.py records)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


# --- measurements -------------------------------------------------------------------------------

def _time_decoding(net, cases, mask_id, decoding, args, tps, graphs, device) -> dict:
    import torch

    from diffucode.daemon.engine.fast import denoise_fast
    from diffucode.daemon.engine.options import FastConfig, SamplerConfig
    from diffucode.daemon.engine.kvcache import DualKVCache
    from diffucode.daemon.engine.sampler import denoise

    cache = DualKVCache(net, cuda_graphs=graphs) if decoding == "fast" else None
    fast = FastConfig(threshold=args.threshold, block_size=args.block_size)

    def decode(x, canvas):
        if decoding == "exact":
            return denoise(net, x, mask_id, SamplerConfig(steps=canvas, alg="entropy"))
        steps = math.ceil(canvas / tps) if tps else canvas
        return denoise_fast(net, x, mask_id, SamplerConfig(steps=steps, alg="entropy"), fast=fast, cache=cache)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    decode(*cases[0])  # warm-up (and CUDA graph capture), not timed
    _sync(device)
    warmup = time.perf_counter() - t0
    times, steps, passes, tokens = [], 0, 0, 0
    for x, canvas in cases[1:]:
        _sync(device)
        t0 = time.perf_counter()
        result = decode(x, canvas)
        _sync(device)
        times.append(time.perf_counter() - t0)
        steps, passes, tokens = steps + result.steps_run, passes + result.forward_passes, tokens + canvas
    total = sum(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"ms_per_step": 1000 * total / steps, "p50_ms": 1000 * statistics.median(times), "p90_ms": 1000 * q[8],
            "tokens_per_s": tokens / total, "passes_per_token": passes / tokens, "steps_per_request": steps / len(times),
            "peak_mib": _peak_mib(device), "warmup_s": warmup, "requests": len(times)}


def _step_costs(net, positions, block, graphs, device, quick=False) -> dict:
    """Median time of one cached step (block + 1 positions recomputed) over 1k and 4k cached tokens."""
    import torch

    from diffucode.daemon.engine.kvcache import DualKVCache

    costs = {}
    for context in ((256,) if quick else (1024, 4096)):
        if context + block + 1 > positions:
            continue
        cache = DualKVCache(net, cuda_graphs=graphs)
        N = context + block + 1
        x = torch.randint(0, net.config.vocab_size - 2, (1, N), device=device)
        pos = torch.arange(N, device=device)[None]
        lo = torch.tensor([context], device=device)
        predict = torch.arange(1, block + 1, device=device)[None]
        with torch.inference_mode():
            cache.reserve(1, N)
            cache.refresh(x, pos, None, predict + context)
            times = []
            for i in range(13 if not quick else 3):
                _sync(device)
                t0 = time.perf_counter()
                cache.step(x, lo, block + 1, pos, None, predict)
                _sync(device)
                times.append(time.perf_counter() - t0)
        costs[context] = 1000 * statistics.median(times[2:] if len(times) > 3 else times)
    return costs


def _quality_guard(args, tok) -> dict | None:
    """Exact against fast decoding on held-out single-line infill, through the engine (text in, text out)."""
    from diffucode import Engine, quality
    from diffucode.daemon.engine.options import Options

    engine = Engine.load(args.model, args.device, args.dtype)
    cases = quality.samples(args.quality_samples, 1234)
    canvas = 24
    runs = {"exact": Options(max_new_tokens=canvas, decoding="exact")}
    for t in sorted({float(v) for v in args.thresholds.split(",")} | {args.threshold}):
        runs[f"fast {t:g}"] = Options(max_new_tokens=canvas, decoding="fast", threshold=t, block_size=args.block_size)
    default = dict(max_new_tokens=canvas, decoding="fast", threshold=args.threshold, block_size=args.block_size)
    runs[f"fast {args.threshold:g} +ctx"] = Options(**default, prefix_cache=True)
    runs[f"fast {args.threshold:g} 3/step"] = Options(**default, steps=canvas // 3)
    answers = {}
    out = {}
    for name, opts in runs.items():
        t0 = time.perf_counter()
        answers[name] = quality.fill(engine, cases, opts)
        seconds = time.perf_counter() - t0
        row = quality.score([quality.first_line(a) for a in answers[name]], cases, tok)
        ref = answers["exact"]
        row["agreement_with_exact"] = round(100 * statistics.fmean(
            sum(x == y for x, y in zip(a.tokens, b.tokens)) / max(1, len(a.tokens), len(b.tokens))
            for a, b in zip(answers[name], ref)), 1)
        row["same_line_as_exact"] = round(100 * statistics.fmean(
            quality.first_line(a) == quality.first_line(b) for a, b in zip(answers[name], ref)), 1)
        passes = sum(a.forward_passes for a in answers[name])
        row["passes_per_token"] = round(passes / (canvas * len(cases)), 3)  # per canvas position decoded
        row["passes_per_kept_token"] = round(passes / max(1, sum(len(a.tokens) for a in answers[name])), 3)
        row["seconds"] = round(seconds, 1)
        out[name] = row
    print(f"quality guard: {len(cases)} held-out lines (seed 1234), canvas {canvas}, exact vs fast; +ctx: the far "
          f"context encoded chunk-causally (the prefix cache); 3/step: a budget of {canvas // 3} steps")
    print(f"{'decoding':16s} {'exact match':>11s} {'token acc.':>10s} {'agree w/ exact':>14s} "
          f"{'same line':>9s} {'passes/tok':>10s} {'per kept':>8s} {'seconds':>8s}")
    for name, r in out.items():
        print(f"{name:16s} {r['exact_match']:10.1f}% {r['token_accuracy']:9.1f}% {r['agreement_with_exact']:13.1f}% "
              f"{r['same_line_as_exact']:8.1f}% {r['passes_per_token']:10.3f} {r['passes_per_kept_token']:8.3f} "
              f"{r['seconds']:8.1f}")
    print("passes/tok: forward passes per canvas position decoded; per kept: per token of the answer (the "
          "canvas is cut at its first end token)")
    exact = out["exact"]
    verdicts = {}
    for name in (f"fast {args.threshold:g}", f"fast {args.threshold:g} 3/step"):
        r = out[name]
        verdicts[name] = r["exact_match"] >= exact["exact_match"] - 1.0
        print(f"guard, {name}: exact match {r['exact_match']:.1f}% vs {exact['exact_match']:.1f}% one token per "
              f"step: {'holds' if verdicts[name] else 'FAILS'} (within 1 point); token accuracy "
              f"{r['token_accuracy'] - exact['token_accuracy']:+.1f} points; {r['passes_per_token']:.3f} passes per token")
    return {"samples": len(cases), "canvas": canvas, "rows": out, "guard_holds": verdicts}


TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)


def _order_vs_temperature(args) -> dict:
    """The DiffuCoder paper's experiment (its figure on decoding order): how left-to-right the
    exact sampler's order is at each temperature, averaged over held-out single lines. A higher
    temperature should diversify the order (lower AR-ness) as well as the tokens."""
    from diffucode import Engine, quality

    engine = Engine.load(args.model, args.device, args.dtype)
    cases = quality.samples(args.order_samples, 4321)
    canvas = 16
    out = {}
    print(f"decoding order: AR-ness (1.0 = left to right) of the exact sampler, entropy order, {len(cases)} held-out "
          f"lines, canvas {canvas}, seed per case")
    print(f"{'temperature':>11s} {'local':>7s} {'global':>7s} {'tokens':>7s}")
    for t in (0.0, *TEMPERATURES):
        local, global_, tokens = [], [], 0
        for i, c in enumerate(cases):
            ans = engine.infill(c.before, c.after, max_new_tokens=canvas, temperature=t, seed=i, decoding="exact")
            if ans.order:
                local.append(ans.ar_ness["local"])
                global_.append(ans.ar_ness["global"])
                tokens += len(ans.order)
        row = {"local": round(statistics.fmean(local), 3) if local else None,
               "global": round(statistics.fmean(global_), 3) if global_ else None, "tokens": tokens}
        out[f"{t:g}"] = row
        print(f"{t:11g} {row['local'] or 0:7.3f} {row['global'] or 0:7.3f} {tokens:7d}")
    return out
