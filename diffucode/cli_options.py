"""The command line's shared option groups and argument types, kept apart from the commands.

Several commands take the same groups (model, sampling, decoding, address), so each is built
here once and the help and defaults stay the same everywhere; every default is read from the
engine's `Options` and `Limits`. Torch-free at import: `diffucode --help` stays instant.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

from diffucode.daemon.engine.options import (ALGORITHMS, DECODINGS, DEFAULT_THRESHOLD, LENGTHS, Limits,
                                             Options)

DEFAULTS, LIMITS = Options(), Limits()  # the engine's: every default below is read from these


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors: `diffucode infill: error: argument --line: must be >= 1, got 0`
    and where the help is, exit status 2, no usage dump (`--help` still prints the full help).
    Subcommands are built with the parent's class, so every command, tune's included, has it."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination (an Options field name, such as max_new_tokens) -> its flag."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions
            if a.option_strings and a.dest != "help"}


def with_flags(message: str, flags: dict[str, str]) -> str:
    """An engine message with this command's option names spelt as its flags: a snake_case name
    (max_new_tokens) anywhere, a plain one (steps, seed, lines) only as the message's first word."""
    def flag(m: re.Match) -> str:
        return flags.get(m.group(0), m.group(0))

    message = re.sub(r"(?<![\w/.-])[a-z]+(?:_[a-z]+)+\b(?![/.-])", flag, message)
    return re.sub(r"^[a-z]+(?= )", flag, message)


@functools.lru_cache(maxsize=1)
def bundled_positions() -> int | None:
    """The bundled model's positions (max_position_embeddings), for the help; None if unreadable."""
    from diffucode.models import BUNDLED

    try:
        return int(json.loads((BUNDLED / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, else an error naming the value and the limit."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not 0 < value <= 86400:  # (NaN fails this too)
        raise argparse.ArgumentTypeError(f"{value:g} seconds is outside (0, 86400]")
    return value


def model_options(p: argparse.ArgumentParser, tokenizer_note: str = "", adapter: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="checkpoint directory (config.json, safetensors, tokenizer files) or a hub id "
                        "already in the local Hugging Face cache (see `diffucode pull`); default: the "
                        "small model bundled with diffucode" + tokenizer_note)
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16")
    g.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"],
                   help="quantize the Linear layers while loading: nf4 (bitsandbytes 4-bit, ~4x smaller; "
                        "bf16 math) or int8 (bitsandbytes LLM.int8() on CUDA, torch's dynamic int8 on CPU). "
                        "Embeddings and lm_head keep --dtype. A directory written by `diffucode quantize` "
                        "loads in its own scheme without this option")
    if adapter:
        g.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                       help="a LoRA adapter folder written by `diffucode tune` (adapter_config.json, "
                            "adapter_model.safetensors, tune.json), applied on top of --model; it loads only "
                            "on the base weights it was trained on. `serve` reloads it when its files change")


def sampler_options(p: argparse.ArgumentParser, default_alg: str, tokens_help: str, canvas_limit: bool = True) -> None:
    g = p.add_argument_group("sampling (the reference sampler's options)")
    positions = bundled_positions()
    model = "the model's positions" + (f" ({positions} for the bundled model)" if positions else "")
    limit = (f"at most the smaller of the canvas limit ({LIMITS.max_canvas_tokens}) and {model}, less the prompt's "
             f"tokens" if canvas_limit else f"the prompt and the canvas must fit {model}")
    g.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS.max_new_tokens, metavar="N",
                   help=f"{tokens_help}; {limit}")
    g.add_argument("--length", choices=LENGTHS, default=DEFAULTS.length,
                   help=f"fixed: the canvas is --max-new-tokens; auto: --max-new-tokens is an upper bound and one "
                        f"forward pass chooses the canvas (default {DEFAULTS.length})")
    g.add_argument("--steps", type=positive_int, default=DEFAULTS.steps,
                   help="denoising steps; default: one per canvas token (the most careful setting)")
    g.add_argument("--alg", default=default_alg, choices=ALGORITHMS,
                   help="order in which masked positions are revealed: origin (random), maskgit_plus "
                        "(most probable first), topk_margin (largest top1-top2 margin first), entropy "
                        f"(lowest entropy first; recommended for DiffuCoder). Default {default_alg}")
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                   help=f"0 = greedy; > 0 samples (default {DEFAULTS.temperature:g})")
    g.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus filtering, in (0, 1]")
    g.add_argument("--top-k", type=non_negative_int, default=DEFAULTS.top_k,
                   help=f"keep the k most probable tokens (default {DEFAULTS.top_k}, the reference's effective "
                        f"default: it renormalises confidences, so it changes the reveal order in greedy decoding "
                        f"too); 0: no top-k")
    g.add_argument("--alg-temp", type=float, default=DEFAULTS.alg_temp,
                   help="> 0 samples which positions to reveal from softmax(confidence / alg_temp)")
    g.add_argument("--eps", type=float, default=DEFAULTS.eps,
                   help=f"final time of the reveal schedule (default {DEFAULTS.eps:g})")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed; the same seed reproduces a sample")


def decoding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--decoding", default="exact", choices=DECODINGS,
                   help="exact (default here, for scripting): the reference sampler, a full forward pass per "
                        "step; fast: blocks decoded against a dual KV cache, every token at least --threshold "
                        "probable revealed at once (see `diffucode bench` for speed and quality)")
    g.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                   help=f"fast: reveal every masked token of the block at least this probable "
                        f"(default {DEFAULT_THRESHOLD:g})")
    g.add_argument("--block-size", type=positive_int, default=DEFAULTS.block_size,
                   help=f"fast: positions per block ({DEFAULTS.block_size})")


def task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-format", default="auto", choices=["auto", "raw", "chatml"],
                   help="raw code (Base checkpoints) or ChatML (Instruct/cpGRPO); auto detects it "
                        "from the tokenizer (<|dlm_pad|> is only in Instruct/cpGRPO)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def address_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("address (default: a Unix socket in $XDG_RUNTIME_DIR/diffucode)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--socket", type=Path, default=None, help="Unix socket path (created 0600)")
    x.add_argument("--tcp", default=None, metavar="HOST:PORT",
                   help="loopback TCP instead, e.g. 127.0.0.1:7777; clients need the token")
    g.add_argument("--token-file", type=Path, default=None,
                   help="with --tcp: the file holding the token (written 0600 by serve)")


def address_of(args):
    from diffucode.daemon.rpc.address import Address, default_address, tcp_address

    if args.tcp:
        return tcp_address(args.tcp, args.token_file)
    return Address(socket=args.socket.expanduser().absolute()) if args.socket else default_address()
