"""The engine's public face: load a checkpoint once, then infill, complete, refine or generate.

    from diffucode import Engine

    engine = Engine.load()  # the bundled model; or a checkpoint directory, or a cached hub id
    answer = engine.infill("def add(a, b):\n    return ", "\n", max_new_tokens=16)
    answer.text, answer.tokens, answer.confidence, answer.steps_run, answer.forward_passes
    answer.context  # tokens of code kept on each side, characters cut from each side

    engine = Engine.load(adapter="runs/adapter")  # a LoRA adapter from `diffucode tune` on top
    engine.load_adapter("runs/adapter2")  # swapped in place (between requests); None: removed

Sampling options are keyword arguments named as `Options`' fields (options.py, where each is
explained and its default set); an unknown one is an InputError naming it. The CLI, the daemon,
`diffucode bench`, the benchmarks and training load models through `Engine.load`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from . import lora
from .checkpoint import Checkpoint, load_checkpoint
from .options import (ALTERNATIVES_TEMPERATURE, DEFAULT_DECODING, MAX_ALTERNATIVES, Limits, Options, options,
                      sampler_config)
from .order import ar_ness
from .ranking import Alternative, alternatives
from .sampler import Step
from .sampler import generate as reference_generate
from .tasks import Answer, Tasks

Callback = Callable[[Step], object]


class Engine:
    """One loaded checkpoint and the tasks on it."""

    def __init__(self, checkpoint: Checkpoint, *, decoding: str = DEFAULT_DECODING, prompt_format: str = "auto",
                 limits: Limits | None = None, cuda_graphs: bool = False, prefix_cache: bool = False,
                 require_tokenizer: bool = True):
        self.checkpoint = checkpoint
        # text tasks need the tokenizer; `generate` (token ids in and out) does not
        self.tasks = (Tasks(checkpoint, prompt_format, limits, decoding=decoding,
                            cuda_graphs=cuda_graphs and checkpoint.device.type == "cuda", prefix_cache=prefix_cache)
                      if require_tokenizer or checkpoint.tokenizer is not None else None)
        self.adapter: lora.AdapterInfo | None = None  # the LoRA adapter on the network (load_adapter)
        self._base_sha256: str | None = None  # the checkpoint's weights, hashed on the first adapter

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "auto", dtype: str = "auto", quantize: str = "none",
             decoding: str = DEFAULT_DECODING, *, prompt_format: str = "auto", limits: Limits | None = None,
             cuda_graphs: bool = False, prefix_cache: bool = False, require_tokenizer: bool = True,
             adapter: str | Path | None = None) -> "Engine":
        """Load a checkpoint directory or a locally cached hub id (default: the bundled model).
        device: auto, cpu, cuda[:N]; dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16,
        float16; quantize: none, nf4, int8; decoding: the default of requests that do not choose;
        adapter: a LoRA adapter folder (`diffucode tune`) trained on these weights."""
        if model is None:
            from diffucode.models import default_model

            model = default_model()
        ckpt = load_checkpoint(model, device, dtype, require_tokenizer=require_tokenizer, quantize=quantize)
        engine = cls(ckpt, decoding=decoding, prompt_format=prompt_format, limits=limits, cuda_graphs=cuda_graphs,
                     prefix_cache=prefix_cache, require_tokenizer=require_tokenizer)
        if adapter is not None:
            engine.load_adapter(adapter)
        return engine

    def load_adapter(self, folder: str | Path | None) -> lora.AdapterInfo | None:
        """Attach the LoRA adapter in `folder` (replacing the one attached), or detach it (None).
        The network changes in place: call it between requests (the daemon holds its model lock).
        A folder that does not load (missing, damaged, trained on other weights) is an InputError
        and leaves the running adapter as it was."""
        network = self.checkpoint.network
        if folder is None:
            lora.detach(network)
            self.adapter = None
        else:
            if self._base_sha256 is None:
                self._base_sha256 = lora.weights_sha256(self.checkpoint.path)
            try:
                self.adapter = lora.load_adapter(network, Path(folder).expanduser(), self._base_sha256)
            except OSError as e:  # (an unreadable file: lora's own checks raise InputError)
                raise InputError(f"{folder}: cannot read the adapter ({e.strerror or e})") from None
        if self.tasks is not None:
            self.tasks.forget_computed()  # K/V computed with the old weights must not be reused
        return self.adapter

    def _text_tasks(self) -> Tasks:
        if self.tasks is None:
            raise InputError(f"{self.checkpoint.path}: text tasks need the checkpoint's tokenizer files")
        return self.tasks

    def infill(self, before: str, after: str, *, opts: Options | None = None, lengths: list[int] | None = None,
               callback: Callback | None = None, budget: tuple[int | None, int | None] = (None, None),
               group: str | None = None, **sampling) -> Answer:
        """The middle between `before` and `after`; `lengths`: canvas sizes to try, the most
        confident kept; `budget`: at most this many tokens of code before and after."""
        return self._text_tasks().infill(before, after, opts or options(**sampling), lengths=lengths,
                                         callback=callback, budget=budget, group=group)

    def alternatives(self, before: str, after: str, n: int = 3, *, temperature: float = ALTERNATIVES_TEMPERATURE, opts: Options | None = None,
                     budget: tuple[int | None, int | None] = (None, None), **sampling) -> list[Alternative]:
        """Up to n different middles, best first by the coupled likelihood (ranking.py): the
        greedy one and n - 1 sampled at `temperature` in one batch, de-duplicated."""
        if not 1 <= n <= MAX_ALTERNATIVES:
            raise InputError(f"alternatives must be in [1, {MAX_ALTERNATIVES}], got {n}")
        opts = opts or options(**sampling)
        tasks = self._text_tasks()
        tasks.check(replace(opts, temperature=temperature), before=before, after=after)
        return alternatives(tasks, before, after, opts, n, temperature, budget)

    def complete(self, before: str, *, opts: Options | None = None, callback: Callback | None = None,
                 budget: tuple[int | None, int | None] = (None, None), group: str | None = None,
                 **sampling) -> Answer:
        """What follows `before`, cut at the first end token."""
        return self._text_tasks().complete(before, opts or options(**sampling), callback=callback, budget=budget,
                                           group=group)

    def refine(self, before: str, span: str, after: str, *, fraction: float = 0.3, opts: Options | None = None,
               callback: Callback | None = None, budget: tuple[int | None, int | None] = (None, None),
               group: str | None = None, guard: bool = True, **sampling) -> Answer:
        """`span` rewritten in place: its least confident `fraction` of tokens re-masked and denoised,
        each line's rewrite kept only where the model prefers it (guard; `answer.refined` counts)."""
        return self._text_tasks().refine(before, span, after, opts or options(**sampling), fraction=fraction,
                                         callback=callback, budget=budget, group=group, guard=guard)

    def generate(self, ids: list[int] | list[list[int]], *, opts: Options | None = None,
                 callback: Callback | None = None, keep_history: bool = False, **sampling) -> list[Answer]:
        """The reference `diffusion_generate`: each prompt of token ids followed by max_new_tokens
        masks, always the exact sampler. One Answer per prompt (`ids` the new tokens; `history`
        the whole sequence after every step with keep_history); rows of different lengths are
        left-padded as the reference pads them."""
        opts = opts or options(**sampling)
        prompts = [ids] if ids and isinstance(ids[0], int) else ids
        cfg = self.checkpoint.config
        n = opts.max_new_tokens
        if n < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {n}")
        for row in prompts:
            bad = [i for i in row if not 0 <= i < cfg.vocab_size]
            if not row or bad:
                raise InputError(f"a prompt needs at least one token id, each in 0..{cfg.vocab_size - 1}"
                                 + (f"; got {bad[:5]}" if bad else ""))
        width = max(len(row) for row in prompts)
        if width + n > cfg.max_position_embeddings:
            raise InputError(f"sequence of {width + n} tokens exceeds the model's {cfg.max_position_embeddings} "
                             f"positions")
        device = self.checkpoint.device
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        prompt = torch.tensor([[pad] * (width - len(r)) + r for r in prompts], device=device)
        present = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts], device=device)
        gen = torch.Generator(device=device).manual_seed(opts.seed)
        result = reference_generate(self.checkpoint.network, prompt, n, self.checkpoint.mask_id, sampler_config(opts, n),
                                    prompt_mask=present, generator=gen, callback=callback, keep_history=keep_history)
        answers = []
        for b, row in enumerate(prompts):
            new = result.x[b, width:].tolist()
            tok = self.checkpoint.tokenizer
            answers.append(Answer(
                text=tok.decode(new, skip_special=True) if tok else "",
                tokens=[tok.decode([i], skip_special=True) for i in new] if tok else [str(i) for i in new],
                confidence=result.logprob[b, width:].exp().nan_to_num(1.0).tolist(),
                steps_run=result.steps_run, forward_passes=result.forward_passes, ids=new,
                order=(order := result.order[b, width:].tolist()), ar_ness=ar_ness(order),
                history=[h[b, width - len(row):].tolist() for h in result.history] if keep_history else None))
        return answers
