"""The optimizer and the learning-rate schedule of `fiore train`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from fiore.train.config import TrainConfig
from fiore.train.parts import model_parts, parameters_named


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (frozen ones hold no state); no decay on 1-D params (norms, biases).

    Each group carries `lr_scale` (from `[optim] lr_scale`, by part name or parameter prefix): the loop sets a
    group's lr to the schedule's value times it.
    """
    o = config.optim
    parts = model_parts(model)
    scale_of: dict[int, float] = {}  # parameter id -> its lr scale; the first listed part that holds it wins
    unmatched = []
    for part, scale in o.lr_scale.items():
        try:
            found = [p for p in parameters_named(model, part, parts) if p.requires_grad and id(p) not in scale_of]
        except ValueError:
            found = []
        if not found:
            unmatched.append(part)
        scale_of.update((id(p), float(scale)) for p in found)
    if unmatched:
        raise ValueError(f"[optim] lr_scale: {unmatched} match no trainable parameter; parts: {sorted(parts)}")
    groups: dict[tuple[float, bool], list] = {}
    for p in model.parameters():  # deduplicated: a tied weight is one parameter
        if p.requires_grad:
            groups.setdefault((scale_of.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    if not groups:
        raise ValueError("every parameter is frozen: nothing to train")
    param_groups = [
        {"params": ps, "weight_decay": o.weight_decay if decay else 0.0, "lr_scale": scale}
        for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    try:
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


@dataclass
class Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then cosine to lr * min_lr_ratio at `steps`. A pure function of
    the step, so the scheduler state is the step count."""

    lr: float
    warmup_steps: int
    steps: int
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
