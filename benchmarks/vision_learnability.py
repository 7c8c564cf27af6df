"""Can the vision tower learn from scratch? A controlled run: tiny DaViT + projector, its pooled token -> a linear
head, classifying the synthetic world's background kind (solid / gradient / noise / stripes) at 128x128.

    python benchmarks/vision_learnability.py                         # fiore's init, the documented recipe
    python benchmarks/vision_learnability.py --init bart --lr 1e-3   # the first default model's init and lr
    python benchmarks/vision_learnability.py --target shapes         # objects: which of the 8 shapes are present
    python benchmarks/vision_learnability.py --target shapes --init cnn   # the control: a small plain CNN

Prints held-out accuracy (500 images of seed 3000), the loss and the vision tower's gradient norm every
`--log` steps. `--target shapes`: a multi-label head (binary cross-entropy) says which of the 8 shapes the scene
holds; accuracy is the mean over the 8 yes/no answers (the majority answer per shape is printed first): can the
tower learn objects at all when told about them directly?
tests/test_vision_learnability.py runs `run()` at batch 32 and asserts >= 0.6 at 300 steps (the issue asked 0.8;
docs/training.md says what was reached and why not more).
The numbers of the study are in docs/training.md ("A vision tower that learns").
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fiore.config import preset
from fiore.data import lexicon
from fiore.data.synthetic import make_sample
from fiore.model import FlorenceModel
from fiore.processor import Processor

KINDS = list(lexicon.BACKGROUNDS)
SHAPES = list(lexicon.SHAPES)
TARGETS = {"background": len(KINDS), "shapes": len(SHAPES)}  # outputs of the head


def backgrounds(seed: int, n: int, size: int = 128, target: str = "background") -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic scenes as (pixels (n, 3, size, size), background-kind index (n,)), or with `target="shapes"`
    (n, 8) float presence of each shape."""
    processor = Processor(None, (size, size))
    pixels, labels = [], []
    for i in range(n):
        sample = make_sample(seed, i)
        pixels.append(processor.pixel_values(sample.image)[0])
        if target == "shapes":
            present = {o.attributes["shape"] for o in sample.objects}
            labels.append(torch.tensor([float(shape in present) for shape in SHAPES]))
        else:
            labels.append(torch.tensor(KINDS.index(sample.label)))
    return torch.stack(pixels), torch.stack(labels)


def loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy and top-1 accuracy for class indices; binary cross-entropy and the mean yes/no accuracy for
    multi-label presence."""
    if y.dtype == torch.long:
        return F.cross_entropy(logits, y), float((logits.argmax(1) == y).float().mean())
    return F.binary_cross_entropy_with_logits(logits, y), float(((logits > 0).float() == y).float().mean())


class BackgroundProbe(nn.Module):
    """The model's own image path (DaViT -> projector) and a linear head on its output: the pooled first image token
    (`readout="pooled"`), or every spatial token, flattened (`"tokens"`: what the text model sees, positions kept)."""

    def __init__(self, size: int, init: str = "fiore", seed: int = 0, readout: str = "pooled", outputs: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        model = FlorenceModel(
            preset("tiny").replace(image_size=(size, size), vision={"drop_path_rate": 0.0}, text={"vocab_size": 64})
        )
        if init == "bart":  # the first default model's init: N(0, 0.02) for convolutions too
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.data.normal_(0.0, 0.02)
                    m.bias.data.zero_()
        elif init == "zero-bias":  # experiment: convolution biases at zero (less image-independent offset)
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.bias.data.zero_()
        elif init == "fc1":  # experiment: the MLPs' first layers at unit gain, so GELU starts nonlinear
            for name, m in model.vision_tower.named_modules():
                if name.endswith("ffn.fc1"):
                    m.weight.data.normal_(0.0, m.in_features**-0.5)
        self.tower, self.projector, self.readout = model.vision_tower, model.projector, readout
        tokens = 1 if readout == "pooled" else (size // 32) ** 2
        self.head = nn.Linear(tokens * model.config.vision.projection_dim, outputs)
        if init == "cnn":  # the control: three conv + BatchNorm + ReLU stages, average-pooled (no DaViT)
            self.projector = nn.Identity()
            self.tower = nn.Sequential(
                *_conv_stage(3, 32), nn.MaxPool2d(2), *_conv_stage(32, 64), nn.MaxPool2d(2), *_conv_stage(64, 128)
            )
            self.head = nn.Linear(128, outputs)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.projector, nn.Identity):
            return self.head(self.tower(pixels).mean((2, 3)))
        x = self.projector(self.tower(pixels))
        return self.head(x[:, 0] if self.readout == "pooled" else x[:, 1:].flatten(1))


def _conv_stage(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU()]


def run(
    steps: int = 300,
    lr: float = 5e-4,
    init: str = "fiore",
    batch: int = 16,
    size: int = 128,
    warmup: int = 20,
    seed: int = 0,
    log: int = 50,
    data=None,
    echo: bool = True,
    readout: str = "pooled",
    target: str = "background",
) -> list[dict]:
    """Train the probe; returns one record per `log` steps: step, loss, tower gradient norm, held-out accuracy.
    AdamW (betas 0.9/0.98, weight decay 0.05 on matrices), linear warmup then cosine to 5%, clip 1.0: the
    recipe of `fiore train`."""
    (x, y), (x_test, y_test) = data or (
        backgrounds(0, steps * batch, size, target),
        backgrounds(3000, 500, size, target),
    )
    if echo and target == "shapes":
        print({"majority_accuracy": round(float(torch.maximum(y_test.mean(0), 1 - y_test.mean(0)).mean()), 4)})
    net = BackgroundProbe(size, init, seed, readout, TARGETS[target])
    decay = [p for p in net.parameters() if p.ndim >= 2]
    rest = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    records, t0 = [], time.time()
    for step in range(steps):
        progress = max(0, step - warmup) / max(1, steps - warmup)
        scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss, _ = loss_and_accuracy(net(x[step * batch : (step + 1) * batch]), y[step * batch : (step + 1) * batch])
        opt.zero_grad()
        loss.backward()
        tower_norm = float(torch.nn.utils.clip_grad_norm_(net.tower.parameters(), float("inf")))
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (step + 1) % log == 0 or step + 1 == steps:
            net.eval()
            with torch.no_grad():
                _, accuracy = loss_and_accuracy(net(x_test), y_test)
            net.train()
            record = {"step": step + 1, "loss": round(loss.item(), 4), "tower_grad_norm": round(tower_norm, 4)}
            records.append({**record, "accuracy": round(accuracy, 4), "seconds": round(time.time() - t0, 1)})
            if echo:
                print(records[-1], flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", choices=["fiore", "bart", "fc1", "zero-bias", "cnn"], default="fiore")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--readout", choices=["pooled", "tokens"], default="pooled")
    ap.add_argument("--target", choices=list(TARGETS), default="background")
    ap.add_argument("--log", type=int, default=50)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    np.random.seed(0)
    options = {"seed": args.seed, "log": args.log, "readout": args.readout, "target": args.target}
    run(args.steps, args.lr, args.init, args.batch, **options)


if __name__ == "__main__":
    main()
