"""The engine's options, and the one place their defaults are written.

`Options` is how one request is denoised; `Limits` bounds what one request may ask; the CLI's
argparse defaults, the daemon's reading of the wire (where a field not sent means "the default
here") and the README all take their values from these dataclasses. `SamplerConfig` and
`FastConfig` are what the two decoders take; `sampler_config` and `fast_config` derive them from
`Options` for a canvas. No torch here: the CLI builds its parser from this module in an instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
DECODINGS = ("exact", "fast")
LENGTHS = ("fixed", "auto")
# The reference's effective top-k: Dream's diffusion_generate builds its generation config from
# the model config, which under transformers 4.51.3 carries the legacy default top_k = 50. Top-k
# never changes the argmax but renormalises the probabilities, hence the confidences and the
# reveal order, in greedy decoding too. 0 means no top-k, as in transformers.
DEFAULT_TOP_K = 50
DEFAULT_THRESHOLD = 0.9  # Fast-dLLM's; the quality guard of `diffucode bench` checks it
DEFAULT_BLOCK_SIZE = 32
MAX_ALTERNATIVES = 16  # middles one infill may rank (ranking.py)
ALTERNATIVES_TEMPERATURE = 0.8  # the temperature alternatives are sampled at
DEFAULT_DECODING = "fast"  # the daemon's and the Engine's: it held the quality guard (`diffucode bench`)


@dataclass
class Options:
    """How to denoise one request."""

    max_new_tokens: int = 32  # the canvas: masks to fill (end tokens inside it shorten the answer)
    # "fixed": the canvas is max_new_tokens. "auto": max_new_tokens is an upper bound and the canvas
    # is chosen from one forward pass (length.py)
    length: str = "fixed"
    steps: int | None = None  # None: one step per canvas token, the reference-equivalent setting
    alg: str = "entropy"  # reveal order: origin, maskgit_plus, topk_margin or entropy
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # None: no nucleus filtering
    top_k: int | None = DEFAULT_TOP_K  # 0 or None: no top-k
    alg_temp: float | None = 0.0  # > 0: sample which positions to reveal
    eps: float = 1e-3  # final time of the reveal schedule
    seed: int = 0
    # "exact": the reference sampler, a full forward per step. "fast": block-wise decoding on a
    # dual KV cache, revealing every token at least `threshold` probable (fast.py). None: the
    # engine's own default (Engine.load(decoding=...), `serve --decoding`).
    decoding: str | None = None
    threshold: float | None = None  # fast: None = DEFAULT_THRESHOLD
    block_size: int = DEFAULT_BLOCK_SIZE  # fast: positions decoded together against the cache
    # fast: encode the far context chunk-causally and reuse its K/V for the group's next request
    # (kvcache.py); None: the engine's default (`serve --prefix-cache`)
    prefix_cache: bool | None = None


@dataclass
class Limits:
    max_canvas_tokens: int = 1024  # masks in one request
    max_context_tokens: int = 4096  # code before + after sent to the model; the rest is cut
    prefix_share: float = 0.75  # of the context budget, for the code before the cursor
    max_text_chars: int = 1_000_000  # characters of before, after or span one request may send
    max_lengths: int = 8  # canvas sizes one infill may try


@dataclass
class SamplerConfig:
    """The reference sampler's settings (sampler.denoise); fast decoding reads them too."""

    steps: int
    alg: str = Options.alg
    temperature: float = Options.temperature
    top_p: float | None = Options.top_p
    top_k: int | None = Options.top_k
    alg_temp: float | None = Options.alg_temp
    eps: float = Options.eps

    def check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.alg not in ALGORITHMS:
            raise InputError(f"alg {self.alg!r} is unknown; choose one of {', '.join(ALGORITHMS)}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise InputError(f"top_k must be an integer >= 0 (0: no top-k), got {self.top_k!r}")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise InputError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if not 0 < self.eps < 1:
            raise InputError(f"eps must be in (0, 1), got {self.eps}")


@dataclass
class FastConfig:
    """Fast decoding's own settings (fast.denoise_fast)."""

    threshold: float = DEFAULT_THRESHOLD  # reveal every masked token of the block at least this probable
    block_size: int = DEFAULT_BLOCK_SIZE
    context_chunk: int = 64  # far-context chunk (only with a prefix store)
    # End tokens (infill and completion, whose answer is cut at the first end token): once one is
    # revealed in a row's span, the masks after it are filled with it without spending passes.
    end_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if not self.threshold > 0:
            raise InputError(f"threshold must be > 0, got {self.threshold}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise InputError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.context_chunk, int) or self.context_chunk < 1:
            raise InputError(f"context_chunk must be an integer >= 1, got {self.context_chunk!r}")


def sampler_config(opts: Options, canvas: int) -> SamplerConfig:
    """The sampler's settings for a canvas of `canvas` masks; a canvas other than
    max_new_tokens (--lengths, refine) keeps the same tokens per step."""
    steps = opts.steps if opts.steps is not None else canvas
    if opts.steps is not None and canvas != opts.max_new_tokens:
        steps = max(1, math.ceil(canvas * opts.steps / opts.max_new_tokens))
    return SamplerConfig(steps=steps, alg=opts.alg, temperature=opts.temperature, top_p=opts.top_p,
                         top_k=opts.top_k, alg_temp=opts.alg_temp, eps=opts.eps)


def fast_config(opts: Options, end_ids: tuple[int, ...] = ()) -> FastConfig:
    return FastConfig(threshold=DEFAULT_THRESHOLD if opts.threshold is None else opts.threshold,
                      block_size=opts.block_size, end_ids=end_ids)


def options(**given) -> Options:
    """Options from keyword arguments, naming an unknown one and the known ones."""
    known = Options.__dataclass_fields__
    unknown = [k for k in given if k not in known]
    if unknown:
        raise InputError(f"unknown sampling option {unknown[0]!r} (known: {', '.join(known)})")
    return Options(**given)
