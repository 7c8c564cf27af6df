"""DaViT vision tower: conv patch embeddings, then blocks of spatial window attention + channel group attention.

Module and parameter names follow transformers' native Florence2 (`convs.{s}.conv`, `blocks.{s}.{b}.spatial_block...`)
so a native state dict loads without renaming. There is no final norm or head: Florence-2 uses the last feature map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fiore.config import VisionConfig


class ConvEmbed(nn.Module):
    """Strided conv patch embedding with a LayerNorm before (stages 1-3) or after (stage 0) it."""

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int, padding: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_dim if pre_norm else dim)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels of (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H', W')."""
        if self.pre_norm:
            x = self._norm(x)
        x = self.conv(x)
        if not self.pre_norm:
            x = self._norm(x)
        return x


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping `window x window` patches (no shift, no relative bias)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H*W, C)."""
        B, H, W, C = x.shape
        ws = self.window_size
        # Zero-pad right/bottom to whole windows; padded tokens are attended, as in the original, then cropped.
        pad_h, pad_w = (-H) % ws, (-W) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        nW, T, _ = x.shape
        q, k, v = self.qkv(x).view(nW, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (nW, heads, T, hd)
        x = self.proj(x.transpose(1, 2).reshape(nW, T, C))
        x = x.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return x[:, :H, :W].reshape(B, H * W, C)


class ChannelAttention(nn.Module):
    """Group attention across channels: each group's C/G channels attend to each other over all H*W tokens."""

    def __init__(self, dim: int, num_groups: int, qkv_bias: bool):
        super().__init__()
        self.num_groups = num_groups
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        G = self.num_groups
        # (3, B, G, C/G, N): channels play the role of tokens and the N spatial positions that of the head dim, so
        # SDPA's default scale (head dim)^-0.5 is N^-0.5, the scale both reference implementations use.
        q, k, v = self.qkv(x).view(B, N, 3, G, C // G).permute(2, 0, 3, 4, 1).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, G, C/G, N)
        return self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C))


class _MixerBlock(nn.Module):
    """conv-pos-enc -> attention -> conv-pos-enc -> MLP, each with a residual (shared by spatial and channel blocks)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        # Depthwise 3x3 convs act as conditional position encodings before each sub-block.
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def attend(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        x = x + self.conv1(x)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = x + self.drop_path(self.attend(self.norm1(x), H, W))
        x = x.transpose(1, 2).reshape(B, C, H, W)
        x = x + self.conv2(x)
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.ffn(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class SpatialBlock(_MixerBlock):
    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.window_attn = WindowAttention(dim, num_heads, window_size, qkv_bias)

    def attend(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.window_attn(x.view(x.shape[0], H, W, x.shape[-1]))


class ChannelBlock(_MixerBlock):
    def __init__(self, dim: int, num_groups: int, qkv_bias: bool, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.channel_attn = ChannelAttention(dim, num_groups, qkv_bias)

    def attend(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.channel_attn(x)


class Block(nn.Module):
    def __init__(self, spatial_block: SpatialBlock, channel_block: ChannelBlock):
        super().__init__()
        self.spatial_block = spatial_block
        self.channel_block = channel_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x))


class DaViT(nn.Module):
    """The Florence-2 vision tower. `forward`: (B, 3, H, W) -> last feature map (B, C_last, H/32, W/32)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = len(cfg.embed_dims)
        if not (len(cfg.depths) == len(cfg.num_heads) == len(cfg.num_groups) == n):
            raise ValueError(f"DaViT: embed_dims, depths, num_heads, num_groups need {n} stages each: {cfg}")
        # Stochastic depth rises linearly over all 2*sum(depths) sub-blocks (spatial, channel, spatial, ...).
        dpr = torch.linspace(0, cfg.drop_path_rate, 2 * sum(cfg.depths), device="cpu").tolist()
        self.convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        offset = 0
        for s, dim in enumerate(cfg.embed_dims):
            in_dim = cfg.in_chans if s == 0 else cfg.embed_dims[s - 1]
            self.convs.append(
                ConvEmbed(
                    in_dim, dim, cfg.patch_size[s], cfg.patch_stride[s], cfg.patch_padding[s], cfg.patch_prenorm[s]
                )
            )
            stage = nn.ModuleList()
            for b in range(cfg.depths[s]):
                spatial = SpatialBlock(
                    dim, cfg.num_heads[s], cfg.window_size, cfg.qkv_bias, cfg.mlp_ratio, dpr[offset + 2 * b]
                )
                channel = ChannelBlock(dim, cfg.num_groups[s], cfg.qkv_bias, cfg.mlp_ratio, dpr[offset + 2 * b + 1])
                stage.append(Block(spatial, channel))
            self.blocks.append(stage)
            offset += 2 * cfg.depths[s]
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, stage in zip(self.convs, self.blocks, strict=True):
            x = conv(x)
            for block in stage:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    # Non-reentrant checkpointing replays the saved RNG state, so drop-path masks match.
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x
