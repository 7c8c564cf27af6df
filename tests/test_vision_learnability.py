"""The vision tower learns from scratch: with fiore's init and recipe a background classifier on the tiny DaViT's
pooled token leaves chance (0.25) within 300 steps; the first default model's init stays there (docs/training.md,
"A vision tower that learns", which also says why the issue's 0.8 is not reached in 300 steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vision_learnability  # noqa: E402

BATCH = 32


@pytest.mark.slow
def test_tiny_davit_learns_the_background_kind_within_300_steps():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        records = vision_learnability.run(steps=300, batch=BATCH, seed=0, log=100, echo=False)
    finally:
        torch.set_num_threads(threads)
    assert records[-1]["step"] == 300
    # measured: 0.548 / 0.710 / 0.728 at steps 100 / 200 / 300 (seed 0, batch 32, 2 threads); the rest is solid vs.
    # gradient, which it has not yet told apart (docs/training.md, "Where the missing accuracy is")
    assert records[-1]["accuracy"] >= 0.6, records
