"""What one `diffucode tune` run is set to: the trainer's settings, their defaults and ranges.
No torch here: the CLI builds `tune`'s options from these fields in an instant."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffucode.daemon.errors import InputError

OBJECTIVES = ("grpo", "sft")


@dataclass
class TuneSettings:
    """The paper's settings where CPU allows: beta 0.01, clip 0.5, mu 2; it used G 10 and
    temperature 1.0-1.2 on GPUs, a group of 4 keeps a CPU step in seconds on the bundled model."""

    steps: int = 20
    group: int = 4  # G: completions per prompt
    prompts: int = 2  # targets per step, over all processes
    temperature: float = 1.2
    beta: float = 0.01  # KL weight against the base model
    clip: float = 0.5  # ratio clip
    mu: int = 2  # updates per sampled batch, each with fresh masks
    lr: float = 2e-4
    rank: int = 8  # LoRA
    alpha: float = 16.0
    canvas: int = 64  # masks the model fills per target (bodies longer than canvas - 1 tokens are skipped)
    context: int = 384  # tokens of code kept on each side of the body at most
    seed: int = 0
    objective: str = "grpo"  # "sft": plain fine-tuning on the true bodies, the baseline
    max_grad_norm: float = 1.0

    def check(self) -> None:
        ranges = {"steps": (1, 1_000_000), "group": (2, 64), "prompts": (1, 256), "mu": (1, 16), "canvas": (2, 1024),
                  "context": (0, 1_000_000)}
        for name, (lo, hi) in ranges.items():
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        for name, lo, hi in (("temperature", 1e-3, 10.0), ("beta", 0.0, 10.0), ("clip", 1e-3, 1.0), ("lr", 1e-8, 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
                raise InputError(f"{name} must be in [{lo:g}, {hi:g}], got {v!r}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective {self.objective!r} is unknown (use {' or '.join(OBJECTIVES)})")
