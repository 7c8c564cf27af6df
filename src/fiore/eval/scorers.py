"""Task-aware scorers: each collects (sample, example, prediction) triples for one task and turns them into the
task's metrics by calling `fiore.eval.metrics`. Results are read through `Result.instances()` and
`Result.as_text()`. Each `fiore.tasks.Task` names its scorer class (`Task.scorer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fiore.eval import metrics as M
from fiore.results import Phrases, Result


def detections(result: Result | None, label_override: str | None = None) -> M.Detections:
    """The located instances of a result (`Result.instances()`) as metric `Detections`: boxes as they are,
    polygons and quads with the box around them (a polygon without any point is dropped). An instance without a
    confidence takes the sequence score, then 1.0 (ties keep generation order)."""
    if result is None:
        return M.Detections([], [])
    fallback = 1.0 if result.score is None else float(result.score)
    instances = result.instances()
    boxes, labels, scores, rings = [], [], [], []
    for inst in instances:
        if inst.kind == "box":
            box, shape = tuple(inst.coords), []
        else:
            shape = inst.coords if inst.kind == "polygon" else [inst.coords]
            box = M.polygons_box(shape)
            if box is None:
                continue
        boxes.append(box)
        labels.append(label_override or inst.label)
        scores.append(fallback if inst.score is None else inst.score)
        rings.append(shape)
    has_shapes = any(inst.kind != "box" for inst in instances)
    return M.Detections(boxes, labels, scores, rings if has_shapes else None)


def text_of(result: Result | None) -> str | None:
    """The text of a text answer (`Result.as_text()`), None for no result or a located one."""
    return None if result is None else result.as_text()


def polygons_of(result: Any) -> list[list[float]]:
    """All rings of a mask-shaped result as one union (referring segmentation); boxes become rectangles."""
    d = detections(result)
    rings: list[list[float]] = []
    for i, (x1, y1, x2, y2) in enumerate(d.boxes):
        inst = d.polygons[i] if d.polygons is not None else []
        rings += [list(r) for r in inst] if any(len(r) >= 6 for r in inst) else [[x1, y1, x2, y1, x2, y2, x1, y2]]
    return rings


def _first_box(result: Any):
    d = detections(result)
    if not d.boxes:
        return None
    best = max(range(len(d.boxes)), key=lambda i: d.scores[i])  # stable: ties keep the first generated
    return d.boxes[best]


class Scorer:
    """Collects examples of one task. `add` is called once per example with its (shared) prediction."""

    headline: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # optional modules the metrics import (fiore.extras)

    def __init__(self, java: bool = False):
        self.java = java
        self.n = 0

    def add(self, sample, example, prediction) -> None:
        self.n += 1
        self._add(sample, example, prediction)

    def _add(self, sample, example, prediction) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float | str]:
        raise NotImplementedError


class DetectionScorer(Scorer):
    """COCO bbox mAP; each example is one COCO "image" (an image, or an image + text query for open vocabulary).
    With text queries whose targets are single boxes (referring expressions) it adds acc@0.5 of the top box."""

    headline = ("mAP", "mAP50")
    requires = ("pycocotools",)
    iou_type = "bbox"
    class_agnostic = False

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.gts, self.preds, self.sizes, self.top, self.single = [], [], [], [], []

    def _add(self, sample, example, prediction):
        gt = detections(example.target, "object" if self.class_agnostic else None)
        self.gts.append(gt)
        self.preds.append(detections(prediction, "object" if self.class_agnostic else None))
        self.sizes.append(sample.size)
        self.single.append(getattr(example, "text", None) is not None and len(gt.boxes) == 1)
        self.top.append((_first_box(prediction), gt.boxes[0] if gt.boxes else None))

    def compute(self):
        out: dict[str, float | str] = dict(M.coco_map(self.gts, self.preds, self.sizes, self.iou_type))
        if self.single and all(self.single):
            out["acc@0.5"] = M.box_accuracy([p for p, _ in self.top], [g for _, g in self.top])
        return out


class ProposalScorer(DetectionScorer):
    """Region proposals: class-agnostic COCO mAP / AR."""

    headline = ("mAP", "AR100")
    class_agnostic = True


class SegmentationScorer(DetectionScorer):
    """Mask mAP (instance segmentation), polygons rasterised to RLE."""

    iou_type = "segm"


class ReferringSegmentationScorer(Scorer):
    """Referring / region segmentation: mIoU, cIoU, and acc@0.5 of the boxes around predicted and true masks."""

    headline = ("mIoU", "cIoU")
    requires = ("pycocotools",)

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.preds, self.gts, self.sizes = [], [], []

    def _add(self, sample, example, prediction):
        self.preds.append(polygons_of(prediction))
        self.gts.append(polygons_of(example.target))
        self.sizes.append(sample.size)

    def compute(self):
        out: dict[str, float | str] = dict(M.segmentation_iou(self.preds, self.gts, self.sizes))
        boxes = [(M.polygons_box(p), M.polygons_box(g)) for p, g in zip(self.preds, self.gts, strict=True)]
        boxes = [(p, g) for p, g in boxes if g is not None]
        out["acc@0.5"] = M.box_accuracy([p for p, _ in boxes], [g for _, g in boxes])
        return out


class CaptionScorer(Scorer):
    """CIDEr / BLEU over predictions; examples sharing an input (several reference captions) form one item."""

    headline = ("CIDEr", "BLEU-4")
    requires = ("pycocoevalcap",)

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.items: dict[Any, tuple[str, list[str]]] = {}

    def _add(self, sample, example, prediction):
        key = (sample.image_id, getattr(example, "text", None), _region_key(example))
        pred, refs = self.items.setdefault(key, (text_of(prediction) or "", []))
        refs.append(text_of(example.target) or "")

    def compute(self):
        preds = [p for p, _ in self.items.values()]
        refs = [r for _, r in self.items.values()]
        return M.caption_metrics(preds, refs, java=self.java)


class GroundingScorer(Scorer):
    headline = ("recall@1", "acc@0.5")

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.preds, self.gts = [], []

    @staticmethod
    def _pairs(result):
        if isinstance(result, Phrases):  # a phrase may have no box: it still counts as a phrase asked
            return [(p, [tuple(b) for b in g]) for p, g in zip(result.phrases, result.boxes, strict=True)]
        d = detections(result)  # other located results: boxes grouped by label
        groups: dict[str, list] = {}
        for b, lab in zip(d.boxes, d.labels, strict=True):
            groups.setdefault(lab, []).append(b)
        return list(groups.items())

    def _add(self, sample, example, prediction):
        self.preds.append(self._pairs(prediction))
        self.gts.append(self._pairs(example.target))

    def compute(self):
        return M.grounding_recall(self.preds, self.gts)


class OCRScorer(Scorer):
    headline = ("exact_match", "CER")

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.preds, self.refs = [], []

    def _add(self, sample, example, prediction):
        self.preds.append(text_of(prediction) or "")
        self.refs.append(text_of(example.target) or "")

    def compute(self):
        out: dict[str, float | str] = dict(M.ocr_metrics(self.preds, self.refs))
        return out


class OCRRegionScorer(Scorer):
    headline = ("F1",)

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.preds, self.gts, self.sizes = [], [], []

    @staticmethod
    def _lines(result):
        if result is None:
            return []
        return [(inst.coords, inst.label) for inst in result.instances() if inst.kind == "quad"]

    def _add(self, sample, example, prediction):
        self.preds.append(self._lines(prediction))
        self.gts.append(self._lines(example.target))
        self.sizes.append(sample.size)

    def compute(self):
        return dict(M.ocr_region_f1(self.preds, self.gts, self.sizes))


class VQAScorer(Scorer):
    """VQAv2 accuracy; all annotator answers come from the sample's QA with the example's question."""

    headline = ("accuracy",)

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.preds, self.answers = [], []

    def _add(self, sample, example, prediction):
        answer = text_of(example.target) or ""
        answers = [answer]
        for qa in getattr(sample, "qas", []):
            if qa.question == getattr(example, "text", None) and qa.answer == answer and qa.answers:
                answers = list(qa.answers)
                break
        self.preds.append(text_of(prediction) or "")
        self.answers.append(answers)

    def compute(self):
        return {"accuracy": M.vqa_accuracy(self.preds, self.answers)}


class Top1Scorer(Scorer):
    headline = ("top1",)

    def __init__(self, java: bool = False):
        super().__init__(java)
        self.preds, self.labels = [], []

    def _add(self, sample, example, prediction):
        self.preds.append(text_of(prediction))
        self.labels.append(text_of(example.target) or "")

    def compute(self):
        return {"top1": M.top1_accuracy(self.preds, self.labels)}


def _region_key(example) -> tuple | None:
    region = getattr(example, "region", None)
    return None if region is None else tuple(round(float(v), 3) for v in region)


def required_modules(tasks: Iterable) -> list[str]:
    """The optional modules the metrics of these tasks (`fiore.tasks.Task`) import, to check before any model runs."""
    return list(dict.fromkeys(m for task in tasks if task.scorer is not None for m in task.scorer.requires))
