"""Decoder KV cache, gpt-fast style: fixed-size self-attention buffers indexed by position, plus the
cross-attention K/V of the encoder output, computed once (in `FlorenceModel.new_cache`) and never again."""

from __future__ import annotations

import torch


class DecoderCache:
    """Per decoder layer: self-attention K/V buffers (B, H, max_length, hd) and cross-attention K/V (B, H, N, hd).

    `length` is the number of decoder tokens written so far; every row of the batch is at the same position.
    """

    def __init__(
        self,
        self_k: list[torch.Tensor],
        self_v: list[torch.Tensor],
        cross_k: list[torch.Tensor],
        cross_v: list[torch.Tensor],
        encoder_mask: torch.Tensor,
    ):
        self.self_k, self.self_v = self_k, self_v
        self.cross_k, self.cross_v = cross_k, cross_v
        self.encoder_mask = encoder_mask  # (B, N) bool, True = attend
        self.length = 0

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """`encoder_mask`, or None when every position is attended (no padding): SDPA's unmasked kernel is faster."""
        return None if bool(self.encoder_mask.all()) else self.encoder_mask

    @property
    def max_length(self) -> int:
        return self.self_k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.encoder_mask.shape[0]

    def positions(self, t: int) -> torch.Tensor:
        """(t,) positions of the next t tokens: length .. length+t-1 (the decoder adds their position embeddings)."""
        end = self.length + t
        if end > self.max_length:
            raise ValueError(f"decoder cache is full: {end} tokens do not fit in max_length={self.max_length}")
        return torch.arange(self.length, end, device=self.encoder_mask.device)

    def advance(self, t: int) -> None:
        """Once per decoder call, after every layer has written its t tokens (`Decoder.from_embeddings`)."""
        self.length += t

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, t, hd) at positions length.. of `layer`; return K/V of positions 0..length+t-1."""
        end = self.length + k.shape[2]
        self.self_k[layer][:, :, self.length : end] = k
        self.self_v[layer][:, :, self.length : end] = v
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]

    def causal_mask(self, t: int) -> torch.Tensor | None:
        """(t, length+t) bool mask for t new queries at positions length..; None when t == 1 (sees everything)."""
        if t == 1:
            return None
        device = self.encoder_mask.device
        q = torch.arange(self.length, self.length + t, device=device)
        return q[:, None] >= torch.arange(self.length + t, device=device)[None, :]

    def select(self, index: torch.Tensor) -> DecoderCache:
        """Reorder or repeat rows in place: row i becomes old row `index[i]` (beam search, one prefill -> N tasks).

        `index` is a LongTensor of any length B'; returns `self` for chaining.
        """
        index = index.to(self.encoder_mask.device)

        def pick(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.index_select(0, index) for t in ts]

        self.self_k, self.self_v = pick(self.self_k), pick(self.self_v)
        self.cross_k, self.cross_v = pick(self.cross_k), pick(self.cross_v)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        return self

    def reorder(self, index: torch.Tensor) -> DecoderCache:
        """Beam-search reorder: like `select`, but the cross-attention K/V stay where they are.

        Only valid when every row `i` and its source row `index[i]` were computed from the same encoder output
        (beams of one item). Skips copying the cross-attention K/V, the larger part of the cache. Returns `self`.
        """
        index = index.to(self.encoder_mask.device)
        self.self_k = [t.index_select(0, index) for t in self.self_k]
        self.self_v = [t.index_select(0, index) for t in self.self_v]
        return self


class StaticDecoderCache(DecoderCache):
    """A `DecoderCache` whose every tensor keeps its shape from step to step, for a compiled (CUDA-graph) decode step:
    the position is a tensor (not a Python int, which a compiled step would specialise on, recompiling each step),
    keys and values are written with `index_copy_` at it, attention reads the whole `max_length` buffer under a
    mask of the positions written so far, and a beam reorder copies in place (the buffers keep their addresses).

    The tokens are those of `DecoderCache` exactly (tests/test_static_cache.py): masked positions get zero weight.
    A static cache does not check for overflow (a data-dependent check would end the compiled graph); `generate`
    allocates every position it feeds.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = torch.zeros((), dtype=torch.long, device=self.encoder_mask.device)
        self.slots = torch.arange(self.max_length, device=self.encoder_mask.device)

    @classmethod
    def like(cls, cache: DecoderCache) -> StaticDecoderCache:
        """An empty static cache over `cache`'s buffers (a fresh `DecoderCache` from `FlorenceModel.new_cache`)."""
        return cls(cache.self_k, cache.self_v, cache.cross_k, cache.cross_v, cache.encoder_mask)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes (a compiled step treats them as fixed-address inputs)."""
        return [*self.self_k, *self.self_v, *self.cross_k, *self.cross_v, self.position, self.slots]

    def positions(self, t: int) -> torch.Tensor:
        return self.position + self.slots[:t]

    def advance(self, t: int) -> None:
        self.position += t  # in place: the tensor a compiled step captured

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = self.positions(k.shape[2])
        self.self_k[layer].index_copy_(2, at, k)
        self.self_v[layer].index_copy_(2, at, v)
        return self.self_k[layer], self.self_v[layer]

    def causal_mask(self, t: int) -> torch.Tensor:
        """(t, max_length): query i (at position + i) sees the positions up to its own; never None."""
        return self.positions(t)[:, None] >= self.slots[None, :]

    def reorder(self, index: torch.Tensor) -> StaticDecoderCache:
        index = index.to(self.encoder_mask.device)
        for buffer in (*self.self_k, *self.self_v):
            buffer.copy_(buffer.index_select(0, index))
        return self
