"""Keys and values kept between denoising steps: the dual KV cache of Fast-dLLM, and a far-context
cache kept across requests of the same document.

`DualKVCache` holds, per layer, the K/V of every position of the sequence being denoised, in
buffers allocated once (they grow only for a longer sequence or another batch size), so that the
shapes of a step stay static and the step can be captured in a CUDA graph. Its API:

    refresh(x, ...)   one full forward: logits where asked, and the K/V of every position stored
    step(x, lo, T,...) recompute the window [lo, lo + T) of each row against the stored K/V of all
                      the other positions (the window's own stale copies are masked out)
    encode_context(x, upto, chunk, reuse)
                      the far context [0, upto), chunk-causal (below), on top of `reuse` positions
                      already in the buffers; refreshes then start at `upto`
    select(rows)      keep these batch rows (a request dropped from a batch)

With nothing changed since the refresh, a step's logits are the full forward's (the same keys and
values, attended in another order). Positions are explicit, so a window can sit anywhere.

The far context (`encode_context`): in a bidirectional network the K/V of a position depend on
every token, so no K/V can be reused exactly once anything changed. Here positions far before the
cursor attend only to their own chunk and earlier chunks, so their K/V depend on nothing after
their chunk: a request whose text starts like the previous one's reuses those K/V, with results
identical to computing them again. `PrefixStore` keeps them per document (group).

This module knows the network's forward and tensors; not tokens' meaning, not sampling.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .network import Dream

ROUND = 256  # buffer lengths are rounded up to this, so nearby lengths share buffers (and graphs)


class DualKVCache:
    def __init__(self, network: Dream, cuda_graphs: bool = False):
        cfg = network.config
        self.network = network
        self.layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        weight = network.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the network is on {self.device}")
        self.graphs: dict | None = {} if cuda_graphs else None
        self.k = self.v = torch.empty(0)
        self.batch = self.capacity = self.length = 0
        self.counts = {"refresh": 0, "step": 0, "context": 0, "context_reused": 0}

    # --- buffers ------------------------------------------------------------------------------

    def reserve(self, batch: int, length: int) -> None:
        """Buffers for `batch` rows of `length` positions; allocated again only when they do not fit."""
        if batch != self.batch or length > self.capacity:
            capacity = -(-max(length, 1) // ROUND) * ROUND
            shape = (self.layers, batch, self.kv_heads, capacity, self.head_dim)  # (L, B, KVH, S, D)
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.batch, self.capacity = batch, capacity
            if self.graphs is not None:
                self.graphs.clear()
        self.length = length

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (new buffers: the shapes change)."""
        self.k, self.v = self.k[:, rows].contiguous(), self.v[:, rows].contiguous()
        self.batch = len(rows)
        if self.graphs is not None:
            self.graphs.clear()

    def _past(self, span: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i, :, :, :span], self.v[i, :, :, :span]) for i in range(self.layers)]

    def _store(self, kv, start: int, end: int) -> None:
        for i, (k, v) in enumerate(kv):
            self.k[i, :, :, start:end] = k
            self.v[i, :, :, start:end] = v

    # --- the far context --------------------------------------------------------------------

    def encode_context(self, x: torch.Tensor, upto: int, chunk: int, reuse: int = 0) -> None:
        """K/V of positions [0, upto) of the single row x, where position p attends to the
        positions of its own chunk (p // chunk) and of earlier chunks. The K/V of [0, reuse) must
        already be in the buffers (`load_context`); `reuse` is a multiple of `chunk`."""
        assert x.shape[0] == 1 and reuse % chunk == 0 and 0 <= reuse <= upto <= self.length
        self.counts["context_reused"] += reuse
        if reuse == upto:
            return
        self.counts["context"] += 1
        pos = torch.arange(reuse, upto, device=x.device)
        keys = torch.arange(upto, device=x.device)
        mask = (keys[None, :] // chunk <= pos[:, None] // chunk)[None, None]  # (1, 1, T, upto)
        out = self.network(x[:, reuse:upto], position_ids=pos[None], attention_mask=mask,
                           past_kv=self._past(reuse) if reuse else None,
                           predict_positions=torch.zeros(1, 1, dtype=torch.long, device=x.device),
                           return_kv=True, rows_attend=True)
        self._store(out.kv, reuse, upto)

    def context(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The far context's K/V, (L, KVH, upto, D) each, copied out of the buffers (row 0)."""
        return self.k[:, 0, :, :upto].clone(), self.v[:, 0, :, :upto].clone()

    def load_context(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        self.k[:, 0, :, :n] = k[:, :, :n]
        self.v[:, 0, :, :n] = v[:, :, :n]

    # --- denoising --------------------------------------------------------------------------

    def refresh(self, x: torch.Tensor, position_ids: torch.Tensor, key_valid: torch.Tensor | None,
                predict: torch.Tensor, frozen: int = 0) -> torch.Tensor:
        """One forward over positions [frozen, N) of x (B, N) attending to everything, the far
        context [0, frozen) from the buffers; stores their K/V. Returns the shifted logits
        (B, P, V) of the positions `predict` (B, P), indices into x (all >= frozen + 1)."""
        N = x.shape[1]
        self.counts["refresh"] += 1
        if frozen:
            assert key_valid is None, "a far context is for unpadded single rows"
            out = self.network(x[:, frozen:], position_ids=position_ids[:, frozen:], past_kv=self._past(frozen),
                               predict_positions=predict - frozen, return_kv=True)
        else:
            mask = None if key_valid is None else key_valid[:, None, None, :] & key_valid[:, None, :, None]
            out = self.network(x, position_ids=position_ids, attention_mask=mask, predict_positions=predict,
                               return_kv=True)
        self._store(out.kv, frozen, N)
        return out.logits

    def step(self, x: torch.Tensor, lo: torch.Tensor, T: int, position_ids: torch.Tensor,
             key_valid: torch.Tensor | None, predict: torch.Tensor) -> torch.Tensor:
        """Recompute the window [lo_b, lo_b + T) of every row b of x (B, N) against the stored
        K/V of the other positions. predict (B, P): indices into the window. Returns (B, P, V)."""
        B, N = x.shape
        self.counts["step"] += 1
        span = self.capacity if self.graphs is not None else N  # graphs: one shape for every length
        index = lo[:, None] + torch.arange(T, device=x.device)  # (B, T)
        ids, pos = x.gather(1, index), position_ids.gather(1, index)
        keys = torch.zeros(B, span, dtype=torch.bool, device=x.device)
        keys[:, :N] = True if key_valid is None else key_valid
        keys.scatter_(1, index, False)  # the window's stored copies are stale: attend to the new ones
        mask = torch.cat((keys[:, None, None, :].expand(B, 1, T, span),
                          torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device)), dim=-1)
        if self.graphs is None:
            return self._step(ids, pos, mask, predict)
        return self._graphed(ids, pos, mask, predict)

    def _step(self, ids, pos, mask, predict) -> torch.Tensor:
        span = mask.shape[-1] - ids.shape[1]
        return self.network(ids, position_ids=pos, attention_mask=mask, past_kv=self._past(span),
                            predict_positions=predict, rows_attend=True).logits

    def _graphed(self, ids, pos, mask, predict) -> torch.Tensor:
        """The step replayed from a CUDA graph captured once per shape (inputs copied in)."""
        inputs = (ids, pos, mask, predict)
        key = tuple(t.shape for t in inputs)
        if key not in self.graphs:
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, autotuning)
                for _ in range(2):
                    self._step(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.clone()


class PrefixStore:
    """Per group (an editor document), the far context of its last request: tokens and K/V.
    The least recently used groups are forgotten beyond `max_groups`."""

    def __init__(self, max_groups: int = 8):
        self.max_groups = max_groups
        self.entries: OrderedDict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = OrderedDict()

    def lookup(self, group: str, tokens: list[int], chunk: int) -> tuple[int, tuple | None]:
        """How many leading positions of `tokens` (whole chunks) have K/V stored, and those K/V."""
        entry = self.entries.get(group)
        if entry is None:
            return 0, None
        self.entries.move_to_end(group)
        old, k, v = entry
        same = 0
        for a, b in zip(old, tokens):
            if a != b:
                break
            same += 1
        same -= same % chunk
        return same, ((k, v) if same else None)

    def save(self, group: str, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        self.entries[group] = (list(tokens), k, v)
        self.entries.move_to_end(group)
        while len(self.entries) > self.max_groups:
            self.entries.popitem(last=False)
