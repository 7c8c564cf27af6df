"""Image projector: DaViT's last feature map -> [1 pooled token, H*W patch tokens] at the text width."""

from __future__ import annotations

import math

import torch
from torch import nn

from fiore.config import VisionConfig


class PositionEmbedding2D(nn.Module):
    """Learned absolute 2-D positions: channel vector = [column embedding (x), row embedding (y)]."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.row_embeddings = nn.Embedding(max_positions, dim // 2)
        self.column_embeddings = nn.Embedding(max_positions, dim - dim // 2)

    def forward(self, H: int, W: int) -> torch.Tensor:
        """-> (C, H, W)."""
        limit = self.row_embeddings.num_embeddings
        if H > limit or W > limit:
            raise ValueError(
                f"image feature map {H}x{W} exceeds the {limit}x{limit} position table "
                f"(at most {32 * limit} pixels per side)"
            )
        device = self.row_embeddings.weight.device
        cols = self.column_embeddings(torch.arange(W, device=device))  # (W, C - C//2)
        rows = self.row_embeddings(torch.arange(H, device=device))  # (H, C//2)
        pos = torch.cat([cols[None].expand(H, -1, -1), rows[:, None].expand(-1, W, -1)], dim=-1)  # (H, W, C)
        return pos.permute(2, 0, 1)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: even channels sin(p*w_i), odd channels cos(p*w_i), w_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / half))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
    table = torch.empty(length, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class TemporalEmbedding(nn.Module):
    """1-D sine embedding over frames; a single image is frame 0. Kept as a buffer because checkpoints store it."""

    def __init__(self, max_frames: int, dim: int):
        super().__init__()
        self.register_buffer("pos_idx_to_embed", sinusoid_table(max_frames, dim))


class Projector(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.embed_dims[-1]
        self.image_projection = nn.Linear(dim, cfg.projection_dim, bias=False)
        self.image_proj_norm = nn.LayerNorm(cfg.projection_dim)
        self.image_position_embed = PositionEmbedding2D(cfg.max_position_embeddings, dim)
        self.visual_temporal_embed = TemporalEmbedding(cfg.max_temporal_embeddings, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) feature map -> (B, 1 + H*W, projection_dim) image tokens."""
        H, W = x.shape[-2:]
        x = x + self.image_position_embed(H, W).to(x.dtype)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = x + self.visual_temporal_embed.pos_idx_to_embed[0].to(x.dtype)
        # Florence-2's feature sources: the spatial average (1 token), then the temporal average over the single
        # frame, which is every patch token unchanged.
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return self.image_proj_norm(self.image_projection(x))
