"""Read datasets into `Sample`s: COCO instances and captions, RefCOCO-style refs and fiore JSONL (docs/data.md).

`read_dataset(dir)` reads whatever of these a directory holds (what `fiore synth` writes, a plain COCO directory,
or any mix), joined on image id. Images stay on disk: samples carry `image_path` and load lazily.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fiore.data.sample import QA, Grounding, Object, PromptPair, Ref, Sample, TextItem


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file and the problem."""


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def _one(found: list[Path], what: str, root: Path) -> Path | None:
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise DatasetError(f"{root}: several {what} files ({names}); keep one or read them with read_coco")
    return found[0] if found else None


def _find(root: Path, name: str, pattern: str) -> Path | None:
    """DIR/name, else the single DIR/annotations/<pattern> (the official COCO layout)."""
    if (root / name).is_file():
        return root / name
    return _one(sorted((root / "annotations").glob(pattern)), pattern, root)


def _image_dir(root: Path, file_names: list[str]) -> Path:
    """The folder that holds the images: DIR/images, DIR, or a subfolder (e.g. val2017) holding the first one."""
    candidates = [root / "images", root] + sorted(p for p in root.iterdir() if p.is_dir())
    if not file_names:
        return candidates[0] if candidates[0].is_dir() else root
    for folder in candidates:
        if (folder / file_names[0]).is_file():
            return folder
    raise DatasetError(f"{root}: image {file_names[0]!r} not found in images/, the directory or its subfolders")


def _box(xywh, where: str) -> tuple[float, float, float, float]:
    if not isinstance(xywh, list | tuple) or len(xywh) != 4:
        raise DatasetError(f"{where}: bbox must be [x, y, w, h], got {xywh!r}")
    x, y, w, h = (float(v) for v in xywh)
    if w < 0 or h < 0:
        raise DatasetError(f"{where}: bbox has negative size {xywh!r}")
    return (x, y, x + w, y + h)


def _rle_polygons(rle: dict, where: str) -> tuple[dict, list[list[float]]]:
    """A COCO RLE (compressed or not) -> (compressed RLE with str counts, polygons of its mask)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise DatasetError(f"{where}: RLE segmentations need pycocotools (pip install 'fiore[eval]')") from None
    from fiore.data.render import mask_polygons

    h, w = rle["size"]
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, h, w)
    m = mask_utils.decode(rle).astype(bool)
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return {"size": [h, w], "counts": counts}, mask_polygons(m)


def _header_size(root: Path, file_name: str) -> tuple[int, int]:
    """(width, height) of an image from its header alone."""
    from PIL import Image

    with Image.open(_image_dir(root, [file_name]) / file_name) as im:
        return im.size


class _Builder:
    """Samples by image id, in first-seen order, with the annotation-id index refs and JSONL need."""

    def __init__(self):
        self.samples: dict[Any, Sample] = {}
        self.files: dict[Any, str] = {}
        self.ann_index: dict[int, tuple[Any, int]] = {}  # ann id -> (image id, object index)

    def image(self, image_id, file_name: str | None, width, height, where: str) -> Sample:
        s = self.samples.get(image_id)
        if s is None:
            if file_name is None:
                raise DatasetError(f"{where}: image {image_id!r} has no file_name")
            if width is None or height is None:
                raise DatasetError(f"{where}: image {image_id!r} has no width/height")
            s = self.samples[image_id] = Sample(
                image_id=image_id, width=int(width), height=int(height), origin=f"{where}: image {image_id!r}"
            )
            self.files[image_id] = file_name
        return s

    def get(self, image_id, where: str) -> Sample:
        try:
            return self.samples[image_id]
        except KeyError:
            raise DatasetError(f"{where}: unknown image_id {image_id!r}") from None


def _read_instances(path: Path, b: _Builder) -> None:
    data = _load_json(path)
    for key in ("images", "annotations"):
        if key not in data:
            raise DatasetError(f"{path}: not COCO instances (no {key!r})")
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    for im in data["images"]:
        b.image(im["id"], im.get("file_name"), im.get("width"), im.get("height"), str(path))
    for ann in data["annotations"]:
        where = f"{path}: annotation {ann.get('id')!r}"
        s = b.get(ann["image_id"], where)
        if ann.get("category_id") not in names:
            raise DatasetError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        attributes = dict(ann.get("attributes", {}))
        if ann.get("iscrowd", 0):
            attributes["iscrowd"] = 1
        seg = ann.get("segmentation", [])
        rle, polygons = None, []
        if isinstance(seg, dict):
            rle, polygons = _rle_polygons(seg, where)
            polygons = ann.get("polygons", polygons)
        elif seg:
            polygons = [[float(v) for v in ring] for ring in seg]
        obj = Object(box=_box(ann["bbox"], where), label=names[ann["category_id"]], polygons=polygons,
                     attributes=attributes, rle=rle, origin=where)  # fmt: skip
        b.ann_index[ann["id"]] = (s.image_id, len(s.objects))
        s.objects.append(obj)


def _read_captions(path: Path, b: _Builder) -> None:
    data = _load_json(path)
    if "annotations" not in data:
        raise DatasetError(f"{path}: not COCO captions (no 'annotations')")
    for im in data.get("images", []):
        b.image(im["id"], im.get("file_name"), im.get("width"), im.get("height"), str(path))
    refs: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        b.get(ann["image_id"], f"{path}: caption {ann.get('id')!r}")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    for image_id, captions in refs.items():
        s = b.samples[image_id]
        s.captions["caption"] = captions[0]
        s.reference_captions = captions if len(captions) > 1 else []


def _read_refs(path: Path, b: _Builder) -> None:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: refs must be a JSON list of {{ref_id, image_id, ann_id, sentences}}")
    for ref in data:
        where = f"{path}: ref {ref.get('ref_id')!r}"
        if ref.get("ann_id") not in b.ann_index:
            raise DatasetError(f"{where}: ann_id {ref.get('ann_id')!r} is not in the instances file")
        image_id, index = b.ann_index[ref["ann_id"]]
        s = b.get(image_id, where)
        for sent in ref.get("sentences", []):
            s.refs.append(Ref(sent.get("sent") or sent.get("raw", ""), index))


def _tuple(values, n: int, where: str) -> tuple[float, ...]:
    if len(values) != n:
        raise DatasetError(f"{where}: expected {n} numbers, got {values!r}")
    return tuple(float(v) for v in values)


def _jsonl_records(path: Path):
    """(where, record) for each non-blank line of a JSONL file; `where` is "path:line"."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e})") from None


def _read_jsonl(path: Path, b: _Builder, image_size) -> None:
    for where, r in _jsonl_records(path):
        if not isinstance(r, dict) or "image_id" not in r:
            raise DatasetError(f"{where}: no image_id")
        width, height = r.get("width"), r.get("height")
        if r["image_id"] not in b.samples and (width is None or height is None) and r.get("file_name"):
            width, height = image_size(r["file_name"])
        s = b.image(r["image_id"], r.get("file_name"), width, height, where)
        s.captions.update(r.get("captions", {}))
        s.texts += [
            TextItem(t["text"], _tuple(t["quad"], 8, where), _tuple(t["box"], 4, where)) for t in r.get("texts", [])
        ]
        s.qas += [QA(q["question"], q["answer"], q.get("answers", []), q.get("kind")) for q in r.get("qas", [])]
        if r.get("label") is not None:
            s.label = r["label"]
        s.groundings += [
            Grounding(g["caption"], [(p["phrase"], [_tuple(x, 4, where) for x in p["boxes"]]) for p in g["phrases"]])
            for g in r.get("groundings", [])
        ]
        s.vocabulary += r.get("vocabulary", [])
        for ann_id, text in r.get("descriptions", {}).items():
            image_id, index = b.ann_index.get(int(ann_id), (None, None))
            if image_id != s.image_id:
                raise DatasetError(f"{where}: description for ann_id {ann_id} of another image or none")
            s.objects[index].description = text


def read_dataset(directory: str | Path) -> list[Sample]:
    """Every sample of a dataset directory (docs/data.md), images left on disk (`image_path` set).

    Reads instances.json, captions.json, refs.json and fiore.jsonl where present (also the official COCO layout,
    annotations/instances_*.json and annotations/captions_*.json); at least one must be there.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    instances = _find(root, "instances.json", "instances_*.json")
    captions = _find(root, "captions.json", "captions_*.json")
    refs = root / "refs.json" if (root / "refs.json").is_file() else None
    jsonl = root / "fiore.jsonl" if (root / "fiore.jsonl").is_file() else None
    if not any((instances, captions, refs, jsonl)):
        raise DatasetError(f"{root}: no dataset files (instances.json, captions.json, refs.json or fiore.jsonl)")
    if refs and not instances:
        raise DatasetError(f"{refs}: refs need the instances file they point into (instances.json)")
    b = _Builder()
    if instances:
        _read_instances(instances, b)
    if captions:
        _read_captions(captions, b)
    if refs:
        _read_refs(refs, b)
    if jsonl:
        _read_jsonl(jsonl, b, lambda name: _header_size(root, name))
    folder = _image_dir(root, list(b.files.values()))
    for image_id, s in b.samples.items():
        s.image_path = str(folder / b.files[image_id])
    return list(b.samples.values())


_PREFIX_RE = re.compile(r"\s*(<[A-Za-z0-9_]+>)(.*)", re.DOTALL)


def read_florence2_jsonl(path: str | Path) -> list[Sample]:
    """The Florence-2 JSONL that Roboflow exports and maestro trains on: one line per (image, prompt, target),
    `{"image": "a.jpg", "prefix": "<OD>", "suffix": "car<loc_52>..."}`, images relative to the file's folder.

    `path` is the .jsonl file or a folder holding `annotations.jsonl`. Lines of one image join one Sample whose
    `pairs` keep each prompt/target exactly as written. Problems that concern one line (an unknown task token, an
    empty suffix, a missing image) do not stop reading: `fiore.data.check` reports them with file and line.
    """
    import fiore.tasks

    tokens = {t.token: t for t in fiore.tasks.all()}
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.jsonl"
    if not path.is_file():
        raise DatasetError(f"{path}: no such Florence-2 JSONL file")
    samples: dict[str, Sample] = {}
    for where, r in _jsonl_records(path):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("image", "prefix", "suffix")):
            raise DatasetError(f"{where}: a Florence-2 JSONL line needs string fields image, prefix and suffix")
        match = _PREFIX_RE.fullmatch(r["prefix"])
        token, text = (match.group(1), match.group(2)) if match else ("", r["prefix"])
        task = tokens.get(token)
        s = samples.get(r["image"])
        if s is None:
            image_path = path.parent / r["image"]
            try:
                width, height = _header_size(image_path.parent, image_path.name)
            except (OSError, DatasetError):
                width = height = 0  # reported by the data check as a missing or unreadable image
            s = samples[r["image"]] = Sample(
                image_id=r["image"], width=width, height=height, image_path=str(image_path), origin=where
            )
        s.pairs.append(PromptPair(task.name if task else token, text, r["suffix"], origin=where))
    return list(samples.values())


def read_coco(instances: str | Path, images: str | Path, captions: str | Path | None = None) -> list[Sample]:
    """A COCO instances file (+ optional captions file) whose file_names live in the folder `images`."""
    b = _Builder()
    _read_instances(Path(instances), b)
    if captions is not None:
        _read_captions(Path(captions), b)
    for image_id, s in b.samples.items():
        s.image_path = str(Path(images) / b.files[image_id])
    return list(b.samples.values())
