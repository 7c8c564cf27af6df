"""fiore.model.kernels.dropout: the rate, the scale, the gradient, seeding, and the cases it leaves to F.dropout."""

from __future__ import annotations

import pytest
import torch

from fiore.model.kernels import dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_rate_and_expectation(p):
    torch.manual_seed(0)
    n = 1 << 20
    y = dropout(torch.ones(n), p, training=True)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-5  # 5 sigma around p (rounded to 2^-16)
    kept = y[y != 0]
    assert torch.all(kept == kept[0])  # one scale for every kept element
    assert abs(kept[0].item() * (1 - p) - 1) < 1e-4  # 1 / (1 - p), p rounded to a multiple of 2^-16


def test_mask_has_no_pattern_across_lanes():
    # Four 16-bit lanes per 64-bit draw: each lane position must drop at the same rate (the top lane too).
    torch.manual_seed(1)
    y = dropout(torch.ones(1 << 20), 0.5, training=True).view(-1, 4)
    rates = (y == 0).double().mean(0)
    assert torch.all((rates - 0.5).abs() < 0.01), rates


def test_gradient_is_the_mask_and_seeding_repeats_it():
    x = torch.randn(64, 512, requires_grad=True)
    torch.manual_seed(2)
    y = dropout(x, 0.3, training=True)
    y.backward(torch.ones_like(y))
    scale = x.grad.max()
    assert torch.equal(x.grad, (y != 0) * scale) and abs(scale.item() * 0.7 - 1) < 1e-4
    assert torch.equal(y[y != 0], (x * scale)[y != 0])
    torch.manual_seed(2)
    assert torch.equal(dropout(x, 0.3, training=True), y)
    assert not torch.equal(dropout(x, 0.3, training=True), y)


def test_identity_when_off_and_every_size_masked_alike():
    x = torch.randn(1000)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.all(dropout(x, 1.0, training=True) == 0)
    torch.manual_seed(3)
    small = dropout(torch.ones(7), 0.5, training=True)  # one 64-bit draw per four elements, even for tiny inputs
    assert set(small.tolist()) <= {0.0, 2.0}
