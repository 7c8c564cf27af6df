"""CPU kernels: the linear layer every part of the model uses, and dropout.

Why not plain `F.linear` everywhere: on CPU it goes to MKL's sgemm, which is fine for the big matmuls of the vision
tower and the encoder but slow for decoding, where 1-12 rows meet each weight matrix. Those calls are bound by
streaming the weight from memory; MKL reaches 6-12 GB/s there, oneDNN's matmul (PyTorch's
`mkldnn::_linear_pointwise`, the op Inductor emits for frozen CPU linears) 12-20 GB/s on the plain weight for one row,
and with the weight reordered once into oneDNN's blocked layout 9-15 GB/s for 3-4 rows where it otherwise gets 5-12
(cold caches, 2 threads, the build machine; `benchmarks/bench_kernels.py`). A base decoder step with its LM head
takes 32 ms instead of 37 ms at b=1 and 40 ms instead of 90 ms at b=4 (one run of that script).

The few-row path is taken only for inference: CPU, float32, and no gradient wanted.

Narrow layers (at most NARROW input or output features: the first two DaViT stages of small models, 32-64 channels
over 16k-65k tokens) use oneDNN at any row count, in training too (`_NarrowLinear`: oneDNN for the output, with the
bias fused in, and for the input gradient; MKL for the weight gradient). MKL's sgemm is slow when one side of the
product is that thin: forward + backward of those layers takes 0.81-0.92x the time with oneDNN, inference
0.69-0.90x; 128-wide layers were 1.02-1.06x slower with it in training, so the threshold is 64 (build machine,
2 threads: `python benchmarks/bench_kernels.py --narrow`). On the tiny preset's training step that is ~2%.

CUDA, half precision, autocast and builds without oneDNN use `F.linear`. Results differ from `F.linear` by float32
rounding only (another order of the K-sum); token-level parity with transformers is tested through the engine.

`dropout` draws its mask from 16-bit random lanes of 64-bit draws: PyTorch's CPU `bernoulli_` spends ~10 ns per
element (~50 ms of a 1.9 s tiny-preset training step); this is ~3x faster with the multiply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_linear_available()
_onednn_linear = torch.ops.mkldnn._linear_pointwise.default if ONEDNN else None
# Calls with at most this many rows are the memory-bound few-row regime (decoder steps: batch x beams); above it
# the matmul is compute-bound and MKL is as fast as anything else.
FEW_ROWS = 32
# Layers whose narrower side has at most this many features take oneDNN whatever the row count (see above).
NARROW = 64


def contents_key(t: torch.Tensor) -> tuple[int, int]:
    """Changes whenever `t`'s values may have: its storage (moved, re-assigned) or its version (in-place updates).

    Derived copies of weights (blocked layouts, stacked projections) are rebuilt when their sources' keys change.
    Inference tensors carry no version counter (and cannot be changed outside inference mode).
    """
    return t.data_ptr(), -1 if t.is_inference() else t._version


class Linear(nn.Linear):
    """`nn.Linear` with the same parameters and state-dict keys, faster for few-row CPU float32 inference.

    One-row calls use oneDNN on the weight as it is. Calls with 2..FEW_ROWS rows use a oneDNN-blocked copy of the
    weight, made on first use and kept: in practice only the decoder and the LM head ever see such calls, and
    their copies cost that much memory again (356 MB for base). The copy is rebuilt when the weight changes
    (the tensor's version counter moves with every in-place update) and dropped by `drop_packed()`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def drop_packed(self) -> None:
        self._packed = None

    def __getstate__(self):
        # The blocked copy is an opaque oneDNN tensor: not copyable or picklable, and cheap to rebuild.
        return {**self.__dict__, "_packed": None}

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = contents_key(w)
        if self._packed is None or self._packed[0] != key:
            # The batch-size hint picks the blocking; 4 rows (a batch of 4, or 3 beams) is the common case.
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 4))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode steps make ~50 of these calls per token, so this path is written for few Python-level operations.
        w, b, k = self.weight, self.bias, x.shape[-1]
        rows = x.numel() // k if k else 0
        if not (ONEDNN and x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu" and rows):
            return F.linear(x, w, b)
        grad = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad or (b is not None and b.requires_grad))
        if rows <= FEW_ROWS and not grad:
            # No autograd here (checked above), so the parameters go to the op as they are.
            return _onednn_forward(x, w if rows == 1 else self._packed_weight(), b, self.out_features)
        if min(k, self.out_features) > NARROW or torch.is_autocast_enabled("cpu"):
            return F.linear(x, w, b)
        if grad:  # (the Function returns rows x out_features; a view made inside it could not be changed in place)
            return _NarrowLinear.apply(x, w, b).view(*x.shape[:-1], self.out_features)
        return _onednn_forward(x, w, b, self.out_features)


def _onednn_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """(..., k) -> (..., out_features) by oneDNN's linear; `weight` is (out_features, k) or its blocked copy."""
    y = _onednn_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


class _NarrowLinear(torch.autograd.Function):
    """`F.linear` for narrow CPU float32 layers: oneDNN output (bias fused) and input gradient, MKL weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(..., k) -> (rows, out_features): a new tensor, not a view (autograd forbids changing those in place)."""
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        grad = grad.reshape(-1, n).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None, "none", [], "").view(x.shape)
        if ctx.needs_input_grad[1]:
            x = x.reshape(-1, k)
            # MKL is faster with the longer side of the (n, k) result as its rows; the transposed copy is tiny.
            grad_w = grad.t().mm(x) if n >= k else x.t().mm(grad).t().contiguous()
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


# Inputs smaller than this keep F.dropout: the saving would not pay for the extra Python-level ops.
FAST_DROPOUT_MIN = 1 << 14


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    On CPU, the mask compares uniform 16-bit integers (four per 64-bit draw of the global generator, so
    `torch.manual_seed`, checkpoint recomputation and RNG-state resume all apply) with a threshold: p is rounded to
    a multiple of 2^-16 (at most 7.7e-6 off) and the scale uses the rounded value, so the expectation is exact.
    Elsewhere, or for small inputs, `F.dropout`.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or x.numel() < FAST_DROPOUT_MIN or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    n = x.numel()
    dropped = round(p * 65536)  # of 65536 equally likely lane values
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1).view(torch.int16)
    keep = lanes[:n].view(x.shape) >= dropped - 32768
    return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))
