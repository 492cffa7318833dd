"""The Dream network (DiffuCoder, Dream, Dream-Coder): Qwen2 with bidirectional attention.

This module knows tensors only: token ids and positions in, logits out. No tokenizer, no
sampling, no files (the checkpoint loader builds it on the meta device and assigns weights).

Two things make Dream differ from Qwen2 (see shared/reference/dream.md):
1. attention is bidirectional (no causal mask);
2. the logit shift: the prediction for position p is read from the output at position p-1
   (position 0 reads its own output, the reference's dummy row).

The forward API is shaped for the speed work: explicit position ids, an optional boolean
attention mask, optional cached keys/values for positions that are not recomputed, and logits
computed only for the positions asked for. The arithmetic follows the reference modelling code
step by step (fp32 RMSNorm, fp32 rotary tables cast to the activation dtype, repeated K/V heads
into scaled_dot_product_attention) so that greedy decoding is token-identical to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]  # (B, KVH, T, D) keys and values, rotary applied


@dataclass
class DreamConfig:
    """The config.json fields the network uses; defaults are the reference DreamConfig's."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    rope_scaling: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)  # every other key, kept for reference

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "DreamConfig":
        d = dict(d)
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            d["num_key_value_heads"] = d["num_attention_heads"]  # as the reference DreamConfig does
        # transformers 5 writes rope settings as rope_parameters {"rope_type", "rope_theta"}
        rope = d.get("rope_parameters") or (d.get("rope_scaling") if isinstance(d.get("rope_scaling"), dict) else None)
        if isinstance(rope, dict) and "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} or None
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def check(self) -> list[str]:
        """Problems that make this config unusable, in words (empty when fine)."""
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, found {getattr(self, name)!r}")
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 0:
            problems.append(f"num_hidden_layers must be >= 0, found {self.num_hidden_layers!r}")
        if problems:
            return problems
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        scaling_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if self.rope_scaling and scaling_type not in (None, "default"):
            problems.append(f"rope_scaling {self.rope_scaling!r} is not supported (only none)")
        return problems


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> KV:
    """cos, sin of shape (B, T, head_dim), computed in fp32 and cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=position_ids.device).float() / head_dim))
    inv = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
    freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        groups = self.n_heads // self.n_kv
        # Repeat K/V heads like the reference does (not enable_gqa): same kernels, same numbers.
        k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device, where the loader builds the
    network before assigning the real weights: torch's normal_ on meta tensors imports
    torch._dynamo, seconds that every daemon start (and respawn) would pay for nothing."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Backbone(nn.Module):
    """Named `model` inside Dream so that parameter names match the checkpoints."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Output:
    logits: torch.Tensor  # (B, P, V) float32: row j predicts position predict_positions[:, j]
    kv: list[KV] | None  # per layer, keys/values of the input positions (when asked for)


class Dream(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) the positions computed in this pass
        position_ids: torch.Tensor | None = None,  # (B, T); default 0..T-1 (+ cached length)
        attention_mask: torch.Tensor | None = None,  # (B, 1, T, T_past + T) bool, True = attend
        past_kv: list[KV] | None = None,  # per layer, cached K/V of positions not recomputed
        predict_positions: torch.Tensor | None = None,  # (B, P) indices into input_ids; None = all
        return_kv: bool = False,
        rows_attend: bool = False,  # the caller vouches that every row of attention_mask attends somewhere
    ) -> Output:
        B, T = input_ids.shape
        past_len = past_kv[0][0].shape[2] if past_kv else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        if attention_mask is not None and not rows_attend:
            # A row that may attend to nothing (a pad position) gives NaN in SDPA and the NaN
            # spreads through the values; let such rows see themselves instead. Other rows are
            # unaffected since nobody attends to a pad position. (The check syncs with the device,
            # which a CUDA graph cannot capture: callers that know better pass rows_attend.)
            dead = ~attention_mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
            if dead.any():
                eye = torch.zeros_like(attention_mask)
                eye[..., torch.arange(T), past_len + torch.arange(T)] = True
                attention_mask = attention_mask | (dead & eye)

        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        new_kv = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, attention_mask, past_kv[i] if past_kv else None)
            if return_kv:
                new_kv.append(kv)

        # The logit shift: position p is predicted from the hidden state at p - 1.
        if predict_positions is None:
            predict_positions = torch.arange(T, device=x.device).expand(B, T)
        src = (predict_positions - 1).clamp(min=0)
        h = torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        logits = self.lm_head(self.model.norm(h)).float()
        return Output(logits=logits, kv=new_kv if return_kv else None)


def padding_inputs(attention_mask_1d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a (B, N) 0/1 mask of left-padded rows: the (B, 1, N, N) boolean attention mask and
    position ids, exactly as the reference builds them (pad positions get position 1)."""
    m = attention_mask_1d.bool()
    pos = m.long().cumsum(-1) - 1
    pos.masked_fill_(~m, 1)
    return m[:, None, None, :] & m[:, None, :, None], pos
