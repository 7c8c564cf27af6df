"""Small-object detection with and without tiling (fiore.tiling), on large synthetic canvases made for it.

Each canvas is a grid x grid mosaic of ordinary synthetic scenes (held-out seed 5000), every scene resized to
`--scene` pixels: the objects keep the size they have in an ordinary scene relative to its tile of the mosaic, and so
become small in the whole canvas (a 4x4 mosaic squashed to the tiny model's 256 pixels shows each scene at 64).
The same od request is answered three ways, and scored by COCO (pycocotools) against the mosaics' exact boxes:

    scenes   every scene on its own, at --scene pixels (what the model does where objects are not small: the ceiling)
    whole    the mosaic, squashed to the model's input as Florence-2 does
    tiled    the mosaic with --tile (native-resolution tiles + the whole image, class-aware NMS)

    python benchmarks/tile_recall.py [--model DIR] [--n 12] [--grid 4] [--scene 256]
"""

from __future__ import annotations

import argparse
import time

from PIL import Image

import fiore
from fiore.data.synthetic import make_sample
from fiore.eval.metrics import coco_map
from fiore.eval.scorers import detections
from fiore.request import Request
from fiore.results import Boxes
from fiore.tiling import Tiling, predict_tiled, tile_windows

SEED = 5000


def scene(index: int, side: int) -> tuple[Image.Image, Boxes]:
    """Synthetic scene `index` of the held-out seed resized to side x side, with its boxes scaled to match."""
    s = make_sample(SEED, index)
    sx, sy = side / s.width, side / s.height
    boxes = [[o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy] for o in s.objects]
    return s.image.resize((side, side), Image.BICUBIC), Boxes(boxes, [o.label for o in s.objects])


def mosaic(index: int, grid: int, side: int) -> tuple[Image.Image, Boxes, list[tuple[Image.Image, Boxes]]]:
    """Canvas `index`: grid x grid scenes -> (canvas, its boxes, the scenes on their own)."""
    canvas = Image.new("RGB", (grid * side, grid * side))
    parts, boxes, labels = [], [], []
    for k in range(grid * grid):
        image, truth = scene(index * grid * grid + k, side)
        dx, dy = (k % grid) * side, (k // grid) * side
        canvas.paste(image, (dx, dy))
        boxes += [[b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy] for b in truth.boxes]
        labels += truth.labels
        parts.append((image, truth))
    return canvas, Boxes(boxes, labels), parts


def score(pairs) -> dict[str, float]:
    """[(truth Boxes, predicted Boxes, (width, height))] -> COCO mAP50 and AR100."""
    gts = [detections(t) for t, _, _ in pairs]
    preds = [detections(p) for _, p, _ in pairs]
    stats = coco_map(gts, preds, [size for _, _, size in pairs])
    return {"mAP50": stats["mAP50"], "AR100": stats["AR100"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--n", type=int, default=12, help="canvases")
    ap.add_argument("--grid", type=int, default=4, help="scenes per side of a canvas")
    ap.add_argument("--scene", type=int, default=256, help="pixels per scene")
    ap.add_argument("--overlap", type=float, default=0.25)
    args = ap.parse_args()

    florence = fiore.load(args.model)
    predictor = florence.predictor()
    request = [Request.make("od")]
    tiling = Tiling(overlap=args.overlap)
    rows: dict[str, list] = {"scenes": [], "whole": [], "tiled": []}
    seconds = dict.fromkeys(rows, 0.0)
    for i in range(args.n):
        canvas, truth, parts = mosaic(i, args.grid, args.scene)
        t = time.perf_counter()
        for image, scene_truth in parts:
            predictor.set_images([image])
            rows["scenes"].append((scene_truth, predictor.predict([request])[0][0], image.size))
        seconds["scenes"] += time.perf_counter() - t
        t = time.perf_counter()
        predictor.set_images([canvas])
        rows["whole"].append((truth, predictor.predict([request])[0][0], canvas.size))
        seconds["whole"] += time.perf_counter() - t
        t = time.perf_counter()
        rows["tiled"].append((truth, predict_tiled(predictor, canvas, request, tiling)[0], canvas.size))
        seconds["tiled"] += time.perf_counter() - t
    side = args.grid * args.scene
    tiles = len(tile_windows(side, side, max(florence.config.image_size), args.overlap))
    objects = sum(len(t.boxes) for t, _, _ in rows["whole"])
    print(f"{args.n} canvases of {args.grid}x{args.grid} scenes ({side}x{side} px, {objects} objects), seed {SEED}, "
          f"model input {florence.config.image_size[0]} px, {tiles} tiles + the whole image per canvas")  # fmt: skip
    print("| od on | mAP50 | AR100 | s per canvas |")
    print("|---|---:|---:|---:|")
    for name, pairs in rows.items():
        s = score(pairs)
        print(f"| {name} | {s['mAP50']:.4f} | {s['AR100']:.4f} | {seconds[name] / args.n:.2f} |")


if __name__ == "__main__":
    main()
