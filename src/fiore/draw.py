"""What a user does with a `Result` after predicting: draw it over the image, export it to COCO or supervision.

Every result type goes through one code path: its `instances()` (boxes, polygons, quads with label and score) and
`as_text()` (captions, OCR, answers, labels). Coordinates are pixels of the original image, x1, y1, x2, y2 (boxes)
or flat x, y rings (polygons, quads).
"""

from __future__ import annotations

import warnings
import zlib

from PIL import Image, ImageDraw, ImageFont

from fiore.results import Instance, Result

# Colour-blind friendly, high-contrast palette (Okabe-Ito + extras); a label always gets the same colour.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (255, 255, 255),
    (120, 200, 40),
    (255, 80, 80),
]


def _area_rings(inst: Instance) -> list[list[float]]:
    """The rings of a polygon or quad instance that can have an area (3+ points). Fewer read as a box to
    pycocotools and draw nothing in a mask, so exports leave them out (supervision's from_vlm does too)."""
    rings = inst.coords if inst.kind == "polygon" else [inst.coords]
    return [list(r) for r in rings if len(r) >= 6]


def _ring_area(ring: list[float]) -> float:
    xs, ys = ring[0::2], ring[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def colour(label: str) -> tuple[int, int, int]:
    # crc32, not hash(): the same label keeps its colour across processes.
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _caption(inst: Instance) -> str:
    if inst.score is None:
        return inst.label
    return f"{inst.label} {inst.score:.2f}".strip()


def plot(result: Result, image: Image.Image | None = None, *, line_width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with the result drawn: boxes, polygons, quads with `label score`, text in a banner.

    Without an image, draws on a grey canvas just large enough for the instances.
    """
    insts = result.instances()
    if image is None:
        xs = [i.bbox()[2] for i in insts] or [256]
        ys = [i.bbox()[3] for i in insts] or [256]
        size = (max(64, int(max(xs)) + 1), max(64, int(max(ys)) + 1))
        image = Image.new("RGB", tuple(int(v) for v in size), (96, 96, 96))
    canvas = image.convert("RGB").copy()
    W, H = canvas.size
    lw = line_width or max(2, round(max(W, H) / 250))
    font = _font(max(11, round(max(W, H) / 45)))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    draw = ImageDraw.Draw(canvas)
    for inst in insts:
        c = colour(inst.label)
        if inst.kind == "box":
            x1, y1, x2, y2 = inst.coords
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=c, width=lw)
        else:
            rings = inst.coords if inst.kind == "polygon" else [inst.coords]
            for ring in rings:
                pts = list(zip(ring[0::2], ring[1::2], strict=False))
                if len(pts) >= 3:
                    fill.polygon(pts, fill=c + (90,))
                    draw.line(pts + [pts[0]], fill=c, width=lw)
                elif pts:
                    draw.line(pts, fill=c, width=lw)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for inst in insts:  # labels last so no fill covers them
        text = _caption(inst)
        if not text:
            continue
        x1, y1, _, _ = inst.bbox()
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 4
        x = min(max(0, x1), max(0, W - tw))
        y = y1 - th if y1 - th >= 0 else y1
        draw.rectangle([x, y, x + tw, y + th], fill=colour(inst.label))
        draw.text((x + 2 - l, y + 2 - t), text, fill=(0, 0, 0), font=font)
    text = result.as_text()
    if text:
        banner = text if result.score is None else f"{text}  ({float(result.score):.2f})"
        l, t, r, b = draw.textbbox((0, 0), banner, font=font)
        draw.rectangle([0, 0, min(W, r - l + 8), b - t + 8], fill=(0, 0, 0))
        draw.text((4 - l, 4 - t), banner, fill=(255, 255, 255), font=font)
    return canvas


def to_coco(result: Result, image_id: int | str, categories: dict[str, int] | None = None) -> list[dict]:
    """COCO result records for one image.

    Located results -> one detection record per instance: {"image_id", "category_id", "category_name", "bbox"
    [x, y, w, h], "area", "score", and "segmentation" (list of flat rings) for polygons and quads}.
    `categories` maps label -> id and is extended in place with ids from 1 for unseen labels, so one dict shared
    across images yields one consistent category list. Text results -> [{"image_id", "caption"}] (COCO captions).
    """
    categories = {} if categories is None else categories
    insts = result.instances()
    if not insts:
        text = result.as_text()
        return [{"image_id": image_id, "caption": text}] if text is not None else []
    records = []
    degenerate = 0
    for inst in insts:
        rings = []
        if inst.kind != "box":
            rings = _area_rings(inst)  # instances left with none are dropped (annToMask / segm COCOeval fail)
            if not rings:
                degenerate += 1
                continue
        if inst.label not in categories:
            categories[inst.label] = max(categories.values(), default=0) + 1
        x1, y1, x2, y2 = inst.bbox()
        rec = {
            "image_id": image_id,
            "category_id": categories[inst.label],
            "category_name": inst.label,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": inst.score,
        }
        if inst.kind == "box":
            rec["area"] = (x2 - x1) * (y2 - y1)
        else:
            rec["segmentation"] = rings
            rec["area"] = sum(_ring_area(r) for r in rings)
        records.append(rec)
    if degenerate:
        warnings.warn(f"image {image_id}: {degenerate} instance(s) left out of the COCO export: their polygons have "
                      "fewer than 3 points", stacklevel=2)  # fmt: skip
    return records


def _region_answer(result: Result, resolution_wh) -> Instance | None:
    """Region to category / description answers echo their region (`car<loc_52>...<loc_774>`): that box."""
    from fiore.tasks.locations import LOC_RE, tokens_to_points

    raw = getattr(result, "raw", None)
    label = result.as_text()
    if resolution_wh is None or not isinstance(raw, str) or label is None:
        return None
    locs = [int(k) for k in LOC_RE.findall(raw)]
    if len(locs) != 4:
        return None
    score = None if result.score is None else float(result.score)
    return Instance("box", tokens_to_points(locs, resolution_wh), label, score)


def supervision_arrays(result: Result, resolution_wh: tuple[int, int] | None = None) -> dict:
    """The arrays `supervision.Detections` is built from: xyxy (n, 4) float32, confidence (n,) float32 (NaN where
    a score is missing), class_id (n,) int, data["class_name"] (n,) str (class ids follow first appearance); for
    polygon results mask (n, h, w) bool (needs `resolution_wh`), for quads data["xyxyxyxy"] (n, 4, 2), as
    supervision's own `Detections.from_vlm` makes them. Polygon rings of fewer than 3 points are left out (of the
    mask and the box), and instances left without any, as from_vlm does; with `resolution_wh`, region to category /
    description answers give their region's box."""
    import numpy as np

    insts = result.instances()
    if not insts and (region := _region_answer(result, resolution_wh)) is not None:
        insts = [region]
    insts = [Instance(i.kind, _area_rings(i), i.label, i.score) if i.kind == "polygon" else i for i in insts]
    insts = [i for i in insts if i.kind != "polygon" or i.coords]
    names: dict[str, int] = {}
    for inst in insts:
        names.setdefault(inst.label, len(names))
    arrays = {
        "xyxy": np.array([i.bbox() for i in insts], dtype=np.float32).reshape(-1, 4),
        "confidence": np.array([np.nan if i.score is None else i.score for i in insts], dtype=np.float32),
        "class_id": np.array([names[i.label] for i in insts], dtype=int),
        "data": {"class_name": np.array([i.label for i in insts], dtype=str)},
    }
    if insts and all(i.kind == "quad" for i in insts):
        arrays["data"]["xyxyxyxy"] = np.array([i.coords for i in insts], dtype=np.float32).reshape(-1, 4, 2)
    if insts and any(i.kind == "polygon" for i in insts):
        if resolution_wh is None:
            raise ValueError("polygon results need resolution_wh=(width, height) of the image for their masks")
        import supervision as sv

        w, h = (int(v) for v in resolution_wh)
        masks = np.zeros((len(insts), h, w), dtype=bool)
        for n, inst in enumerate(insts):
            for ring in inst.coords if inst.kind == "polygon" else []:
                points = np.asarray(ring, dtype=np.float32).reshape(-1, 2).astype(np.int32)
                masks[n] |= sv.polygon_to_mask(points, (w, h)).astype(bool)
        arrays["mask"] = masks
    return arrays


def to_supervision(result: Result, resolution_wh: tuple[int, int] | None = None):
    """A `supervision.Detections` (optional dependency: `pip install supervision`); `resolution_wh` = the image's
    (width, height), needed for polygon masks and region answers (as `Detections.from_vlm` needs it)."""
    try:
        import supervision as sv
    except ImportError:
        raise ImportError("to_supervision needs the optional package `supervision`: pip install supervision") from None
    return sv.Detections(**supervision_arrays(result, resolution_wh))


def summary(result: Result, limit: int = 6) -> str:
    """One line for a terminal table: the text, or `n x label score` for the first instances."""
    text = result.as_text()
    if text is not None:
        return text
    insts = result.instances()
    shown = ", ".join(_caption(i) or "?" for i in insts[:limit])
    more = f", … (+{len(insts) - limit})" if len(insts) > limit else ""
    return f"{len(insts)}: {shown}{more}" if insts else "nothing found"
