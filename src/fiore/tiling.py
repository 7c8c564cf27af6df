"""Tiled inference for large or odd-aspect images.

Florence-2 squashes every image to its input size (768x768 for base), so on a 4000-pixel-wide photo a 40-pixel
object shrinks to 8 pixels and is lost. With a `Tiling`, an image larger than a tile is also cut into overlapping
tiles at native resolution (a tile side defaults to the model's input side, so a tile is not resized); the tileable
tasks (`Task.tileable`: od, dense_region_caption, region_proposal, open_vocabulary_detection, ocr_with_region) run
on the whole image and on every tile, and their instances are mapped back to image pixels and merged:

1. an instance a tile found cut by one of the tile's inner edges (an edge inside the image) is dropped: the
   neighbouring tile, which overlaps it, or the whole image holds that object whole;
2. the rest go through class-aware non-maximum suppression (`supervision.box_non_max_suppression`, on each
   instance's axis-aligned box, labels as classes, best score first): one instance per object.

Other tasks in the same call (captions, region tasks, ...) are answered on the whole image only. Every crop is one
more image for the vision tower, so a 4000x3000 photo with base's 768-pixel tiles at the default overlap costs
1 + 6x5 encodings and decodings.

    from fiore.tiling import Tiling, predict_tiled
    results = predict_tiled(florence.predictor(), image, [Request.make("od")], Tiling())

Needs supervision (`pip install 'fiore[tile]'`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from fiore import tasks
from fiore.extras import require
from fiore.request import Request
from fiore.results import INSTANCE_FIELD, Boxes, Instance, Mixed, Polygons, Quads, Result, concat_instances

TILEABLE = [name for name in tasks.names() if tasks.get(name).tileable]


def check_tileable(task) -> None:
    """Refuse (ValueError) a task whose answer tiles cannot find separately, naming the ones they can."""
    if not task.tileable:
        raise ValueError(f"task {task.name} cannot be tiled; tileable tasks: {', '.join(TILEABLE)}")


Window = tuple[int, int, int, int]  # x1, y1, x2, y2 in image pixels


@dataclass(frozen=True)
class Tiling:
    """How to tile: `size` the tile side in image pixels (None: the model's input side, native resolution),
    `overlap` the fraction of a tile shared with its neighbour, `iou` the class-aware NMS threshold."""

    size: int | None = None
    overlap: float = 0.25
    iou: float = 0.5

    def __post_init__(self):
        if self.size is not None and self.size < 32:
            raise ValueError(f"a tile side must be >= 32 pixels, got {self.size}")
        if not 0.0 <= self.overlap < 0.9:
            raise ValueError(f"tile overlap must be in [0, 0.9), got {self.overlap}")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"the NMS IoU threshold must be in (0, 1], got {self.iou}")


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Where the tiles along one axis begin: every `stride` pixels, the last one flush with the far edge."""
    if length <= size:
        return [0]
    return sorted({*range(0, length - size, stride), length - size})


def tile_windows(width: int, height: int, size: int, overlap: float) -> list[Window]:
    """The tiles of a width x height image: size x size windows (narrower where the image is), neighbours sharing
    `overlap` of a tile, covering every pixel; [] when the image fits in one tile."""
    if width <= size and height <= size:
        return []
    stride = max(1, round(size * (1.0 - overlap)))
    return [
        (x, y, min(x + size, width), min(y + size, height))
        for y in _starts(height, size, stride)
        for x in _starts(width, size, stride)
    ]


# ---- mapping a tile's answer to image pixels ----------------------------------------------------------------


def _shift_flat(values: Sequence[float], dx: float, dy: float) -> list[float]:
    return [float(v) + (dx if i % 2 == 0 else dy) for i, v in enumerate(values)]


def shift(result: Result, dx: float, dy: float) -> Result:
    """The same result with every coordinate moved by (dx, dy): a tile's answer in the pixels of the image."""
    if isinstance(result, Boxes):
        return dataclasses.replace(result, boxes=[_shift_flat(b, dx, dy) for b in result.boxes])
    if isinstance(result, Quads):
        return dataclasses.replace(result, quads=[_shift_flat(q, dx, dy) for q in result.quads])
    if isinstance(result, Polygons):
        rings = [[_shift_flat(r, dx, dy) for r in inst] for inst in result.polygons]
        return dataclasses.replace(result, polygons=rings)
    if isinstance(result, Mixed):
        return dataclasses.replace(result, boxes=shift(result.boxes, dx, dy), polygons=shift(result.polygons, dx, dy))
    raise TypeError(f"a {type(result).__name__} result has no coordinates to tile")


def _subset(result: Result, keep: Sequence[bool]) -> Result:
    """`result` with only the instances where `keep` is true (labels and scores follow)."""
    if isinstance(result, Mixed):
        n = len(result.boxes)
        return dataclasses.replace(
            result, boxes=_subset(result.boxes, keep[:n]), polygons=_subset(result.polygons, keep[n:])
        )
    name = INSTANCE_FIELD[type(result)]
    pick = [i for i, k in enumerate(keep) if k]
    values = getattr(result, name)
    labels = [result.labels[i] if i < len(result.labels) else "" for i in pick]
    scores = None if result.scores is None else [result.scores[i] for i in pick]
    return dataclasses.replace(result, **{name: [values[i] for i in pick]}, labels=labels, scores=scores)


def cut_by_inner_edge(instance: Instance, window: Window, image_size: tuple[int, int], margin: float) -> bool:
    """Does a tile's instance (in tile pixels) touch an edge of the tile that lies inside the image?"""
    x1, y1, x2, y2 = instance.bbox()
    wx1, wy1, wx2, wy2 = window
    width, height = image_size
    return (
        (wx1 > 0 and x1 <= margin)
        or (wy1 > 0 and y1 <= margin)
        or (wx2 < width and x2 >= (wx2 - wx1) - margin)
        or (wy2 < height and y2 >= (wy2 - wy1) - margin)
    )


def nms(result: Result, iou: float) -> Result:
    """Class-aware non-maximum suppression over a result's instances (their axis-aligned boxes, labels as classes;
    supervision's implementation). Unscored instances count as score 0."""
    import numpy as np

    with warnings.catch_warnings():  # its OpenCV notice concerns drawing; NMS is plain numpy
        warnings.filterwarnings("ignore", message=".*OpenCV", category=UserWarning)
        import supervision as sv

    instances = result.instances()
    if len(instances) < 2:
        return result
    classes = {label: k for k, label in enumerate(dict.fromkeys(i.label for i in instances))}
    rows = [[*i.bbox(), 0.0 if i.score is None else i.score, classes[i.label]] for i in instances]
    keep = sv.box_non_max_suppression(np.asarray(rows, dtype=np.float64), iou_threshold=iou)
    return _subset(result, [bool(k) for k in keep])


def merge(whole: Result, tiles: list[tuple[Window, Result]], image_size: tuple[int, int], iou: float) -> Result:
    """The whole image's answer and its tiles' answers (each in tile pixels) -> one answer in image pixels."""
    parts = [whole]
    for window, result in tiles:
        margin = 2.0 * max(window[2] - window[0], window[3] - window[1]) / 1000 + 1.0  # two location bins
        inside = [not cut_by_inner_edge(i, window, image_size, margin) for i in result.instances()]
        parts.append(shift(_subset(result, inside), window[0], window[1]))
    merged = nms(concat_instances(parts), iou)
    scores = [p.score for p in [whole] + [r for _, r in tiles] if p.score is not None]
    warnings = list(whole.warnings) + [f"tile {w[:2]}: {m}" for w, r in tiles for m in r.warnings]
    return dataclasses.replace(
        merged,
        truncated=whole.truncated or any(r.truncated for _, r in tiles),
        score=sum(scores) / len(scores) if scores else None,
        warnings=warnings,
    )


def predict_tiled(predictor, image, requests: Sequence[Request], tiling: Tiling) -> list[Result]:
    """Answer `requests` on one image (PIL), tiling it for the tileable ones (module docstring): one Result per
    request, in order, coordinates in the image's pixels. Sets the predictor's images to the image and its tiles."""
    require(["supervision"], "tiled inference")
    size = tiling.size or max(predictor.florence.config.image_size)
    windows = tile_windows(image.width, image.height, size, tiling.overlap)
    tiled = [k for k, r in enumerate(requests) if r.task.tileable]
    if not windows or not tiled:
        predictor.set_images([image])
        return predictor.predict([list(requests)])[0]
    predictor.set_images([image, *(image.crop(w) for w in windows)])
    answers = predictor.predict([list(requests)] + [[requests[k] for k in tiled]] * len(windows))
    out = list(answers[0])
    for j, k in enumerate(tiled):
        tiles = [(w, answers[1 + t][j]) for t, w in enumerate(windows)]
        out[k] = merge(answers[0][k], tiles, image.size, tiling.iou)
    return out


__all__ = ["TILEABLE", "Tiling", "check_tileable", "merge", "nms", "predict_tiled", "shift", "tile_windows"]
