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
from fiore.model.kernels import split_fused, split_heads


def as_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) contiguous -> the same memory as an NCHW tensor in channels-last format (no copy)."""
    return x.permute(0, 3, 1, 2)


def as_nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW tensor -> contiguous (B, H, W, C); free when it is channels-last, as oneDNN convs return it."""
    return x.permute(0, 2, 3, 1).contiguous()


class ConvEmbed(nn.Module):
    """Strided conv patch embedding with a LayerNorm before (stages 1-3) or after (stage 0) it. NHWC in and out."""

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int, padding: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_dim if pre_norm else dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', C)."""
        if self.pre_norm:
            x = self.norm(x)
        x = as_nhwc(self.conv(as_nchw(x)))
        return x if self.pre_norm else self.norm(x)


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
        return x * self._mask(x)  # one pass over x

    def residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + forward(branch), in one pass when training (a separate multiply and add would be two)."""
        if self.p == 0.0 or not self.training:
            return x + branch
        return torch.addcmul(x, branch, self._mask(branch))

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return mask.div_(keep)


def window_heads_view(qkv: torch.Tensor, heads: int, ws: int) -> torch.Tensor:
    """Fused (B, H, W, 3*C) qkv of whole windows -> a (3, B, H/ws, W/ws, heads, ws, ws, C/heads) view, no copy.

    Made contiguous, it is q, k, v as (windows, heads, ws*ws, C/heads): window partition and head split in one copy.
    """
    B, H, W, C3 = qkv.shape
    return qkv.view(B, H // ws, ws, W // ws, ws, 3, heads, C3 // (3 * heads)).permute(5, 0, 1, 3, 6, 2, 4, 7)


def split_window_heads(qkv: torch.Tensor, heads: int, ws: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W, 3*C) of whole windows -> q, k, v as contiguous (windows, heads, ws*ws, C/heads) tensors."""
    B, H, W, C3 = qkv.shape
    shape = (B * (H // ws) * (W // ws), heads, ws * ws, C3 // (3 * heads))
    return split_fused(qkv, lambda t: window_heads_view(t, heads, ws), shape)


def merge_window_heads(x: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
    """(windows, heads, ws*ws, C/heads) -> (B, H, W, C): window reverse and head merge in one copy."""
    nW, heads, T, hd = x.shape
    x = x.view(B, H // ws, W // ws, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, H, W, heads * hd)


def windowed(x: torch.Tensor, ws: int, attend) -> torch.Tensor:
    """`attend` on (B, H, W, C) zero-padded right/bottom to whole `ws` windows, cropped back. Padded tokens are
    attended, as in the original (the projections are per token, so cropping after `proj` is the same)."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % ws, (-W) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = attend(x)
    return x[:, :H, :W] if pad_h or pad_w else x


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping `window x window` patches (no shift, no relative bias)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) normalised tokens -> (B, H, W, C). H may be any band of rows (windows start at row 0)."""
        return windowed(x, self.window_size, self._attend)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hp, Wp, C) of whole windows -> the attention output before `proj`, same shape."""
        B, Hp, Wp, _ = x.shape
        # q, k, v come out of the fused projection already in window order (one copy each way).
        q, k, v = split_window_heads(self.qkv(x), self.num_heads, self.window_size)
        x = F.scaled_dot_product_attention(q, k, v)  # (nW, heads, T, hd)
        return self.proj(merge_window_heads(x, B, Hp, Wp, self.window_size))


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
        # Channels attend to channels: scores (B, G, d, d) = q^T k over all N positions (d = C/G), scaled by N^-0.5
        # (the scale both reference implementations get from SDPA, whose "head dim" there is N). Plain matmuls: SDPA
        # would run its flash kernel with a head dim of N here (slower: docs/performance.md).
        q, k, v = split_heads(self.qkv(x), self.num_groups)  # (B, G, N, d) each
        attn = (q.transpose(-1, -2) @ k * N**-0.5).softmax(-1)  # (B, G, d_i, d_j)
        x = v @ attn.transpose(-1, -2)  # (B, G, N, d_i)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _MixerBlock(nn.Module):
    """conv-pos-enc -> attention -> conv-pos-enc -> MLP, each with a residual (shared by spatial and channel blocks).

    Tokens are kept as a contiguous (B, H, W, C) map: (B, H*W, C) for the linears is a view, and the depthwise convs
    see it as channels-last NCHW, so no layout copies are made between the sub-blocks.
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        # Depthwise 3x3 convs act as conditional position encodings before each sub-block.
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) normalised tokens -> (B, H, W, C)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + as_nhwc(self.conv1(as_nchw(x)))
        x = self.drop_path.residual(x, self.attend(self.norm1(x)))
        x = x + as_nhwc(self.conv2(as_nchw(x)))
        return self.drop_path.residual(x, self.ffn(self.norm2(x)))


class SpatialBlock(_MixerBlock):
    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.window_attn = WindowAttention(dim, num_heads, window_size, qkv_bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.window_attn(x)


class ChannelBlock(_MixerBlock):
    def __init__(self, dim: int, num_groups: int, qkv_bias: bool, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.channel_attn = ChannelAttention(dim, num_groups, qkv_bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.channel_attn(x.reshape(B, H * W, C)).view(B, H, W, C)


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
        x = as_nhwc(x)
        for conv, stage in zip(self.convs, self.blocks, strict=True):
            x = conv(x)
            for block in stage:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    # Non-reentrant checkpointing replays the saved RNG state, so drop-path masks match.
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return as_nchw(x)
