"""The `diffucode` command: headless use and scripting.

    diffucode generate --model DIR --input-ids 5,17,99 --max-new-tokens N --steps S --json
    diffucode infill   --model DIR [--adapter DIR] FILE --line L --column C
    diffucode refine   --model DIR [--adapter DIR] FILE --lines A-B
    diffucode serve    --model DIR [--adapter DIR] [--socket PATH | --tcp 127.0.0.1:PORT] [--http 127.0.0.1:PORT]
    diffucode status
    diffucode quantize --model DIR --scheme nf4|int8 --out DIR2
    diffucode bench    [--model DIR | --shape 7b] [--quick]
    diffucode pull     HUB_ID

Heavy imports (torch) happen inside the commands, so `--help` is instant. Errors the user can
fix print one line on stderr and exit with status 2; the file given is never written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from diffucode.cli_options import (LIMITS, CommandParser, address_of, address_options, decoding_options,
                                   int_at_least, model_options, option_flags, positive_int, positive_seconds,
                                   sampler_options, task_options, with_flags)
from diffucode.daemon.engine.options import ALTERNATIVES_TEMPERATURE, DECODINGS, DEFAULT_DECODING, Options
from diffucode.daemon.errors import InputError, TooLarge


class UnreadableFile(InputError):
    """FILE cannot be read; its message names the path, and main() leaves it as it is."""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="diffucode", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="denoise from token ids, like the reference diffusion_generate",
                       description="Denoise a prompt of token ids followed by --max-new-tokens masks, "
                                   "exactly as the reference diffusion_generate does. Works on a "
                                   "checkpoint without tokenizer files.")
    model_options(p, "; tokenizer files are not needed")
    p.add_argument("--input-ids", required=True, help="prompt token ids, comma-separated: 5,17,99")
    sampler_options(p, "origin", "masks after the prompt (default 32)", canvas_limit=False)
    p.add_argument("--json", action="store_true",
                   help='print {"output_ids": prompt + canvas, "history": the sequence after each step}')
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("infill", help="print the middle for a cursor in a file",
                       description="Fill the code at the cursor (line L, column C, both 1-based), "
                                   "conditioned on the code before and after it. Prints the middle; "
                                   "the file is not written.")
    model_options(p, adapter=True)
    p.add_argument("file", type=Path, help="the source file")
    p.add_argument("--line", type=positive_int, required=True, help="cursor line, 1-based")
    p.add_argument("--column", type=positive_int, required=True,
                   help="cursor column, 1-based, in characters; one past the end of the line is allowed")
    p.add_argument("--lengths", default=None,
                   help="try these canvas sizes (comma-separated, e.g. 8,16,32) and keep the most "
                        "confident; default: only --max-new-tokens")
    p.add_argument("--alternatives", type=int_at_least(1), default=1, metavar="N",
                   help="up to N different middles (the greedy one and N-1 sampled at --alternatives-temperature "
                        "in one batch), ranked by the coupled likelihood; --json lists them best first")
    p.add_argument("--alternatives-temperature", type=float, default=ALTERNATIVES_TEMPERATURE, metavar="T",
                   help=f"the temperature the alternatives are sampled at ({ALTERNATIVES_TEMPERATURE:g})")
    sampler_options(p, "entropy", "canvas size (default 32); end tokens inside it shrink the middle")
    decoding_options(p)
    task_options(p)
    p.set_defaults(run=cmd_infill)

    p = sub.add_parser("refine", help="rewrite lines in place; print a unified diff",
                       description="Score the tokens of lines A-B with the model, re-mask the least "
                                   "confident fraction and denoise them again. Prints a unified diff; "
                                   "the file is not written, and nothing outside the lines changes.")
    model_options(p, adapter=True)
    p.add_argument("file", type=Path, help="the source file")
    p.add_argument("--lines", required=True, help="A-B, 1-based and inclusive (e.g. 3-10)")
    p.add_argument("--fraction", type=float, default=0.3,
                   help="share of the span's tokens to re-mask, in (0, 1] (default 0.3)")
    sampler_options(p, "entropy", "unused for refine (the canvas is the re-masked tokens)")
    decoding_options(p)
    task_options(p)
    p.set_defaults(run=cmd_refine)

    p = sub.add_parser("serve", help="run the model daemon in the foreground (logs on stderr)",
                       description="Serve one model to every editor window of this machine over "
                                   "msgpack-rpc on a local socket. Logs go to stderr.")
    model_options(p, adapter=True)
    address_options(p)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "raw", "chatml"],
                   help="raw code (Base) or ChatML (Instruct/cpGRPO); auto detects it")
    p.add_argument("--replace", action="store_true",
                   help="if a daemon already serves this address, shut it down and take over")
    p.add_argument("--max-queue", type=positive_int, default=16, help="pending requests before OVERLOADED (16)")
    p.add_argument("--max-connections", type=positive_int, default=64,
                   help="clients connected at once; the next one is told OVERLOADED (64)")
    p.add_argument("--max-frame-bytes", type=positive_int, default=8 * 1024 * 1024,
                   help="largest accepted message in bytes (8 MiB)")
    p.add_argument("--max-canvas-tokens", type=positive_int, default=LIMITS.max_canvas_tokens,
                   help=f"most masks in one request ({LIMITS.max_canvas_tokens})")
    p.add_argument("--max-context-tokens", type=positive_int, default=LIMITS.max_context_tokens,
                   help=f"code before + after sent to the model; the rest is cut ({LIMITS.max_context_tokens})")
    p.add_argument("--max-text-chars", type=positive_int, default=LIMITS.max_text_chars,
                   help=f"characters of code one request may send per side; more is TOO_LARGE "
                        f"({LIMITS.max_text_chars:,})")
    p.add_argument("--auth-timeout", type=positive_seconds, default=5.0, metavar="S",
                   help="--tcp: seconds a client has to send its token (5)")
    p.add_argument("--frame-timeout", type=positive_seconds, default=10.0, metavar="S",
                   help="seconds a message, once begun, has to arrive whole (10)")
    p.add_argument("--idle-evict", type=positive_seconds, default=30.0, metavar="S",
                   help="when every connection place is taken, one idle this long is closed to make room (30)")
    p.add_argument("--decoding", default=DEFAULT_DECODING, choices=DECODINGS,
                   help=f"decoding for requests that do not choose (default {DEFAULT_DECODING}; see `diffucode infill --help`)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="fast decoding on CUDA: replay each cached step from a CUDA graph (captured once per shape)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="fast decoding: keep each document's far context (code well before the cursor, encoded "
                        "chunk by chunk) and reuse it for the document's next request")
    p.add_argument("--no-watch", action="store_true",
                   help="do not reload when the model's (or the adapter's) files change")
    p.add_argument("--standby", action="store_true",
                   help="keep a second process ready (Python and torch loaded, no model) that takes over within "
                        "a second if this daemon dies without shutting down; the language server asks for it")
    p.add_argument("--as-standby", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads for the model (default: torch's, one per core); on a small CPU shared "
                        "with the editor fewer are faster (the language server spawns its daemon with half the "
                        "cores)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING; or env DIFFUCODE_LOG")
    g = p.add_argument_group("HTTP (OpenAI /v1/completions, llama.cpp /infill, Ollama /api/generate)")
    g.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="also serve HTTP on this address, e.g. 127.0.0.1:8012 (loopback only unless "
                        "--http-allow-remote); clients send `Authorization: Bearer <token>`")
    g.add_argument("--http-token-file", type=Path, default=None, metavar="FILE",
                   help="the HTTP token: read, or created 0600 with a random token if missing "
                        "(default: $XDG_RUNTIME_DIR/diffucode/http-PORT.token)")
    g.add_argument("--http-allow-remote", action="store_true",
                   help="allow a non-loopback --http host; the token is still required")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("status", help="print the running daemon's status",
                       description="Ask the daemon at the address for its status. Exit status 1 "
                                   "when no daemon answers.")
    address_options(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("lsp", help="run the language server (LSP over stdio)", add_help=False,
                       description="The diffucode language server; see `diffucode lsp --help`.")
    p.set_defaults(run=None)  # main() hands `lsp ...` to the language server before parsing

    p = sub.add_parser("quantize", help="write a pre-quantized copy of a checkpoint (loads without re-quantizing)",
                       description="Quantize a checkpoint's Linear layers once and write the result: "
                                   "safetensors shards holding the quantized tensors and their "
                                   "quantization state, config.json with a quantization_config, and "
                                   "the tokenizer files. Tensors are streamed one at a time, so host "
                                   "memory stays near one layer plus one shard. `--model DIR2` then "
                                   "loads it in that scheme on CPU or CUDA.")
    p.add_argument("--model", required=True, help="the full-precision checkpoint (directory or cached hub id)")
    p.add_argument("--scheme", required=True, choices=["nf4", "int8"],
                   help="nf4: 4-bit NormalFloat (bitsandbytes); int8: int8 weights with a scale per row")
    p.add_argument("--out", required=True, type=Path, help="new directory to write (must not exist or be empty)")
    p.add_argument("--device", default="auto", help="where to quantize: auto (CUDA when available), cpu, cuda")
    p.add_argument("--no-double-quant", action="store_true",
                   help="nf4: keep the per-block absmax in fp32 instead of quantizing it too (~0.4 bit/weight more)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head too (it stays in the checkpoint's dtype by default)")
    p.add_argument("--shard-size", type=positive_int, default=1024, metavar="MB",
                   help="largest output shard in MiB (default 1024); host memory holds about one shard")
    p.add_argument("--check-accuracy", action="store_true",
                   help="afterwards, compare the quantized and full logits on fixed inputs (loads both)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("bench", help="time exact against fast decoding on the same workloads; check quality",
                       description="Infill of 32 tokens in 1k tokens of context and a 256-token function, "
                                   "each with the reference-equivalent decoding (a full forward pass per "
                                   "token) and with fast decoding, in one run; then exact against fast on "
                                   "held-out single-line infill. Prints a table; the last line is JSON.")
    from diffucode.bench import add_arguments  # torch-free at import

    add_arguments(p)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("pull", help="download a checkpoint from the Hugging Face hub (the only network use)",
                       description="Download configs, safetensors and tokenizer files (never code or "
                                   "pickles) of a hub checkpoint into the local Hugging Face cache.")
    p.add_argument("hub_id", help="e.g. apple/DiffuCoder-7B-cpGRPO")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache directory (default: HF_HOME's)")
    p.set_defaults(run=cmd_pull)

    from diffucode.tune.command import add_parser as add_tune  # torch-free at import

    add_tune(sub)
    for p in sub.choices.values():  # an engine error naming max_new_tokens is reported as --max-new-tokens
        p.set_defaults(option_flags=option_flags(p))
    return parser


def _engine(args, **kw):
    """The Engine for --model (default: the bundled model) on --device, --dtype, --quantize, with --adapter."""
    from diffucode import Engine

    return Engine.load(args.model, args.device, args.dtype, args.quantize, adapter=getattr(args, "adapter", None),
                       **kw)


def _sampler_args(args) -> Options:
    """The engine's Options from the sampling and decoding arguments this command has."""
    given = {name: getattr(args, name) for name in Options.__dataclass_fields__ if hasattr(args, name)}
    return Options(**given)


def _read(path: Path) -> str:
    """The file's text; every reason it cannot be read is one line naming the path."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UnreadableFile(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableFile(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise UnreadableFile(f"{path}: permission denied (cannot read it)") from None
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def cmd_generate(args) -> int:
    try:
        ids = [int(t) for t in args.input_ids.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--input-ids {args.input_ids!r}: expected comma-separated integers")
    engine = _engine(args, require_tokenizer=False)
    positions = engine.checkpoint.config.max_position_embeddings
    if ids and len(ids) + args.max_new_tokens > positions:
        raise TooLarge(f"--max-new-tokens {args.max_new_tokens}: the prompt's {len(ids)} ids and the canvas exceed "
                       f"this model's {positions} positions (at most {max(0, positions - len(ids))} canvas tokens fit)")
    (answer,) = engine.generate(ids, opts=_sampler_args(args), keep_history=args.json)
    out = ids + answer.ids
    if args.json:
        print(json.dumps({"output_ids": out, "history": answer.history}))
    else:
        print(",".join(map(str, out)))
    return 0


def cmd_infill(args) -> int:
    from diffucode.daemon.engine.tasks import locate

    text = _read(args.file)
    offset = locate(text, args.line, args.column)
    lengths = None
    if args.lengths:
        try:
            lengths = [int(v) for v in args.lengths.split(",")]
        except ValueError:
            raise InputError(f"--lengths {args.lengths!r}: expected comma-separated integers")
    engine = _engine(args, decoding=args.decoding, prompt_format=args.prompt_format)
    alternatives = []
    if args.alternatives > 1:
        if lengths:
            raise InputError("--alternatives and --lengths do not combine: choose one")
        alternatives = engine.alternatives(text[:offset], text[offset:], args.alternatives, opts=_sampler_args(args),
                                           temperature=args.alternatives_temperature)
        ans = alternatives[0].answer
    else:
        ans = engine.infill(text[:offset], text[offset:], opts=_sampler_args(args), lengths=lengths)
    if args.json:
        print(json.dumps({"middle": ans.text, "line": args.line, "column": args.column,
                          "tokens": ans.tokens, "confidence": ans.confidence,
                          "steps": ans.steps_run, "order": ans.order, "ar_ness": ans.ar_ness,
                          "prompt_format": engine.tasks.prompt_format,
                          "candidates": [vars(c) for c in ans.candidates],
                          "alternatives": [a.summary() for a in alternatives]}))
    else:
        sys.stdout.write(ans.text + ("" if ans.text.endswith("\n") else "\n"))
    return 0


def _lines(text: str) -> list[str]:
    """Lines ending at "\n" only (str.splitlines also splits at "\r", form feeds and more)."""
    return [line for line in re.split(r"(?<=\n)", text) if line]


def cmd_refine(args) -> int:
    import difflib

    from diffucode.daemon.engine.tasks import line_span

    span = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", args.lines)
    if not span:
        raise InputError(f"--lines {args.lines!r}: expected A-B, e.g. 3-10")
    first, last = int(span[1]), int(span[2])
    if first > last:
        raise InputError(f"--lines {first}-{last}: the first line is after the last (did you mean {last}-{first}?)")
    text = _read(args.file)
    start, end = line_span(text, first, last)
    engine = _engine(args, decoding=args.decoding, prompt_format=args.prompt_format)
    ans = engine.refine(text[:start], text[start:end], text[end:], opts=_sampler_args(args), fraction=args.fraction)
    new_text = text[:start] + ans.text + text[end:]
    name = str(args.file)
    diff = "".join(difflib.unified_diff(_lines(text), _lines(new_text), f"a/{name}", f"b/{name}"))
    if args.json:
        print(json.dumps({"text": ans.text, "diff": diff, "lines": [first, last], "tokens": ans.tokens,
                          "confidence": ans.confidence, "order": ans.order, "ar_ness": ans.ar_ness,
                          "prompt_format": engine.tasks.prompt_format}))
    else:
        sys.stdout.write(diff)
    return 0


def cmd_serve(args) -> int:
    from diffucode.daemon.serve.main import serve

    return serve(args, address_of(args))


def cmd_status(args) -> int:
    import asyncio

    from diffucode.daemon.rpc.client import probe

    address = address_of(args)
    status = asyncio.run(probe(address, timeout=5.0))
    if status is None:
        print(f"no daemon is listening at {address}", file=sys.stderr)
        return 1
    if "error" in status:
        print(f"the daemon at {address} did not give its status: {status['error']}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status))
        return 0
    mem = status["memory"]
    queue, counters, reload = status["queue"], status["counters"], status["reload"]
    print(f"daemon at {address} (pid {status['limits']['pid']}, diffucode {status['version']}), "
          f"up {status['uptime_s']:.0f} s")
    print(f"model:   {status['model']} on {status['device']}, {status['dtype']}, "
          f"quantization {status['quantization']}")
    print(f"memory:  weights {_sizes(mem['weights_by_dtype'])}"
          + (f"; CUDA {mem['cuda_allocated'] / 2**20:.1f} MiB allocated" if "cuda_allocated" in mem else "")
          + (f"; peak RSS {mem['rss_peak'] / 2**20:.1f} MiB" if mem.get("rss_peak") else ""))
    print(f"queue:   {queue['running']} running, {queue['pending']} pending (limit {queue['limit']})")
    print(f"served:  {counters['completed']} completed, {counters['cancelled']} cancelled, "
          f"{counters['failed']} failed")
    print(f"reload:  {reload['state']}" + (f" ({reload['error']})" if reload.get("error") else ""))
    if status.get("adapter"):  # (optional in the protocol: older daemons do not send it)
        a = status["adapter"]
        reward = "none" if a.get("last_reward") is None else f"{a['last_reward']:.4g}"
        reloads = reload.get("adapter_reloads") or 0
        print(f"adapter: {a['path']} (LoRA rank {a['rank']}, {a['steps']} steps, last reward {reward}"
              + (f", reloaded {reloads} times)" if reloads else ")"))
    return 0


def _sizes(by_dtype: dict) -> str:
    parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in by_dtype.items())
    return f"{sum(by_dtype.values()) / 2**20:.1f} MiB ({parts})"


def cmd_quantize(args) -> int:
    from diffucode.quantization.prequantized import write_prequantized
    from diffucode.quantization.schemes import QuantConfig

    qcfg = QuantConfig(scheme=args.scheme, double_quant=not args.no_double_quant,
                       skip_modules=[] if args.quantize_lm_head else ["lm_head"])
    report = write_prequantized(args.model, args.out, qcfg, device=args.device,
                                shard_bytes=args.shard_size << 20, progress=not args.json)
    if args.check_accuracy:
        from diffucode.quantization.accuracy import check_checkpoints

        report["accuracy"] = check_checkpoints(args.model, args.out, report["device"])
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"wrote {report['out']}: {args.scheme}, {report['quantized_linears']} Linear layers, "
          f"{len(report['shards'])} shard(s), in {report['seconds']:.1f} s on {report['device']}\n"
          f"source:  {_sizes(report['source_bytes_by_dtype'])}\nwritten: {_sizes(report['output_bytes_by_dtype'])}")
    if "cuda_peak_allocated" in report:
        print(f"device:  CUDA peak {report['cuda_peak_allocated'] / 2**20:.1f} MiB allocated while quantizing")
    if "accuracy" in report:
        acc = report["accuracy"]
        print(f"logits:  relative error {acc['relative_error']:.4f}, top-1 agreement "
              f"{acc['top1_agreement']:.3f} on {acc['positions']} fixed positions")
    print(f"serve it with: diffucode serve --model {report['out']}")
    return 0


def cmd_bench(args) -> int:
    from diffucode.bench import run

    return run(args)


def cmd_pull(args) -> int:
    from diffucode.daemon.engine.checkpoint import pull

    path = pull(args.hub_id, revision=args.revision, cache_dir=args.cache_dir)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lsp"]:  # the language server parses its own options (and stays torch-free)
        from diffucode.lsp.handlers import main as lsp_main

        return lsp_main(argv[1:])
    args = build_parser().parse_args(argv)
    from diffucode.daemon.errors import DiffucodeError

    try:
        return args.run(args)
    except DiffucodeError as e:
        message = " ".join(str(e).split())  # one line
        if isinstance(e, InputError) and not isinstance(e, UnreadableFile):  # max_new_tokens: --max-new-tokens
            message = with_flags(message, getattr(args, "option_flags", {}))
        print(f"diffucode {args.command}: error: {message}", file=sys.stderr)
        return 2
