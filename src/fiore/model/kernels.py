"""Inference kernels for CPU: the linear layer every part of the model uses.

Why not plain `F.linear`: on CPU it goes to MKL's sgemm, which is slow for the shapes inference is made of. A decoder
step multiplies 1-12 rows by each weight matrix; there MKL re-packs the whole weight on every call and reaches 3-9 GB/s
of weight streaming where the memory allows ~25 (measured on the 2-core build machine, `benchmarks/bench_kernels.py`).
oneDNN's matmul (PyTorch's `mkldnn::_linear_pointwise`, the op Inductor emits for frozen CPU linears) reads the weight
in place and reaches 16 GB/s at one row; with the weight reordered once into its blocked layout, 13-18 GB/s at 1-4
rows. For the big, compute-bound matmuls of the vision tower it is also ~10% faster than MKL.

The fast path is taken only where it is exact to rounding and autograd is not involved: CPU, float32, and no gradient
wanted. Training, CUDA, half precision and builds without oneDNN use `F.linear`. Results differ from `F.linear` by
float32 rounding only (the order of the K-sum); token-level parity with transformers is tested through the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_linear_available()
# Rows at or below which a reordered (blocked) weight pays off: the memory-bound regime of decoding.
PACKED_MAX_ROWS = 16


class Linear(nn.Linear):
    """`nn.Linear` with the same parameters and state-dict keys, faster for CPU float32 inference.

    `pack()` keeps a oneDNN-blocked copy of the weight for few-row calls (decoder steps). The copy costs the
    weight's memory again, so only the decoder and the LM head are packed (`FlorenceModel.prepare_inference`); it is
    rebuilt when the weight changes (tracked by the tensor's version counter, which in-place updates bump).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pack_wanted = False
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def pack(self, enabled: bool = True) -> None:
        self._pack_wanted = enabled
        if not enabled:
            self._packed = None

    def _fast(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (
            ONEDNN
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
        )

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(rows, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        w = self._packed_weight() if self._pack_wanted and rows <= PACKED_MAX_ROWS else self.weight.detach()
        b = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)
