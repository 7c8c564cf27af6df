"""fiore.model.kernels and the oneDNN linear strategy: the same results as F.linear (to float32 rounding) on every
path, blocked copies that follow loaded weights and survive copying, and the custom autograd Functions' gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fiore.model import kernels
from fiore.model.inference import FEW_ROWS, OneDNNLinear, use_onednn

pytestmark = pytest.mark.skipif(not kernels.ONEDNN, reason="this PyTorch build has no oneDNN linear")


def onednn_layer(in_f: int, out_f: int, **paths) -> OneDNNLinear:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    use_onednn(layer, **{"one_row": True, "rows": True, "narrow": False, **paths})
    return layer


@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 1, 64), (3, 2, 64), (FEW_ROWS + 1, 64), (2, 0, 64)])
@pytest.mark.parametrize("narrow", [False, True])
def test_every_path_equals_f_linear(shape, narrow):
    layer = onednn_layer(64, 96, narrow=narrow)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (*shape[:-1], 96)
    assert torch.allclose(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_blocked_copy_follows_loaded_weights_and_survives_deepcopy():
    layer = onednn_layer(32, 48)
    x = torch.randn(4, 32)  # 4 rows: the blocked copy
    with torch.no_grad():
        before = layer(x)
        model = nn.Sequential(layer)
        layer.load_state_dict({"weight": layer.weight * 2, "bias": layer.bias * 2})
        layer.repack()  # what prepare_for_inference's load hook does for a prepared model
        assert torch.allclose(layer(x), 2 * before, atol=1e-5)
        clone = copy.deepcopy(model)[0]
        assert clone.packed is not None and torch.allclose(clone(x), layer(x), atol=1e-6)


def test_prepared_model_repacks_when_weights_are_loaded():
    from fiore.config import preset
    from fiore.model import FlorenceModel
    from fiore.model.inference import prepare_for_inference

    cfg = preset("tiny").replace(text={"vocab_size": 300}, image_size=(64, 64))
    torch.manual_seed(0)
    model = prepare_for_inference(FlorenceModel(cfg), "all")
    fc1 = model.language_model.decoder.layers[0].fc1
    assert isinstance(fc1, OneDNNLinear) and fc1.packed is not None
    x = torch.randn(3, fc1.in_features)
    state = {k: v * 3 if k.endswith("decoder.layers.0.fc1.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(fc1(x), F.linear(x, fc1.weight, fc1.bias), atol=1e-5)


def test_split_heads_gradient_equals_the_view_chain():
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3)]
    (sum((t * w).sum() for t, w in zip(kernels.split_heads(qkv, 2), weights, strict=True))).backward()
    ours = qkv.grad.clone()
    qkv.grad = None
    plain = kernels.heads_view(qkv, 2).unbind(0)
    (sum((t * w).sum() for t, w in zip(plain, weights, strict=True))).backward()
    assert torch.equal(ours, qkv.grad)


def test_tied_logits_equal_f_linear_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 11, dtype=torch.float64)
    (kernels.tied_logits(hidden, kernels.late_alias(weight)) * g).sum().backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (F.linear(hidden, weight) * g).sum().backward()
    assert torch.allclose(ours[0], hidden.grad) and torch.allclose(ours[1], weight.grad)
