"""On a CUDA device: the model's forward, a training step (fp32 and bf16 autocast) and generation agree with the CPU.

Marked `gpu`: without CUDA these tests are deselected (tests/conftest.py), not skipped. The device machine runs them:
`python -m pytest -q tests/test_gpu.py`. FIORE_GPU_TEST_DEVICE=cpu runs the same code on the CPU (a check of the
tests themselves on a machine without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
from fake_florence import same_json, save_tiny_model
from PIL import Image
from test_train import _loss_inputs, _reference_loss, _smoke_model

import fiore
from fiore.train.loss import MultiTaskLoss

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("FIORE_GPU_TEST_DEVICE", "cuda"))


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32: CUDA fp32 matmuls and convolutions then round like the CPU's, to float32 reordering error."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on(device, x):
    return tuple(t.to(device) for t in x)


def test_forward_and_training_step_match_the_cpu():
    x = _loss_inputs(500, lengths=(2, 20, 3, 12, 5, 9))
    cpu = _smoke_model()
    gpu = _smoke_model().to(DEVICE)
    assert next(gpu.parameters()).device.type == DEVICE.type
    reference = _reference_loss(cpu, x, [1.0, 2.0])
    reference.backward()
    loss, _, _ = MultiTaskLoss(gpu, [1.0, 2.0], decode_groups=3)(*_on(DEVICE, x))
    loss.backward()
    torch.testing.assert_close(loss.cpu(), reference.detach(), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_step_on_the_device_is_close_to_fp32():
    x = _on(DEVICE, _loss_inputs(500, lengths=(2, 20, 3, 12, 5, 9)))
    losses = {}
    for precision in ("fp32", "bf16"):
        model = _smoke_model().to(DEVICE)
        loss, _, _ = MultiTaskLoss(model, [1.0, 1.0], precision=precision)(*x)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[precision] = float(loss.detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_a_few_optimizer_steps_lower_the_loss_on_the_device():
    model = _smoke_model().to(DEVICE).train()
    loss_module = MultiTaskLoss(model, [1.0, 1.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _on(DEVICE, _loss_inputs(500, lengths=(2, 20, 3, 12, 5, 9)))
    losses = []
    for _ in range(10):
        loss, _, _ = loss_module(*x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses


def test_generation_on_the_device_answers_as_on_the_cpu(tmp_path):
    path = save_tiny_model(tmp_path / "tiny")
    image = Image.open(os.path.join(os.path.dirname(__file__), "..", "examples", "scene.png"))
    tasks = ["caption", "od", "ocr_with_region"]
    cpu = fiore.load(path).run(image, tasks, max_new_tokens=12)
    gpu = fiore.load(path, device=str(DEVICE)).run(image, tasks, max_new_tokens=12)
    assert same_json({k: v.to_json() for k, v in gpu.items()}, {k: v.to_json() for k, v in cpu.items()}, 1e-3)
