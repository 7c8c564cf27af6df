"""Every custom autograd Function and low-level op of the model, in one place.

Each is a plain function of its inputs, the same on every device; the model's modules call them unconditionally.
What they save, measured, is in docs/performance.md; here each docstring says why it exists.

- `split_heads` / `split_fused`: fused q/k/v -> contiguous per-head tensors in one copy each way.
- `late_alias` + `tied_logits`: the tied LM head's weight gradient added to the embedding's sparse rows in place.
- `dropout`: inverted dropout with a cheaper mask.
- `token_cross_entropy`: per-token cross-entropy in row slices, optionally in the logits' own memory.
- `onednn_linear` / `pack_weight`: oneDNN's linear, used only by the strategies of `fiore.model.inference`, where
  they measure faster on the machine at hand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------- attention heads


def heads_view(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused (N, T, 3*C) qkv -> a (3, N, heads, T, C/heads) view: q, k, v along the first dim, no copy."""
    N, T, C3 = qkv.shape
    return qkv.view(N, T, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4)


class _SplitHeads(torch.autograd.Function):
    """Fused qkv -> contiguous q, k, v of `shape` (N, heads, T, C/heads) each, through `layout`, a function that views
    the fused tensor as (3, ...) in that order.

    Why: the view/permute/unbind chain costs two passes over the qkv gradient in backward (unbind stacks the three
    gradients, then the permute is made contiguous again); here each direction is one strided copy.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, layout: Callable, shape: tuple[int, int, int, int]):
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


def split_fused(qkv: torch.Tensor, layout: Callable, shape: tuple[int, int, int, int]):
    """q, k, v of `shape` each, contiguous, from a fused tensor that `layout` views as (3, ...) in that order."""
    return _SplitHeads.apply(qkv, layout, shape)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, T, 3*C) -> q, k, v as contiguous (N, heads, T, C/heads) tensors."""
    N, T, C3 = qkv.shape
    return split_fused(qkv, lambda t: heads_view(t, heads), (N, heads, T, C3 // (3 * heads)))


# ---------------------------------------------------------------------------------------------- tied LM head


class _LateAlias(torch.autograd.Function):
    """Identity whose backward node is created when it is applied: see `late_alias`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def late_alias(weight: torch.Tensor) -> torch.Tensor:
    """The tied weight for the LM head of one training forward, taken before any token of that forward is embedded.

    Why: autograd runs backward nodes newest first, so gradient that flows through this alias reaches the weight after
    the embeddings' sparse row gradients. Autograd adds a dense gradient that comes after sparse ones in place, if it
    is a fresh tensor (what `tied_logits` returns); a sparse one that comes after a dense one is added out of place,
    a full (V, d) copy per lookup. Same values either way.
    """
    return _LateAlias.apply(weight)


class _TiedLogits(torch.autograd.Function):
    """hidden @ weight^T, as `F.linear` computes it: in autocast's dtype when autocast is on (forward and backward),
    gradients returned in their inputs' dtypes. The weight gradient is a fresh tensor (autograd's own linear backward
    hands back a transposed view, never added in place)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        ctx.save_for_backward(h, w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return h.mm(w.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w = ctx.saved_tensors
        grad = grad.to(h.dtype)
        grad_hidden = grad.mm(w).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(h).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight


def tied_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., d) @ weight (V, d)^T -> (..., V), as `F.linear`, with a weight gradient autograd can add to in place."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _TiedLogits.apply(flat, weight).view(*hidden.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------- dropout


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The mask compares uniform 16-bit integers (four per 64-bit draw of the device's generator, so `torch.manual_seed`,
    checkpoint recomputation and RNG-state resume all apply) with a threshold: p is rounded to a multiple of 2^-16
    (at most 7.7e-6 off) and the scale uses the rounded value, so the expectation is exact. Why: PyTorch's CPU
    `bernoulli_` draws one double per element, several times the cost of this mask.
    """
    if not training or p == 0.0:
        return x
    if not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    n = x.numel()
    dropped = round(p * 65536)  # of 65536 equally likely lane values
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    keep = lanes.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
    return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))


# ---------------------------------------------------------------------------------------------- oneDNN linear


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """(..., k) -> (..., out_features) by oneDNN's linear (PyTorch's `mkldnn::_linear_pointwise`, the op Inductor
    emits for frozen CPU linears). `weight` is (out_features, k) float32 on the CPU, or its `pack_weight` copy.
    No autograd."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.mkldnn._linear_pointwise.default(flat, weight, bias, "none", [], "").view(
        *x.shape[:-1], out_features
    )


def pack_weight(weight: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """A copy of `weight` in oneDNN's blocked layout for calls of about `rows` rows (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


# ---------------------------------------------------------------------------------------------- cross-entropy

# Rows per slice in the cross-entropy passes: ~4 MB of float32 logits, so the temporaries stay in cache and are
# reused from the heap instead of being page-faulted in as one (n, V) block (~100 MB at 480 tokens x 51k).
_CE_SLICE_BYTES = 4 << 20


def _row_slices(logits: torch.Tensor) -> tuple[range, int]:
    rows = max(1, _CE_SLICE_BYTES // (logits.shape[1] * logits.element_size()))
    return range(0, logits.shape[0], rows), rows


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token CE from logits (n, V), computed over row slices.

    With `overwrite_logits` the logits' own memory is the workspace: the forward leaves exp(logit - row max) there
    and the backward scales it into the gradient (softmax minus one-hot), so no (n, V) buffer is allocated and the
    exponentials are computed once. PyTorch's CE allocates three such buffers (log_softmax output, nll grad,
    log_softmax grad); at a 51k vocabulary those passes cost as much as a layer. A second backward through the same
    graph fails loudly (the saved tensor's version moved) instead of reading a consumed workspace.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, overwrite_logits: bool) -> torch.Tensor:
        picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # before the logits are overwritten
        lse = logits.new_empty(logits.shape[0])
        row_max = logits.new_empty(logits.shape[0], 1)
        starts, rows = _row_slices(logits)
        for s in starts:
            part, m = logits[s : s + rows], row_max[s : s + rows]
            torch.amax(part, dim=1, keepdim=True, out=m)
            exps = torch.sub(part, m, out=part if overwrite_logits else None).exp_()
            torch.sum(exps, dim=1, out=lse[s : s + rows]).log_().add_(m.squeeze(1))
        ctx.save_for_backward(logits, targets, lse, row_max)
        ctx.overwrite_logits = overwrite_logits
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, row_max = ctx.saved_tensors
        if ctx.overwrite_logits:  # logits hold exp(logit - max): softmax = that * exp(max - lse)
            out = logits.mul_((row_max.squeeze(1) - lse).exp_().mul_(grad).unsqueeze(1))
        else:
            out = torch.empty_like(logits)
            starts, rows = _row_slices(logits)
            for s in starts:
                part = torch.sub(logits[s : s + rows], lse[s : s + rows, None], out=out[s : s + rows])
                part.exp_().mul_(grad[s : s + rows, None])  # softmax * grad while the slice is in cache
        out.scatter_add_(1, targets.unsqueeze(1), -grad.unsqueeze(1))
        return out, None, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, overwrite_logits: bool = False) -> torch.Tensor:
    """logits (n, V) float32, targets (n,) -> per-token cross-entropy (n,); same values and gradients as
    `F.cross_entropy(logits, targets, reduction="none")`.

    overwrite_logits=True lets the backward reuse the logits' memory for their gradient: only for logits nothing
    else reads after the loss (an LM head output the caller owns), never for a leaf tensor.
    """
    if overwrite_logits and logits.requires_grad and logits.grad_fn is None:
        raise ValueError("overwrite_logits=True needs logits computed in the graph, not a leaf tensor")
    return _TokenCrossEntropy.apply(logits, targets, overwrite_logits)
