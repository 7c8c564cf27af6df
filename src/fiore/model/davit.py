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
from fiore.model.kernels import Linear


def as_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) contiguous -> the same memory as an NCHW tensor in channels-last format (no copy)."""
    return x.permute(0, 3, 1, 2)


def as_nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW tensor -> contiguous (B, H, W, C); free when it is channels-last, as oneDNN convs return it."""
    return x.permute(0, 2, 3, 1).contiguous()


# Inference processes tokens in slices of about this many activation bytes. Why: stage 0 at 768x768 has 36 864 tokens;
# whole-map intermediates (a 75 MB MLP hidden, a 56 MB qkv) are above glibc's mmap threshold, so every one of them
# is fresh zeroed pages (~30 ms of page faults per 56 MB on the build machine), and they do not stay in cache.
SLICE_BYTES = 4 << 20


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
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

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


def heads_view(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused (N, T, 3*C) qkv -> a (3, N, heads, T, C/heads) view: q, k, v along the first dim, no copy."""
    N, T, C3 = qkv.shape
    return qkv.view(N, T, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4)


def window_heads_view(qkv: torch.Tensor, heads: int, ws: int) -> torch.Tensor:
    """Fused (B, H, W, 3*C) qkv of whole windows -> a (3, B, H/ws, W/ws, heads, ws, ws, C/heads) view, no copy.

    Made contiguous, it is q, k, v as (windows, heads, ws*ws, C/heads): window partition and head split in one copy.
    """
    B, H, W, C3 = qkv.shape
    return qkv.view(B, H // ws, ws, W // ws, ws, 3, heads, C3 // (3 * heads)).permute(5, 0, 1, 3, 6, 2, 4, 7)


class _SplitHeads(torch.autograd.Function):
    """Training: fused qkv -> contiguous q, k, v of `shape` (N, heads, T, C/heads) each, through `layout`, a function
    that views the fused tensor as (3, ...) in that order (`heads_view`, `window_heads_view`).

    Why: the view/permute/unbind chain costs two passes over the qkv gradient in backward (unbind stacks the three
    gradients, then the permute is made contiguous again); here each direction is one strided copy.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, layout, shape: tuple[int, int, int, int]):
        ctx.layout, ctx.qkv_shape = layout, qkv.shape
        parts = layout(qkv).contiguous().view(3, *shape)
        return parts[0], parts[1], parts[2]

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        given = next(g for g in grads if g is not None)
        out = given.new_empty(ctx.qkv_shape)
        target = ctx.layout(out)
        for i, g in enumerate(grads):
            if g is None:
                target[i].zero_()
            else:
                target[i].copy_(g.reshape(target[i].shape))
        return out, None, None


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, T, 3*C) -> q, k, v as contiguous (N, heads, T, C/heads) tensors."""
    N, T, C3 = qkv.shape
    return _SplitHeads.apply(qkv, lambda t: heads_view(t, heads), (N, heads, T, C3 // (3 * heads)))


def split_window_heads(qkv: torch.Tensor, heads: int, ws: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W, 3*C) of whole windows -> q, k, v as contiguous (windows, heads, ws*ws, C/heads) tensors."""
    B, H, W, C3 = qkv.shape
    shape = (B * (H // ws) * (W // ws), heads, ws * ws, C3 // (3 * heads))
    return _SplitHeads.apply(qkv, lambda t: window_heads_view(t, heads, ws), shape)


def merge_window_heads(x: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
    """(windows, heads, ws*ws, C/heads) -> (B, H, W, C): window reverse and head merge in one copy."""
    nW, heads, T, hd = x.shape
    x = x.view(B, H // ws, W // ws, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, H, W, heads * hd)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping `window x window` patches (no shift, no relative bias)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) normalised tokens -> (B, H, W, C). H may be any band of rows (windows start at row 0)."""
        B, H, W, C = x.shape
        ws = self.window_size
        # Zero-pad right/bottom to whole windows; padded tokens are attended, as in the original, then cropped.
        pad_h, pad_w = (-H) % ws, (-W) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if torch.is_grad_enabled() and x.requires_grad:
            # Training: q, k, v come out of the fused projection already in window order (one copy each way).
            q, k, v = split_window_heads(self.qkv(x), self.num_heads, ws)
            if x.device.type == "cpu":
                # CPU training: with windows this small (T <= 144) plain matmuls + softmax run fwd+bwd ~25% faster
                # than SDPA's CPU flash kernel; for inference the flash kernel is the faster one (2x at T=144).
                x = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v  # (nW, heads, T, hd)
            else:
                x = F.scaled_dot_product_attention(q, k, v)  # GPU kernels keep the scores out of memory
        else:
            # Inference: partitioning the C-wide input is cheaper than copying the 3C-wide qkv into window order,
            # and SDPA reads q, k, v as strided views.
            x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
            x = F.scaled_dot_product_attention(*heads_view(self.qkv(x), self.num_heads).unbind(0))  # (nW, heads, T, hd)
        x = merge_window_heads(x, B, Hp, Wp, ws)
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return self.proj(x)


class ChannelAttention(nn.Module):
    """Group attention across channels: each group's C/G channels attend to each other over all H*W tokens."""

    def __init__(self, dim: int, num_groups: int, qkv_bias: bool):
        super().__init__()
        self.num_groups = num_groups
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        # Channels attend to channels: scores (B, G, d, d) = q^T k over all N positions (d = C/G), scaled by N^-0.5
        # (the scale both reference implementations get from SDPA, whose "head dim" there is N). Plain matmuls: SDPA
        # runs its flash kernel with a head dim of N here, ~1.5x slower fwd+bwd.
        q, k, v = split_heads(self.qkv(x), self.num_groups)  # (B, G, N, d) each
        attn = (q.transpose(-1, -2) @ k * N**-0.5).softmax(-1)  # (B, G, d_i, d_j)
        x = v @ attn.transpose(-1, -2)  # (B, G, N, d_i)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def forward_sliced(self, x: torch.Tensor, norm: nn.Module, rows: int) -> torch.Tensor:
        """Inference: `x + attention(norm(x))` in place on (B, N, C), `rows` tokens at a time.

        The C/G x C/G attention matrix of a group is a sum over tokens, so it is accumulated slice by slice (the
        values are kept); then each slice of outputs is projected and added. Same maths as `forward`.
        """
        B, N, C = x.shape
        G, d = self.num_groups, C // self.num_groups
        scores = x.new_zeros(B, G, d, d)
        values = x.new_empty(B, G, N, d)
        for r in range(0, N, rows):
            qkv = heads_view(self.qkv(norm(x[:, r : r + rows])), G)  # (3, B, G, n, d)
            scores += qkv[0].transpose(-1, -2) @ qkv[1]
            values[:, :, r : r + rows] = qkv[2]
        attn = (scores * N**-0.5).softmax(-1).transpose(-1, -2)  # (B, G, d_j, d_i)
        for r in range(0, N, rows):
            out = (values[:, :, r : r + rows] @ attn).permute(0, 2, 1, 3).reshape(B, -1, C)
            x[:, r : r + rows] += self.proj(out)
        return x


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

    def attend_inplace(self, x: torch.Tensor) -> None:
        """Inference: x += attend(norm1(x)), sliced (see SLICE_BYTES)."""
        raise NotImplementedError

    def _rows(self, x: torch.Tensor, width: int) -> int:
        return max(1, SLICE_BYTES // (width * x.element_size()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if torch.is_grad_enabled() or self.training:
            x = x + as_nhwc(self.conv1(as_nchw(x)))
            x = self.drop_path.residual(x, self.attend(self.norm1(x)))
            x = x + as_nhwc(self.conv2(as_nchw(x)))
            return self.drop_path.residual(x, self.ffn(self.norm2(x)))
        # Inference: residuals added in place, the per-token parts run on slices of tokens.
        x = x + as_nhwc(self.conv1(as_nchw(x)))  # a new tensor: the caller's input is never written
        self.attend_inplace(x)
        x += as_nhwc(self.conv2(as_nchw(x)))
        flat = x.view(-1, x.shape[-1])
        rows = self._rows(x, self.ffn.fc1.out_features)
        for r in range(0, flat.shape[0], rows):
            part = flat[r : r + rows]
            part += self.ffn(self.norm2(part))
        return x


class SpatialBlock(_MixerBlock):
    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.window_attn = WindowAttention(dim, num_heads, window_size, qkv_bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.window_attn(x)

    def attend_inplace(self, x: torch.Tensor) -> None:
        # Bands of whole windows (a multiple of `window_size` rows) are independent of each other.
        B, H, W, C = x.shape
        ws = self.window_attn.window_size
        band = ws * max(1, self._rows(x, 4 * C) // (B * ws * W))
        for r in range(0, H, band):
            part = x[:, r : r + band]
            part += self.window_attn(self.norm1(part))


class ChannelBlock(_MixerBlock):
    def __init__(self, dim: int, num_groups: int, qkv_bias: bool, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.channel_attn = ChannelAttention(dim, num_groups, qkv_bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.channel_attn(x.reshape(B, H * W, C)).view(B, H, W, C)

    def attend_inplace(self, x: torch.Tensor) -> None:
        B, H, W, C = x.shape
        self.channel_attn.forward_sliced(x.view(B, H * W, C), self.norm1, self._rows(x, 4 * C * B))


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
