"""The run folder: its creation (tokenizer, config.json, run.json), the resumable state under
state/ (fp32 weights, AdamW moments, progress.json), the training.json record, and the export of
the bf16 bundle. See train.py's docstring for what a run folder is for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import data
import torch
from diffucode.daemon.engine.network import Dream
from diffucode.daemon.engine.tokenizer import Tokenizer, train_byte_level_bpe
from safetensors.torch import load_file, save_file

TOKENIZER_FILES = ["vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"]


# --- creation -----------------------------------------------------------------------------------

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


def create_run(args, run: Path) -> dict:
    """A new run folder: the tokenizer trained on the corpus, the config, the run settings."""
    ar = args.ar_steps if args.ar_steps is not None else args.total_steps // 4
    if not 0 <= ar < args.total_steps:  # checked before anything is written
        raise SystemExit(f"--ar-steps {ar} must be at least 0 and below --total-steps {args.total_steps}")
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
    settings["batch"] = settings["batch"] or 8  # a new run's batch, unless --batch says otherwise
    settings["ar_steps"] = ar
    (run / "run.json").write_text(json.dumps(settings, indent=1) + "\n")
    return settings


# --- state ----------------------------------------------------------------------------------------

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
    if not (state / "optimizer.safetensors").exists():  # a GPU segment brings the weights back alone
        print(f"note: {state} has no optimizer.safetensors: AdamW starts with fresh moments", file=sys.stderr)
        return json.loads((state / "progress.json").read_text())
    moments = load_file(state / "optimizer.safetensors", device=device)
    for n, p in net.named_parameters():
        if f"exp_avg/{n}" in moments:
            opt.state[p] = {"step": moments[f"step/{n}"].reshape(()).float().cpu(),
                            "exp_avg": moments[f"exp_avg/{n}"], "exp_avg_sq": moments[f"exp_avg_sq/{n}"]}
    return json.loads((state / "progress.json").read_text())


# --- the record and the export -------------------------------------------------------------------

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
