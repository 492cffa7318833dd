"""Tasks: complete, infill and refine, in text, for one loaded checkpoint.

This layer turns text into token ids (prompt layout, context budget), asks the sampler to
denoise, and turns ids back into text (cutting at end tokens). It knows nothing of sockets.
The text outside the region being written is never re-encoded into the answer: results are
assembled from the caller's own strings, so the code before and after stays byte-identical.

Decoding: "exact" runs the reference sampler (sampler.denoise); "fast" the block-wise decoder on a
dual KV cache (fast.denoise_fast), whose cache buffers and per-document context store live here,
one per loaded model. Each request may choose; `decoding` sets the default.

Prompt formats: "raw" (Base checkpoints: code as it is) and "chatml" (Instruct / cpGRPO:
the code goes into the assistant turn after a fixed instruction). "auto" picks chatml when the
tokenizer has `<|dlm_pad|>`, which only the Instruct and cpGRPO checkpoints add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError, TooLarge
from .checkpoint import Checkpoint
from .options import DECODINGS, LENGTHS, Limits, Options, SamplerConfig, fast_config, sampler_config
from .order import ar_ness
from .sampler import Result, Step, denoise

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QUERIES = {
    "complete": "Continue the following code.",
    "infill": "Fill in the missing code.",
    "refine": "Improve the marked code.",
}
END_TOKENS = ("<|endoftext|>", "<|dlm_pad|>", "<|im_end|>")


def _keep_last(ids: list[int], n: int, stride: int = 1) -> list[int]:
    """The last n ids; with a stride, the ones left after dropping whole strides from the front."""
    drop = len(ids) - n
    if drop <= 0:
        return ids
    return ids[-(-drop // stride) * stride:]


# Text beyond this many characters per token of budget is cut before tokenizing, so a huge file
# costs no more than its budget (code averages 3-4 characters per token; long runs of spaces
# more). The cut lands on a multiple of CUT_GRID characters (keeping up to CUT_GRID more), so it
# stays put while text is typed; the token budget then cuts exactly.
CHARS_PER_TOKEN = 16
CUT_GRID = 4096
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-3  # a positive temperature below this divides logits into infinities


def _finite(name: str, value) -> None:
    if value is not None and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")


def check_canvas_size(name: str, n: int, limits: Limits, positions: int | None = None, template: int = 0) -> None:
    """A canvas of n tokens (option `name`) within the smaller of the canvas limit and what the
    model's `positions` leave beside the prompt's `template` tokens; the error names the limit that
    binds, the model's first when it is the smaller (TooLarge)."""
    room = None if positions is None else max(0, positions - template)
    if room is not None and n > room and room < limits.max_canvas_tokens:
        why = ("the canvas alone is too long for this model" if n > positions else
               f"the canvas and the prompt's {template} tokens are too long for this model")
        raise TooLarge(f"{name} {n}: {why}: sequence of {n + template} tokens exceeds the model's {positions} "
                       f"positions (at most {room} canvas tokens fit)")
    if n > limits.max_canvas_tokens:
        raise TooLarge(f"{name} {n}: a canvas of {n} tokens exceeds the limit of {limits.max_canvas_tokens}")


def check_options(opts: Options, limits: Limits, lengths: list[int] | None = None, positions: int | None = None,
                  template: int = 0) -> None:
    """Every sampling option within the range the sampler can honour, before any work: each error
    names the option, the value and the limit (InputError; TooLarge for sizes over a limit).
    `positions`: the model's, of which the prompt template takes `template` (canvas sizes must fit)."""
    for name in ("temperature", "top_p", "alg_temp", "eps", "threshold"):
        _finite(name, getattr(opts, name))
    if opts.length not in LENGTHS:
        raise InputError(f"length {opts.length!r} is unknown (use fixed or auto)")
    if opts.decoding is not None and opts.decoding not in DECODINGS:
        raise InputError(f"decoding {opts.decoding!r} is unknown (use exact or fast)")
    for name in ("temperature", "alg_temp"):
        v = getattr(opts, name) or 0.0
        if v and not MIN_TEMPERATURE <= v <= MAX_TEMPERATURE:
            raise InputError(f"{name} must be 0 or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {v!r}")
    if opts.threshold is not None and not opts.threshold > 0:
        raise InputError(f"threshold must be > 0 (above 1: one token per step), got {opts.threshold!r}")
    n = opts.max_new_tokens
    if n < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {n}")
    check_canvas_size("max_new_tokens", n, limits, positions, template)
    if opts.steps is not None and not 1 <= opts.steps <= n:
        raise InputError(f"steps must be in [1, max_new_tokens = {n}] (a step reveals at least one token), "
                         f"got {opts.steps}")
    if not 0 <= opts.seed < 2**64:
        raise InputError(f"seed must be in [0, 2**64), got {opts.seed}")
    if not 1 <= opts.block_size <= limits.max_canvas_tokens:
        raise InputError(f"block_size must be in [1, {limits.max_canvas_tokens}], got {opts.block_size}")
    if opts.top_k is not None and opts.top_k < 0:
        raise InputError(f"top_k must be >= 0 (0: no top-k), got {opts.top_k}")
    SamplerConfig(steps=1, alg=opts.alg, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                  alg_temp=opts.alg_temp, eps=opts.eps).check()  # alg, eps and top_p ranges
    if lengths is not None:
        if not lengths:
            raise InputError("lengths is empty: give at least one canvas size, or none")
        if len(lengths) > limits.max_lengths:
            raise TooLarge(f"lengths has {len(lengths)} canvas sizes, over the limit of {limits.max_lengths}")
        for k in lengths:
            if k < 1:
                raise InputError(f"lengths holds {k}; each canvas size must be >= 1")
            check_canvas_size("lengths holds", k, limits, positions, template)


def check_text(limits: Limits, **texts: str) -> None:
    for name, text in texts.items():
        if len(text) > limits.max_text_chars:
            raise TooLarge(f"{name} has {len(text):,} characters, over the limit of {limits.max_text_chars:,}")
    span = texts.get("span")  # becomes the canvas: refused before tokenizing (which holds the GIL)
    if span is not None and len(span) > limits.max_canvas_tokens * CHARS_PER_TOKEN:
        raise TooLarge(f"span has {len(span):,} characters, more than a canvas of {limits.max_canvas_tokens} tokens "
                       f"holds ({CHARS_PER_TOKEN} characters per token at most)")


def _cut_before(text: str, tokens: int | None) -> str:
    """The end of text that can hold `tokens` tokens, cut on the CUT_GRID (see CHARS_PER_TOKEN)."""
    if tokens is None:
        return text
    keep = tokens * CHARS_PER_TOKEN
    if len(text) <= keep:
        return text
    return text[(len(text) - keep) // CUT_GRID * CUT_GRID:]


def _cut_after(text: str, tokens: int | None) -> str:
    return text if tokens is None else text[:tokens * CHARS_PER_TOKEN]


@dataclass
class Candidate:
    length: int  # canvas size tried
    text: str
    score: float  # mean log-probability per kept token (length-normalised)


@dataclass
class Context:
    """How much of the code around the region the model saw: tokens kept on each side, and the
    characters cut from each side's far end to fit the context limit and the caller's budget."""

    before_tokens: int
    after_tokens: int
    before_chars_cut: int
    after_chars_cut: int


@dataclass
class Answer:
    text: str  # the new text for the region (completion, middle, or rewritten span)
    tokens: list[str]  # the region's tokens, as text
    confidence: list[float]  # per token, probability in [0, 1]
    steps_run: int
    forward_passes: int
    candidates: list[Candidate] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the region's token ids
    order: list[int] = field(default_factory=list)  # per token, the step that revealed it (-1: kept as it was)
    ar_ness: dict = field(default_factory=dict)  # {"local", "global"}: how left-to-right the order was (order.py)
    alternatives: list[dict] = field(default_factory=list)  # ranking.py's summaries, best first (this one among them)
    refined: dict = field(default_factory=dict)  # refine: {"lines", "changed", "kept"} (kept: rewrites the model rejected)
    context: Context | None = None  # None where no text context was given (Engine.generate)
    history: list[list[int]] | None = None  # Engine.generate(keep_history=True): the sequence after each step


def _score(logprobs: list[float]) -> float:
    return sum(logprobs) / len(logprobs) if logprobs else -math.inf


class Tasks:
    def __init__(self, ckpt: Checkpoint, prompt_format: str = "auto", limits: Limits | None = None,
                 decoding: str = "exact", cuda_graphs: bool = False, prefix_cache: bool = False):
        if decoding not in DECODINGS:
            raise InputError(f"decoding {decoding!r} is unknown (use exact or fast)")
        self.decoding, self.cuda_graphs, self.prefix_cache = decoding, cuda_graphs, prefix_cache
        self._kv_caches: dict = {}  # fast decoding's, per batch size, made on first use
        self._prefixes = None
        if ckpt.tokenizer is None:
            raise InputError(f"{ckpt.path}: text tasks need the checkpoint's tokenizer files")
        if prompt_format not in ("auto", "raw", "chatml"):
            raise InputError(f"prompt format {prompt_format!r} is unknown (use auto, raw or chatml)")
        self.ckpt, self.tok, self.limits = ckpt, ckpt.tokenizer, limits or Limits()
        if prompt_format == "auto":  # a checkpoint may say; else <|dlm_pad|> marks Instruct/cpGRPO
            prompt_format = ckpt.config.extra.get("diffucode_prompt_format") or (
                "chatml" if self.tok.token_id("<|dlm_pad|>") is not None else "raw")
        self.prompt_format = prompt_format
        ends = {self.tok.token_id(t) for t in END_TOKENS} | {ckpt.config.eos_token_id, ckpt.config.pad_token_id}
        self.end_ids = tuple(sorted(i for i in ends if i is not None))  # few: a tuple serves `in` and FastConfig

    # --- prompt layout -------------------------------------------------------------------

    def _context(self, before: str, after: str, budget: tuple[int | None, int | None] = (None, None),
                 reserve: int = 0, stride: int = 1) -> tuple[list[int], list[int]]:
        """Token ids of the code before and after, cut to the caller's per-side budget and to the
        context limit (keeping the tokens nearest the cursor); unused limit on one side goes to
        the other. `reserve` tokens (canvas, prompt template) are kept free of the model's
        positions, so a long file never makes a request fail. With a `stride`, the code before
        loses whole strides from its start (up to stride - 1 tokens fewer than the budget): the
        kept start then stays put while text is typed at the cursor, and consecutive requests
        share their leading tokens, which the prefix cache reuses."""
        for side, n in zip(("before_tokens", "after_tokens"), budget):
            if n is not None and n < 0:
                raise InputError(f"{side} must be >= 0, got {n}")
        total = max(0, min(self.limits.max_context_tokens, self.ckpt.config.max_position_embeddings - reserve))
        cap = [total if n is None else min(n, total) for n in budget]
        b, a = self.tok.encode(_cut_before(before, cap[0])), self.tok.encode(_cut_after(after, cap[1]))
        if budget[0] is not None:
            b = _keep_last(b, budget[0], stride)
        if budget[1] is not None:
            a = a[:budget[1]]
        if len(b) + len(a) > total:
            want_b = int(total * self.limits.prefix_share)
            keep_a = min(len(a), total - min(len(b), want_b))
            keep_b = total - keep_a
            b, a = _keep_last(b, keep_b, stride), a[:keep_a]
        return b, a

    def _kept(self, before: str, after: str, b: list[int], a: list[int]) -> Context:
        """What the model saw of `before` and `after` (kept as ids b and a), in tokens and characters cut."""
        return Context(before_tokens=len(b), after_tokens=len(a),
                       before_chars_cut=max(0, len(before) - len(self.tok.decode(b))),
                       after_chars_cut=max(0, len(after) - len(self.tok.decode(a))))

    @property
    def template_tokens(self) -> int:
        """Tokens the prompt format adds around the code."""
        ids, start = self._layout("refine", [], [], [])
        return len(ids)

    def _layout(self, task: str, before: list[int], canvas: list[int], after: list[int]) -> tuple[list[int], int]:
        """The full sequence and where the region starts."""
        head: list[int] = []
        tail: list[int] = []
        if self.prompt_format == "chatml":
            head = self.tok.encode_with_special(
                f"{SYSTEM}<|im_start|>user\n{QUERIES[task]}\n<|im_end|>\n<|im_start|>assistant\n")
            if task != "complete":
                tail = self.tok.encode_with_special("<|im_end|>")
        ids = head + before + canvas + after + tail
        return ids, len(head) + len(before)

    def _check_canvas(self, n: int) -> None:
        if n < 1:
            raise InputError(f"the canvas needs at least 1 token, got {n}")
        if n > self.limits.max_canvas_tokens:
            raise TooLarge(f"canvas of {n} tokens exceeds the limit of {self.limits.max_canvas_tokens}")

    def _check_sequence(self, n: int) -> None:
        limit = self.ckpt.config.max_position_embeddings
        if n > limit:
            raise TooLarge(f"sequence of {n} tokens exceeds the model's {limit} positions")

    def _run(self, ids: list[int], opts: Options, canvas: int, callback, region: slice,
             group: str | None = None, cut_at_end: bool = False) -> Result:
        self._check_sequence(len(ids))
        x = torch.tensor([ids], device=self.ckpt.device)

        def with_text(step: Step):
            step.text = self.preview(step.x[0, region].tolist())
            return callback(step)

        return self.denoise(x, opts, canvas, with_text if callback else None, group=group, cut_at_end=cut_at_end)

    def forget_computed(self) -> None:
        """Drop what fast decoding kept of earlier forward passes (the far-context K/V per document,
        the KV buffers and their CUDA graphs, which replay the layers they captured): after the
        network's weights change (a LoRA adapter swapped), none of it may be reused."""
        self._kv_caches.clear()
        self._prefixes = None

    def uses_prefix_cache(self, opts: Options) -> bool:
        return self.decoding_of(opts) == "fast" and (self.prefix_cache if opts.prefix_cache is None
                                                     else opts.prefix_cache)

    def decoding_of(self, opts: Options) -> str:
        decoding = opts.decoding or self.decoding
        if decoding not in DECODINGS:
            raise InputError(f"decoding {decoding!r} is unknown (use exact or fast)")
        return decoding

    def denoise(self, x: torch.Tensor, opts: Options, canvas: int, callback=None, group: str | None = None,
                cut_at_end: bool = False, **padding) -> Result:
        """Denoise the canvas x (B, N) the way opts say; `padding`: attention_mask and position_ids
        of a left-padded batch. cut_at_end: the answer ends at the first end token (infill and
        completion), so fast decoding need not decode what follows one."""
        gen = torch.Generator(device=self.ckpt.device).manual_seed(opts.seed)
        cfg = sampler_config(opts, canvas)
        if self.decoding_of(opts) == "exact":
            return denoise(self.ckpt.network, x, self.ckpt.mask_id, cfg, generator=gen, callback=callback, **padding)
        from .fast import denoise_fast
        from .kvcache import DualKVCache, PrefixStore

        cache = self._kv_caches.get(x.shape[0])
        if cache is None:
            cache = self._kv_caches[x.shape[0]] = DualKVCache(self.ckpt.network, self.cuda_graphs)
        if self._prefixes is None:
            self._prefixes = PrefixStore()
        prefix = (self._prefixes, group or "") if self.uses_prefix_cache(opts) else None
        fast = fast_config(opts, self.end_ids if cut_at_end else ())
        return denoise_fast(self.ckpt.network, x, self.ckpt.mask_id, cfg, fast=fast, generator=gen,
                            callback=callback, cache=cache, prefix=prefix, **padding)

    def preview(self, region: list[int]) -> str:
        """The partial canvas as text: revealed runs decoded, each mask shown as ░."""
        out, run = [], []
        for t in region + [None]:
            if t is not None and t != self.ckpt.mask_id:
                run.append(t)
                continue
            if run:
                out.append(self.tok.decode(run, skip_special=True))
                run = []
            if t is not None:
                out.append("\u2591")
        return "".join(out)

    def _cut(self, ids: list[int]) -> int:
        """Number of tokens before the first end token."""
        return next((i for i, t in enumerate(ids) if t in self.end_ids), len(ids))

    def answer(self, ids: list[int], conf: list[float], result: Result, order: list[int], candidates=(),
               context: Context | None = None) -> Answer:
        pieces = [self.tok.decode([i], skip_special=True) for i in ids]
        return Answer(text=self.tok.decode(ids, skip_special=True), tokens=pieces, confidence=conf,
                      steps_run=result.steps_run, forward_passes=result.forward_passes,
                      candidates=list(candidates), ids=list(ids), order=order, ar_ness=ar_ness(order),
                      context=context)

    # --- tasks ---------------------------------------------------------------------------

    def check(self, opts: Options, lengths: list[int] | None = None, **texts: str) -> None:
        """Options and text sizes within the limits, canvas sizes within the model's positions
        (raises InputError / TooLarge); cheap, the texts not tokenized: the daemon calls it before
        queueing a request, every task again on entry."""
        check_options(opts, self.limits, lengths, self.ckpt.config.max_position_embeddings, self.template_tokens)
        check_text(self.limits, **texts)

    def complete(self, before: str, opts: Options = Options(),
                 callback: Callable[[Step], str | None] | None = None, budget=(None, None),
                 group: str | None = None) -> Answer:
        """Continue the code: before + canvas; the output is cut at the first end token."""
        return self.infill(before, "", opts, callback=callback, task="complete", budget=budget, group=group)

    def infill(self, before: str, after: str, opts: Options = Options(), lengths: list[int] | None = None,
               callback: Callable[[Step], str | None] | None = None, task: str = "infill",
               budget: tuple[int | None, int | None] = (None, None), group: str | None = None) -> Answer:
        """The middle between `before` and `after`.

        Length strategy: end tokens the model places inside the canvas shrink it (the middle is
        cut at the first one). With `lengths`, each canvas size is tried and the most confident
        result kept, by mean log-probability per kept token (the first end token counts as one:
        the decision to stop); the mean, not the sum, so longer canvases are not penalised.
        """
        self.check(opts, lengths, before=before, after=after)
        sizes = sorted(set(lengths)) if lengths else [opts.max_new_tokens]
        best, candidates = None, []
        stride = fast_config(opts).context_chunk if self.uses_prefix_cache(opts) else 1
        plans, kept = self.plan_infill(task, before, after, sizes, budget, stride)
        passes = 0  # forward passes of every canvas tried, and of choosing one
        if opts.length == "auto" and not lengths:  # one pass over the upper bound picks the canvas
            from .length import chosen_length, end_probabilities

            n = chosen_length(end_probabilities(self, *plans[0]))
            passes = 1
            if n != sizes[0]:
                plans, kept = self.plan_infill(task, before, after, [n], budget, stride)
        for ids, start, n in plans:
            result = self._run(ids, opts, n, callback, slice(start, start + n), group, cut_at_end=True)
            passes += result.forward_passes  # every size tried costs its passes
            found = self.candidate(result, 0, start, n)
            candidates.append(found[0])
            if best is None or found[0].score > best[0].score:
                best = (*found, result)
        cand, region, conf, order, result = best
        result.forward_passes = passes
        return self.answer(region, conf, result, order, candidates if len(sizes) > 1 else (), kept)

    def plan_infill(self, task: str, before: str, after: str, sizes: list[int], budget=(None, None),
                    stride: int = 1) -> tuple[list[tuple[list[int], int, int]], Context]:
        """(sequence ids, region start, canvas size) for each canvas size, and the context kept;
        checks the limits."""
        for n in sizes:
            self._check_canvas(n)
        b, a = self._context(before, after, budget, reserve=max(sizes) + self.template_tokens, stride=stride)
        plans = []
        for n in sizes:
            ids, start = self._layout(task, b, [self.ckpt.mask_id] * n, a)
            self._check_sequence(len(ids))
            plans.append((ids, start, n))
        return plans, self._kept(before, after, b, a)

    def candidate(self, result: Result, row: int, start: int, n: int):
        """From a denoised row of a result: the Candidate, the kept region ids, their confidences
        and the step that revealed each."""
        region = result.x[row, start:start + n].tolist()
        lp = result.logprob[row, start:start + n].tolist()
        keep = self._cut(region)
        scored = lp[:keep + 1] if keep < n else lp[:keep]
        cand = Candidate(length=n, text=self.tok.decode(region[:keep], skip_special=True),
                         score=_score([v for v in scored if not math.isnan(v)]))
        order = result.order[row, start:start + keep].tolist()
        return cand, region[:keep], [math.exp(v) if not math.isnan(v) else 1.0 for v in lp[:keep]], order

    @torch.inference_mode()
    def score(self, before: list[int], span: list[int], after: list[int], task: str = "refine",
              groups: int = 4) -> list[float]:
        """Log-probability of each span token as the model predicts it with a share of the span
        masked: pass j masks the tokens whose index is j modulo `groups`, so every token is
        scored while most of its neighbours are visible. The passes run as one batch."""
        n = len(span)
        groups = max(1, min(groups, n))
        ids, start = self._layout(task, before, span, after)
        self._check_sequence(len(ids))
        x = torch.tensor([ids] * groups, device=self.ckpt.device)
        index = torch.arange(n, device=x.device)
        for j in range(groups):
            x[j, start + index[index % groups == j]] = self.ckpt.mask_id
        positions = start + index.view(1, n).expand(groups, n)
        logits = self.ckpt.network(x, predict_positions=positions).logits  # (G, n, V)
        lp = torch.log_softmax(logits, dim=-1).gather(
            -1, torch.tensor(span, device=x.device).view(1, n, 1).expand(groups, n, 1)).squeeze(-1)
        return lp[index % groups, index].tolist()

    def refine(self, before: str, span: str, after: str, opts: Options = Options(), fraction: float = 0.3,
               callback: Callable[[Step], str | None] | None = None, budget=(None, None),
               group: str | None = None, guard: bool = True) -> Answer:
        """Rewrite `span` in place, keeping each line the model does not prefer rewritten (refine.py;
        guard=False keeps every rewrite, as refine did before, for measuring the guard)."""
        from .refine import refine_span

        return refine_span(self, before, span, after, opts, fraction, callback, budget, group, guard)


def locate(text: str, line: int, column: int) -> int:
    """Character offset of a 1-based (line, column) in text; the column may be one past the
    line's last character (the end of the line)."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise InputError(f"line {line} is outside the file, which has {len(lines)} lines")
    content = lines[line - 1].removesuffix("\r")
    if not 1 <= column <= len(content) + 1:
        raise InputError(f"column {column} is outside line {line}, which has {len(content)} "
                         f"characters (columns 1..{len(content) + 1})")
    return sum(len(l) + 1 for l in lines[:line - 1]) + column - 1


def line_span(text: str, first: int, last: int) -> tuple[int, int]:
    """Character offsets [start, end) of lines first..last (1-based, inclusive), without the
    last line's newline."""
    n = len(text.split("\n"))
    if not 1 <= first <= last <= n:
        raise InputError(f"lines {first}-{last} are outside the file, which has {n} lines "
                         f"(need 1 <= A <= B <= {n})")
    start = locate(text, first, 1)
    end = locate(text, last, 1) + len(text.split("\n")[last - 1].removesuffix("\r"))
    return start, end
