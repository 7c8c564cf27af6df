"""Task-aware scorers: each collects (sample, example, prediction) triples for one task and turns them into the
task's metrics by calling `fiore.eval.metrics`. Results are read by their fields (duck typing on `fiore.results`),
so scorers work on any Result-shaped object.

Which scorer a task gets is data (`SCORERS`); a task missing from the table is scored by the type of its target.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fiore.eval import metrics as M


def _scores(result: Any, n: int) -> list[float]:
    s = getattr(result, "scores", None)
    if s is None or len(s) != n:
        # No per-instance confidences: fall back to the sequence score, then 1.0 (ties keep generation order).
        seq = getattr(result, "score", None)
        return [float(seq) if seq is not None else 1.0] * n
    return [float(x) for x in s]


def detections(result: Any, label_override: str | None = None) -> M.Detections:
    """Any box- or mask-shaped Result (Boxes, Polygons, Mixed, Phrases) as metric `Detections`."""
    if result is None:
        return M.Detections([], [])
    if hasattr(result, "boxes") and hasattr(result, "polygons") and not hasattr(result, "labels"):  # Mixed
        a, b = detections(result.boxes, label_override), detections(result.polygons, label_override)
        polys = [[] for _ in a.boxes] + list(b.polygons or [])
        return M.Detections(
            list(a.boxes) + list(b.boxes), list(a.labels) + list(b.labels), list(a.scores) + list(b.scores), polys
        )
    if hasattr(result, "phrases"):  # Phrases: one instance per box, labelled by its phrase
        boxes, labels, scores = [], [], []
        for phrase, group, score in zip(
            result.phrases, result.boxes, _scores(result, len(result.phrases)), strict=True
        ):
            boxes += [tuple(b) for b in group]
            labels += [phrase] * len(group)
            scores += [score] * len(group)
        return M.Detections(boxes, [label_override or x for x in labels], scores)
    if hasattr(result, "polygons"):
        polys = [list(p) for p in result.polygons]
        keep = [i for i, p in enumerate(polys) if M.polygons_box(p) is not None]
        labels = list(getattr(result, "labels", None) or [""] * len(polys))
        sc = _scores(result, len(polys))
        return M.Detections(
            [M.polygons_box(polys[i]) for i in keep],
            [label_override or labels[i] for i in keep],
            [sc[i] for i in keep],
            [polys[i] for i in keep],
        )
    boxes = [tuple(b) for b in getattr(result, "boxes", [])]
    labels = list(getattr(result, "labels", None) or [""] * len(boxes))
    return M.Detections(boxes, [label_override or x for x in labels], _scores(result, len(boxes)))


def text_of(result: Any) -> str | None:
    """The text of a Text/Label result (or a plain string)."""
    if result is None:
        return None
    if isinstance(result, str):
        return result
    for name in ("text", "label"):
        value = getattr(result, name, None)
        if isinstance(value, str):
            return value
    return None


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
        if result is None:
            return []
        if hasattr(result, "phrases"):
            return [(p, [tuple(b) for b in g]) for p, g in zip(result.phrases, result.boxes, strict=True)]
        d = detections(result)  # Boxes-shaped: group boxes by label
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
        return [(list(q), t) for q, t in zip(result.quads, result.labels, strict=True)]

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


# The default metric family of every catalogue task (fiore.tasks names).
SCORERS: dict[str, type[Scorer]] = {
    "od": DetectionScorer,
    "open_vocabulary_detection": DetectionScorer,
    "dense_region_caption": DetectionScorer,  # descriptions act as labels
    "region_proposal": ProposalScorer,
    "instance_segmentation": SegmentationScorer,
    "referring_expression_segmentation": ReferringSegmentationScorer,
    "region_to_segmentation": ReferringSegmentationScorer,
    "caption": CaptionScorer,
    "detailed_caption": CaptionScorer,
    "more_detailed_caption": CaptionScorer,
    "region_to_description": CaptionScorer,
    "caption_to_phrase_grounding": GroundingScorer,
    "ocr": OCRScorer,
    "region_to_ocr": OCRScorer,
    "ocr_with_region": OCRRegionScorer,
    "vqa": VQAScorer,
    "classify": Top1Scorer,
    "classification": Top1Scorer,
    "region_to_category": Top1Scorer,
}

# Fallback by target type for tasks missing from SCORERS.
_BY_TARGET = {
    "Boxes": DetectionScorer,
    "Mixed": DetectionScorer,
    "Polygons": ReferringSegmentationScorer,
    "Phrases": GroundingScorer,
    "Quads": OCRRegionScorer,
    "Label": Top1Scorer,
    "Text": CaptionScorer,
}


def required_modules(task_names: Iterable[str]) -> list[str]:
    """The optional modules the metrics of these tasks import (to check before any model runs)."""
    return list(dict.fromkeys(m for name in task_names if name in SCORERS for m in SCORERS[name].requires))


def scorer_for(task_name: str, target: Any = None) -> type[Scorer]:
    """The scorer class for a task: by name, else by the type name of its first target."""
    if task_name in SCORERS:
        return SCORERS[task_name]
    if target is not None and type(target).__name__ in _BY_TARGET:
        return _BY_TARGET[type(target).__name__]
    raise ValueError(f"no metric is defined for task {task_name!r} (target type {type(target).__name__})")
