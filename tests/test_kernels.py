"""fiore.model.kernels.Linear: same results as F.linear (to float32 rounding) on every path, packed copies follow
weight updates, and autograd still works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fiore.model import kernels
from fiore.model.kernels import Linear

pytestmark = pytest.mark.skipif(not kernels.ONEDNN, reason="this PyTorch build has no oneDNN linear")


@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 1, 64), (3, 2, 64), (kernels.FEW_ROWS + 1, 64), (2, 0, 64)])
def test_inference_paths_equal_f_linear(shape):
    torch.manual_seed(0)
    layer = Linear(64, 96)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (*shape[:-1], 96)
    assert torch.allclose(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_packed_copy_follows_in_place_weight_updates():
    torch.manual_seed(0)
    layer = Linear(32, 48, bias=False)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = layer(x)
        assert layer._packed is not None  # a few-row call made the blocked copy
        layer.weight.mul_(2.0)  # what an optimizer step or load_state_dict does
        after = layer(x)
    assert torch.allclose(after, 2 * before, atol=1e-5)
    layer.drop_packed()
    assert layer._packed is None


def test_gradients_flow_through_the_training_path():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert torch.allclose(layer.weight.grad, torch.ones(8, 1) * x.detach().sum(0, keepdim=True))


def test_modules_with_packed_weights_deep_copy():
    import copy

    layer = Linear(8, 8)
    with torch.no_grad():
        layer(torch.randn(3, 8))
    clone = copy.deepcopy(layer)
    assert clone._packed is None and torch.equal(clone.weight, layer.weight)


def _grads(layer, x, fn):
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out.detach(), [t.grad for t in (x, layer.weight, layer.bias)]


@pytest.mark.parametrize("in_f,out_f", [(32, 96), (128, 32), (64, 64)])
def test_narrow_training_path_equals_f_linear(in_f, out_f):
    torch.manual_seed(0)
    layer = Linear(in_f, out_f)
    x = torch.randn(4, 50, in_f, requires_grad=True)
    got, got_grads = _grads(layer, x, layer)
    out = layer(x)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_NarrowLinearBackward"  # the oneDNN path was taken
    out.mul_(1.0)  # an ordinary view: callers may change it in place (the training loss overwrites its logits)
    want, want_grads = _grads(layer, x, lambda v: F.linear(v, layer.weight, layer.bias))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-4, rtol=1e-5)


def test_narrow_path_gives_only_the_gradients_asked_for():
    torch.manual_seed(0)
    layer = Linear(32, 16)
    layer.weight.requires_grad_(False)  # e.g. fine-tuning biases only
    x = torch.randn(40, 32)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert torch.allclose(layer.bias.grad, torch.full((16,), 40.0))


def test_few_row_calls_keep_the_bias_gradient_when_only_the_bias_trains():
    torch.manual_seed(0)
    layer = Linear(128, 96)  # wide: not the narrow path
    layer.weight.requires_grad_(False)
    layer(torch.randn(3, 128)).sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((96,), 3.0))


def test_narrow_layers_under_autocast_use_f_linear():
    layer = Linear(32, 64)
    x = torch.randn(100, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype is torch.bfloat16 and type(out.grad_fn).__name__ != "_NarrowLinearBackward"
