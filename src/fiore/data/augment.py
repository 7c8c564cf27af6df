"""Training augmentations: `[data] augment = ["color", "crop"]`. Each takes a Sample and a seeded RNG and returns a
new Sample; an augmentation that moves pixels moves every target with them (boxes, polygons, text quads,
grounding boxes), so the loc tokens the model learns still point at the right pixels.

- color: brightness, contrast and saturation each scaled by a factor in [0.75, 1.25]; nothing moves.
- crop:  a random crop keeping every annotated region whole (each side 60-100% of the image, never cutting
         an annotation); coordinates shift with it. Samples carrying raw Florence-2 pairs are left as they are:
         their loc tokens are quantized text, not coordinates fiore can move.

Not offered: horizontal flips. They mirror text (OCR targets) and swap "left"/"right" in captions, referring
expressions and answers, so the targets would no longer be true of the image.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

from PIL import ImageEnhance

from fiore.data.sample import Sample


def color(sample: Sample, image, rng: random.Random):
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.75, 1.25))
    return sample, image


def _extent(sample: Sample) -> tuple[float, float, float, float] | None:
    """The box around every coordinate any target uses."""
    xs, ys = [], []
    for o in sample.objects:
        xs += [o.box[0], o.box[2]]
        ys += [o.box[1], o.box[3]]
        for ring in o.polygons:
            xs += ring[0::2]
            ys += ring[1::2]
    for t in sample.texts:
        xs += list(t.quad[0::2]) + [t.box[0], t.box[2]]
        ys += list(t.quad[1::2]) + [t.box[1], t.box[3]]
    for g in sample.groundings:
        for _, boxes in g.phrases:
            for b in boxes:
                xs += [b[0], b[2]]
                ys += [b[1], b[3]]
    return (min(xs), min(ys), max(xs), max(ys)) if xs else None


def _shift(values, dx: float, dy: float) -> list[float]:
    return [v - (dx if i % 2 == 0 else dy) for i, v in enumerate(values)]


def crop(sample: Sample, image, rng: random.Random):
    if sample.pairs:
        return sample, image
    W, H = image.size
    extent = _extent(sample) or (W / 2, H / 2, W / 2, H / 2)
    ex1, ey1, ex2, ey2 = (max(0.0, extent[0]), max(0.0, extent[1]), min(W, extent[2]), min(H, extent[3]))
    cw = max(ex2 - ex1, rng.uniform(0.6, 1.0) * W)
    ch = max(ey2 - ey1, rng.uniform(0.6, 1.0) * H)
    x0 = int(rng.uniform(max(0.0, ex2 - cw), min(ex1, W - cw)))
    y0 = int(rng.uniform(max(0.0, ey2 - ch), min(ey1, H - ch)))
    x1, y1 = min(W, max(x0 + round(cw), math.ceil(ex2))), min(H, max(y0 + round(ch), math.ceil(ey2)))
    if (x0, y0, x1, y1) == (0, 0, W, H):
        return sample, image
    out = copy.deepcopy(sample, {id(sample.image): None})  # never copy the pixels
    out.image, out.width, out.height = None, x1 - x0, y1 - y0
    for o in out.objects:
        o.box = tuple(_shift(o.box, x0, y0))
        o.polygons = [_shift(ring, x0, y0) for ring in o.polygons]
        o.rle = None  # a mask of the uncropped image; the shifted polygons describe the same region
    for t in out.texts:
        t.quad, t.box = tuple(_shift(t.quad, x0, y0)), tuple(_shift(t.box, x0, y0))
    out.groundings = [
        type(g)(g.caption, [(p, [tuple(_shift(b, x0, y0)) for b in boxes]) for p, boxes in g.phrases])
        for g in out.groundings
    ]
    return out, image.crop((x0, y0, x1, y1))


AUGMENTATIONS: dict[str, Callable] = {"color": color, "crop": crop}


def augment(names: list[str], sample: Sample, image, rng: random.Random):
    """-> (sample, image) after each named augmentation in turn."""
    for name in names:
        sample, image = AUGMENTATIONS[name](sample, image, rng)
    return sample, image
