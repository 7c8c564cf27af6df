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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, t, hd) at positions length..length+t-1 of `layer`; return K/V of positions 0..length+t-1.

        `length` itself advances once per decoder call (in `Decoder.forward`), after every layer has written.
        """
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"decoder cache is full: {end} tokens do not fit in max_length={self.max_length}")
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
