"""The tuning loop: sample a group of completions per masked function, reward them, update the
LoRA adapter with coupled-GRPO (grpo.py); or, as the baseline it is measured against, plain
fine-tuning on the same functions' true bodies (the masked-diffusion loss).

One step takes `prompts` targets (across all processes), samples `group` canvases for each at
`temperature` (a higher temperature diversifies the order of decoding as well as the tokens),
rewards them, and makes `mu` updates on them, each with its own masks. Everything random in a
step is drawn from (seed, step, target), so a step is the same on one process as split over
several: under torchrun each process takes every world_size-th target, the loss is divided by the
tokens of all processes, and the gradients are summed across them (gloo on CPU) before the
optimizer steps: the update of one process holding the whole batch.

Knows the engine's tasks (text to token ids, sampling) and the network; not sockets, not files
(the command saves the adapter).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from diffucode.daemon.engine.coupled import Pass, pass_logps
from diffucode.daemon.engine.lora import disabled, lora_parameters
from diffucode.daemon.engine.options import Options
from diffucode.daemon.errors import InputError

from .grpo import Completion, coupled_token_logps, grpo_loss, leave_one_out
from .repo import Target
from .reward import Reward
from .settings import TuneSettings

@dataclass
class World:
    """This process's place among the data-parallel processes (torchrun sets the environment)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def sum(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Every process starts from rank 0's weights."""
        if self.size > 1:
            for p in params:
                dist.broadcast(p.data, 0)

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.size == 1:
            return
        for p in params:
            dist.all_reduce(p.grad)


def _seed(*parts) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(62)


class Tuner:
    """A LoRA adapter attached to `engine`'s network, trained on `targets` with `reward`."""

    def __init__(self, engine, targets: list[Target], reward, settings: TuneSettings, world: World | None = None):
        settings.check()
        self.tasks, self.settings, self.reward, self.world = engine.tasks, settings, reward, world or World()
        self.network = engine.checkpoint.network
        self.params = lora_parameters(self.network)
        if not self.params:
            raise InputError("no LoRA adapter attached to train")
        for p in self.network.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.world.broadcast(self.params)
        tok, cfg = self.tasks.tok, engine.checkpoint.config
        pad = tok.token_id("<|dlm_pad|>")  # Instruct/cpGRPO fill the canvas's tail with it; Base with its eos
        self.fill_id = pad if pad is not None else (cfg.eos_token_id if cfg.eos_token_id is not None else self.tasks.end_ids[0])
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self._tokens: dict[tuple, tuple[list[int], list[int], list[int]]] = {}  # per target: see tokens()
        self.targets = [t for t in targets if self.fits(t)]
        if not self.targets:
            raise InputError(f"none of the {len(targets)} functions has a body under {settings.canvas} tokens "
                             f"(raise --canvas)")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)

    # --- pieces of a step ------------------------------------------------------------------

    def step_targets(self, step: int) -> list[tuple[int, Target]]:
        """This process's share of the step's targets, with their index in the whole step. The
        targets are visited in a shuffled order, epoch after epoch."""
        n, P = len(self.targets), self.settings.prompts
        chosen = []
        for i in range(step * P, step * P + P):
            epoch, at = divmod(i, n)
            order = list(range(n))
            random.Random(_seed(self.settings.seed, "epoch", epoch)).shuffle(order)
            chosen.append((i - step * P, self.targets[order[at]]))
        return chosen[self.world.rank::self.world.size]

    def tokens(self, target: Target) -> tuple[list[int], list[int], list[int]]:
        """The target's code before and after (cut to the context budget) and its body, as token ids:
        tokenized once per run (every step samples and scores the same targets again)."""
        key = (target.path, target.name, target.first_line, target.last_line)
        if key not in self._tokens:
            reserve = self.settings.canvas + self.tasks.template_tokens
            budget = (self.settings.context, self.settings.context)
            b, a = self.tasks._context(target.before, target.after, budget, reserve)
            self._tokens[key] = (b, a, self.tasks.tok.encode(target.body))
        return self._tokens[key]

    def fits(self, target: Target) -> bool:
        """Whether the target's body and the end token after it fit the canvas."""
        return len(self.tokens(target)[2]) < self.settings.canvas

    def completion(self, target: Target, middle: list[int], key: str) -> Completion:
        """`middle` laid out in the target's prompt, the canvas's tail filled with end tokens."""
        canvas = self.settings.canvas
        middle = middle[:canvas]
        b, a, _ = self.tokens(target)
        ids, start = self.tasks._layout("infill", b, middle + [self.fill_id] * (canvas - len(middle)), a)
        return Completion(ids, start, canvas, min(canvas, len(middle) + 1), key)

    @torch.no_grad()
    def sample(self, target: Target, n: int, seed: int, temperature: float) -> list[tuple[str, list[int]]]:
        """n canvases for the target in one batch: (text, middle ids) each."""
        b, a, _ = self.tokens(target)
        canvas = self.settings.canvas
        ids, start = self.tasks._layout("infill", b, [self.tasks.ckpt.mask_id] * canvas, a)
        opts = Options(max_new_tokens=canvas, temperature=temperature, seed=seed)
        result = self.tasks.denoise(torch.tensor([ids] * n, device=self.tasks.ckpt.device), opts, canvas,
                                    cut_at_end=True)
        out = []
        for row in range(n):
            _, region, _, _ = self.tasks.candidate(result, row, start, canvas)
            out.append((self.tasks.tok.decode(region, skip_special=True), region))
        return out

    # --- steps ------------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        stats = self._grpo(step) if self.settings.objective == "grpo" else self._sft(step)
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        return stats

    def _update(self, loss_sum: torch.Tensor, local_tokens: int) -> float:
        """One optimizer step on the loss summed over this process's tokens, divided by all processes' tokens."""
        (total,) = self.world.sum([float(local_tokens)])
        self.optimizer.zero_grad(set_to_none=False)
        (loss_sum / max(total, 1.0)).backward()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.world.sum_grads(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        return total

    def _grpo(self, step: int) -> dict:
        s = self.settings
        completions, advantages, rewards = [], [], []
        for index, target in self.step_targets(step):
            sampled = self.sample(target, s.group, _seed(s.seed, step, index), s.temperature)
            got: list[Reward] = self.reward(target, [text for text, _ in sampled])
            advantages += leave_one_out([r.total for r in got])
            rewards += got
            completions += [self.completion(target, ids, f"{step}:{index}:{j}") for j, (_, ids) in enumerate(sampled)]
        mask_id = self.tasks.ckpt.mask_id
        seeds = [_seed(s.seed, step, "masks", m) for m in range(s.mu)]
        with torch.no_grad():  # before any update: the policy to compare with, and the base model
            old = {m: coupled_token_logps(self.network, completions, mask_id, self.pad_id, seeds[m]) for m in range(1, s.mu)}
            with disabled(self.network):
                ref = {m: coupled_token_logps(self.network, completions, mask_id, self.pad_id, seeds[m])
                       for m in range(s.mu)} if s.beta > 0 else None
        losses, kl, clipped, tokens = [], 0.0, 0, 0
        for m in range(s.mu):
            new = coupled_token_logps(self.network, completions, mask_id, self.pad_id, seeds[m])
            before = old.get(m) or [lp.detach() for lp in new]
            parts = grpo_loss(new, before, ref[m] if ref else [lp.detach() for lp in new], advantages, s.clip, s.beta)
            total = self._update(parts.loss_sum, parts.tokens)
            losses.append(float(parts.loss_sum.detach()))
            kl, clipped, tokens = kl + parts.kl_sum, clipped + parts.clipped, tokens + parts.tokens
        n, r_sum, code_sum, fmt_sum, loss_sum, kl, clipped, tokens = self.world.sum(
            [len(rewards), sum(r.total for r in rewards), sum(r.code for r in rewards), sum(r.format for r in rewards),
             losses[0], kl, clipped, tokens])
        return {"step": step, "reward": round(r_sum / max(n, 1), 4), "code": round(code_sum / max(n, 1), 4),
                "format": round(fmt_sum / max(n, 1), 4), "loss": round(loss_sum / max(total, 1), 5),
                "kl": round(kl / max(tokens, 1), 6), "clipped": round(clipped / max(tokens, 1), 4)}

    def _sft(self, step: int) -> dict:
        """The masked-diffusion loss on the true bodies: a random ratio t of the canvas masked,
        the masked tokens' log-likelihood weighted 1/t (the objective the model was trained with)."""
        passes, weights = [], []
        for index, target in self.step_targets(step):
            rng = random.Random(_seed(self.settings.seed, step, index, "sft"))
            c = self.completion(target, self.tokens(target)[2], f"{step}:{index}")
            t = rng.uniform(1e-3, 1.0)
            masked = [i for i in range(c.canvas) if rng.random() < t] or [rng.randrange(c.canvas)]
            passes.append(Pass(c.ids, c.start, masked))
            weights.append(1 / t)
        logps = pass_logps(self.network, passes, self.tasks.ckpt.mask_id, self.pad_id)
        loss_sum = sum(-w * lp.sum() for w, lp in zip(weights, logps))
        local = len(passes) * self.settings.canvas
        total = self._update(loss_sum, local)
        (loss,) = self.world.sum([float(loss_sum.detach())])
        return {"step": step, "loss": round(loss / max(total, 1), 5)}

    # --- measuring ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, targets: list[Target]) -> dict:
        """Greedy answers for `targets` (this process's share), rewarded: mean reward, pass rate
        (the code term: share of tests passed, or edit similarity without tests), share of functions
        whose tests all pass (whose answer matches, without tests), share that parse, exact matches."""
        kept = [t for t in targets if self.fits(t)]
        mine = kept[self.world.rank::self.world.size]
        got = []
        for target in mine:
            text, _ = self.sample(target, 1, 0, 0.0)[0]
            got.append((self.reward(target, [text])[0], text.rstrip("\n") == target.body.rstrip("\n")))
        n, r, code, whole, fmt, exact = self.world.sum(
            [len(got), sum(g.total for g, _ in got), sum(g.code for g, _ in got), sum(g.code == 1.0 for g, _ in got),
             sum(g.format for g, _ in got), sum(e for _, e in got)])
        n = max(n, 1)
        return {"functions": int(n), "reward": round(r / n, 4), "pass_rate": round(code / n, 4),
                "all_pass": round(whole / n, 4), "parses": round(fmt / n, 4), "exact": round(exact / n, 4)}

    def record(self) -> dict:
        return {"settings": asdict(self.settings), "world_size": self.world.size, "fit_canvas": len(self.targets)}
