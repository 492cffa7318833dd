"""Quantization benchmark: memory, speed and accuracy of every option, against a baseline.

    python benchmarks/quantization.py                       # CPU, a small shape (minutes)
    python benchmarks/quantization.py --shape 7b --device cuda   # DiffuCoder-7B shape, on a GPU

A random-weight checkpoint of the chosen shape is written to a temp dir first (tensor by tensor,
made on the benchmark's device: nothing is downloaded), then each option loads it through the
real loader. Reported per option: load (+quantize) seconds, weight bytes by dtype, device
memory, forward milliseconds (median, batch 1, after warm-up) and the logits' relative error and
top-1 agreement against the baseline run in the same process (fp32 on CPU, bf16 on CUDA).
Then `diffucode quantize`'s writer and the pre-quantized loader are timed. The last line
printed is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffucode import Engine
from diffucode.daemon.engine.checkpoint import load_weights
from diffucode.daemon.engine.weights import read_config
from diffucode.quantization.accuracy import compare, fixed_inputs, logits_on
from diffucode.quantization.memory import memory_report
from diffucode.quantization.prequantized import write_prequantized
from diffucode.quantization.schemes import QuantConfig
from diffucode.quantization.swap import quantize_network

SHAPES = {  # num_hidden_layers, hidden_size, intermediate_size, heads, kv heads, vocab
    "small": dict(layers=4, hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=8192),
    "7b": dict(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064),
}


def write_random_checkpoint(out: Path, shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Path:
    """A Dream checkpoint with random weights (std 0.02, as the reference initialises them),
    one shard per layer, made on `device` and written tensor by tensor."""
    out.mkdir(parents=True, exist_ok=True)
    h, kv = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    cfg = {"architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": shape["vocab"],
           "hidden_size": h, "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
           "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
           "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": str(dtype)[6:],
           "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "mask_token_id": shape["vocab"] - 1}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    groups = [{"model.embed_tokens.weight": rand(shape["vocab"], h)}]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        groups.append({
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.q_proj.bias": rand(h),
            p + "self_attn.k_proj.weight": rand(kv, h), p + "self_attn.k_proj.bias": rand(kv),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.v_proj.bias": rand(kv),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(shape["intermediate"], h),
            p + "mlp.up_proj.weight": rand(shape["intermediate"], h),
            p + "mlp.down_proj.weight": rand(h, shape["intermediate"]),
        })
    groups.append({"model.norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": rand(shape["vocab"], h)})
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, out / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in group})
        del group
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_times(nets: list, ids: torch.Tensor, device: torch.device, repeat: int) -> list[list[float]]:
    """Milliseconds of `repeat` full forward passes per network, round-robin across networks
    (each already ran once: kernel selection, CPU weight re-packing, CUDA context)."""
    ids = ids.to(device)
    times: list[list[float]] = [[] for _ in nets]
    for _ in range(repeat):
        for i, net in enumerate(nets):
            sync(device)
            t0 = time.perf_counter()
            net(ids)
            sync(device)
            times[i].append((time.perf_counter() - t0) * 1000)
    return times


def torchao_option(config_name: str):
    """A loader applying one torchao config to the Linear layers (lm_head kept), or None when
    torchao does not import."""
    try:
        import torchao.quantization as tq
    except Exception:
        return None

    def load(path, cfg, device, dtype):
        net = load_weights(path, cfg, device, dtype)
        tq.quantize_(net, getattr(tq, config_name)(),
                     filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
        return net
    return load


def bnb_option(scheme: str, backend: str | None):
    def load(path, cfg, device, dtype):
        net = load_weights(path, cfg, torch.device("cpu"), dtype)
        return quantize_network(net, QuantConfig(scheme=scheme), device, dtype, backend=backend)
    return load


def plain(path, cfg, device, dtype):
    return load_weights(path, cfg, device, dtype)


def options(device: torch.device) -> list[tuple[str, torch.dtype, object]]:
    """(label, model dtype, loader); the first one is the baseline."""
    if device.type == "cuda":
        return [("bf16 (baseline)", torch.bfloat16, plain),
                ("nf4 bitsandbytes", torch.bfloat16, bnb_option("nf4", None)),
                ("int8 bitsandbytes", torch.bfloat16, bnb_option("int8", None))]
    found = [("fp32 (baseline)", torch.float32, plain),
             ("bf16", torch.bfloat16, plain),
             ("int8 torch dynamic, rest fp32", torch.float32, bnb_option("int8", "torch-dynamic-int8")),
             ("int8 torch dynamic, rest bf16 (--quantize int8)", torch.bfloat16, bnb_option("int8", "torch-dynamic-int8")),
             ("int8 weight-only, pure torch", torch.bfloat16, bnb_option("int8", "int8-weight-only")),
             ("nf4 bitsandbytes, rest fp32", torch.float32, bnb_option("nf4", None)),
             ("nf4 bitsandbytes, rest bf16 (--quantize nf4)", torch.bfloat16, bnb_option("nf4", None)),
             ("int8 bitsandbytes", torch.bfloat16, bnb_option("int8", "bitsandbytes-int8"))]
    for config_name in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"):
        load = torchao_option(config_name)
        if load is not None:
            found.append((f"torchao {config_name}", torch.bfloat16, load))
    return found


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=None, help="sequence length (default 256 on CPU, 1024 on CUDA)")
    ap.add_argument("--repeat", type=int, default=5, help="timed forward passes per option (median)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of option labels to run")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", per call
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    tokens = args.tokens or (1024 if device.type == "cuda" else 256)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffucode-qbench-"))
    shape = SHAPES[args.shape]
    disk_dtype = torch.bfloat16
    t0 = time.perf_counter()
    src = write_random_checkpoint(work / "source", shape, disk_dtype, device)
    made_s = time.perf_counter() - t0
    cfg = read_config(src)
    params = sum(p.numel() for p in load_weights(src, cfg, torch.device("cpu"), disk_dtype).parameters())
    print(f"{args.shape} shape: {params / 1e9:.3f} B parameters, {tokens} tokens, batch 1, on {hardware(device)}; "
          f"checkpoint written in {made_s:.1f} s", file=sys.stderr)
    ids = fixed_inputs(cfg.vocab_size, cfg.mask_token_id, batch=1, length=tokens)
    rows, nets, reference = [], [], None
    # CPU: every option stays loaded and the timing rounds go round-robin, so the noise of a
    # shared machine falls on all of them alike. CUDA: one at a time (a 7B bf16 copy is 15 GB).
    interleave = device.type == "cpu"
    for label, dtype, load in options(device):
        if args.only and reference is not None and not any(s in label for s in args.only.split(",")):
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        net = load(src, cfg, device, dtype).eval()
        sync(device)
        load_s = time.perf_counter() - t
        mem = memory_report(net, device)
        row = {"option": label, "dtype": str(dtype)[6:], "load_s": round(load_s, 2), "weights_bytes": mem["weights"],
               "weights_by_dtype": mem["weights_by_dtype"]}
        if device.type == "cuda":
            row["gpu_weights_bytes"] = torch.cuda.memory_allocated(device) - base
        logits = logits_on(net, ids)  # also the warm-up
        if reference is None:
            reference = logits
        row.update({k: round(v, 4) for k, v in compare(reference, logits).items()})
        rows.append(row)
        if interleave:
            nets.append(net)
        else:
            row["forward_ms"] = round(statistics.median(forward_times([net], ids, device, args.repeat)[0]), 1)
        del net, logits
    if interleave:
        for row, times in zip(rows, forward_times(nets, ids, device, args.repeat)):
            row["forward_ms"] = round(statistics.median(times), 1)
        del nets
    for row in rows:
        row["speedup_vs_baseline"] = round(rows[0]["forward_ms"] / row["forward_ms"], 2)
        print(f"{row['option']:44s} {row['forward_ms']:9.1f} ms  x{row['speedup_vs_baseline']:<5} "
              f"{row['weights_bytes'] / 2**20:9.1f} MiB  rel.err {row['relative_error']:.4f}  "
              f"top-1 {row['top1_agreement']:.3f}  load {row['load_s']:.1f} s", file=sys.stderr)
    prequantized = []
    for scheme in ("nf4", "int8"):
        t = time.perf_counter()
        report = write_prequantized(src, work / scheme, QuantConfig(scheme=scheme), device=str(device), progress=False)
        write_s = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        ckpt = Engine.load(work / scheme, device=str(device), require_tokenizer=False).checkpoint
        sync(device)
        entry = {"scheme": scheme, "quantize_s": round(write_s, 2), "load_prequantized_s": round(time.perf_counter() - t, 2),
                 "file_bytes": sum(report["output_bytes_by_dtype"].values()),
                 "weights_bytes": memory_report(ckpt.network, device)["weights"]}
        if device.type == "cuda":
            entry["gpu_weights_bytes"] = torch.cuda.memory_allocated(device) - base
        prequantized.append(entry)
        print(f"pre-quantized {scheme}: written in {entry['quantize_s']} s, loaded in "
              f"{entry['load_prequantized_s']} s, {entry['file_bytes'] / 2**20:.1f} MiB on disk", file=sys.stderr)
        del ckpt
    print(json.dumps({"hardware": hardware(device), "device": str(device), "shape": args.shape, "parameters": params,
                      "tokens": tokens, "batch": 1, "options": rows, "prequantized": prequantized}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
