"""Write `Sample`s in the dataset layout `fiore eval --data` reads (docs/data.md):

    DIR/images/*.png   DIR/instances.json (COCO instances)   DIR/captions.json (COCO captions)
    DIR/refs.json (RefCOCO-style refs)   DIR/fiore.jsonl (everything COCO has no place for, one line per image)

Coordinates are pixels (COCO boxes [x, y, w, h]; everything else x1, y1, x2, y2 / flat rings / quads), rounded to
hundredths of a pixel.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from fiore.data.sample import Object, Sample

_DIGITS = 2


def _r(values) -> list[float]:
    return [round(float(v), _DIGITS) for v in values]


def _area(o: Object) -> float:
    if "area" in o.attributes:
        return float(o.attributes["area"])
    total = 0.0
    for ring in o.polygons:
        xs, ys = ring[::2], ring[1::2]
        total += abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
    if total == 0.0:
        x1, y1, x2, y2 = o.box
        total = (x2 - x1) * (y2 - y1)
    return round(total, _DIGITS)


def _image_file(sample: Sample, images: Path, prefix: str) -> str:
    """Save (or copy) the sample's image into `images`; returns the file name."""
    stem = f"{prefix}{sample.image_id:07d}" if isinstance(sample.image_id, int) else f"{prefix}{sample.image_id}"
    if sample.image is not None:
        name = stem + ".png"
        # Level 1: PNG stays lossless; higher levels cost several times the generation time for ~10% smaller files.
        sample.image.save(images / name, compress_level=1)
        return name
    if sample.image_path is None:
        raise ValueError(f"sample {sample.image_id!r} has neither an image nor an image_path")
    src = Path(sample.image_path)
    name = stem + src.suffix.lower()
    shutil.copyfile(src, images / name)
    return name


def write_samples(
    out_dir: str | Path, samples: Iterable[Sample], file_prefix: str = "", categories: Iterable[str] = ()
) -> Path:
    """Write `samples` into `out_dir` (created; existing dataset files are replaced). Returns out_dir.

    categories: category names to number first (ids from 1, in this order), so datasets written separately share
    ids; labels not listed get the next ids in order of appearance.
    """
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    cat_ids: dict[str, int] = {}
    for name in categories:
        cat_ids.setdefault(name, len(cat_ids) + 1)
    coco_images, annotations, caption_anns, refs = [], [], [], []
    seen: set = set()
    with open(out / "fiore.jsonl", "w", encoding="utf-8") as jsonl:
        for s in samples:
            if s.image_id in seen:
                raise ValueError(f"duplicate image_id {s.image_id!r}")
            seen.add(s.image_id)
            file_name = _image_file(s, images, file_prefix)
            coco_images.append({"id": s.image_id, "file_name": file_name, "width": s.width, "height": s.height})
            ann_ids = []
            for o in s.objects:
                ann_id = len(annotations) + 1
                ann_ids.append(ann_id)
                x1, y1, x2, y2 = o.box
                ann = {
                    "id": ann_id,
                    "image_id": s.image_id,
                    "category_id": cat_ids.setdefault(o.label, len(cat_ids) + 1),
                    "bbox": _r((x1, y1, x2 - x1, y2 - y1)),
                    "area": _area(o),
                    "iscrowd": int(o.attributes.get("iscrowd", 0)),
                    "segmentation": o.rle if o.rle is not None else [_r(ring) for ring in o.polygons],
                }
                if o.rle is not None and o.polygons:
                    ann["polygons"] = [_r(ring) for ring in o.polygons]  # fiore extra: both forms
                attributes = {k: v for k, v in o.attributes.items() if k != "iscrowd"}
                if attributes:
                    ann["attributes"] = attributes
                annotations.append(ann)
            for caption in s.reference_captions or ([s.captions["caption"]] if "caption" in s.captions else []):
                caption_anns.append({"id": len(caption_anns) + 1, "image_id": s.image_id, "caption": caption})
            by_object: dict[int, list[str]] = {}
            for ref in s.refs:
                if not 0 <= ref.object_index < len(s.objects):
                    raise ValueError(f"image {s.image_id!r}: ref {ref.expression!r} names missing object")
                by_object.setdefault(ref.object_index, []).append(ref.expression)
            for index, sentences in by_object.items():
                refs.append(
                    {
                        "ref_id": len(refs) + 1,
                        "image_id": s.image_id,
                        "ann_id": ann_ids[index],
                        "category_id": annotations[ann_ids[index] - 1]["category_id"],
                        "file_name": file_name,
                        "sentences": [{"sent": t, "raw": t, "tokens": t.split()} for t in sentences],
                    }
                )
            record = {
                "image_id": s.image_id,
                "file_name": file_name,
                "width": s.width,
                "height": s.height,
                "captions": s.captions,
                "texts": [{"text": t.text, "quad": _r(t.quad), "box": _r(t.box)} for t in s.texts],
                "qas": [
                    {"question": q.question, "answer": q.answer, "answers": q.answers, "kind": q.kind} for q in s.qas
                ],
                "label": s.label,
                "groundings": [
                    {
                        "caption": g.caption,
                        "phrases": [{"phrase": p, "boxes": [_r(b) for b in boxes]} for p, boxes in g.phrases],
                    }
                    for g in s.groundings
                ],
                "vocabulary": s.vocabulary,
                "descriptions": {
                    str(a): o.description for a, o in zip(ann_ids, s.objects, strict=True) if o.description
                },
            }
            jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
    categories_json = [{"id": i, "name": n, "supercategory": "object"} for n, i in cat_ids.items()]
    _dump(out / "instances.json", {"images": coco_images, "annotations": annotations, "categories": categories_json})
    _dump(out / "captions.json", {"images": coco_images, "annotations": caption_anns})
    _dump(out / "refs.json", refs)
    return out


def _dump(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
