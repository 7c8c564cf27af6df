"""Typed task results. Coordinates are float pixels in the ORIGINAL image; boxes are [x1, y1, x2, y2].

Every result has `to_florence()`, the dict shape of the official `post_process_generation(text, task, image_size)`
for its task (`{"<OD>": {"bboxes": ..., "labels": ...}}`), for interop. Deliberate deviations from transformers'
native processor: coordinates are floats (native truncates to int) and labels keep non-ASCII characters (native
drops them for boxes and grounding). `scores` appears in `to_florence()` only when scores were computed, as in
Microsoft's original processor.

Common fields: `task` (task name, e.g. "od"), `truncated` (generation hit max_new_tokens; set by the engine),
`score` (sequence score, exp of the mean token log-prob; None without log-probs), `warnings` (what the parser
could not read: a partial result is returned instead of raising).
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any


@dataclass
class Instance:
    """One located thing of a result, in pixels: `kind` "box" (`coords` x1, y1, x2, y2), "polygon" (a list of flat
    rings [x1, y1, x2, y2, ...]) or "quad" (8 floats); `label` ("" when the task has none); `score` or None."""

    kind: str
    coords: list
    label: str
    score: float | None = None

    def bbox(self) -> list[float]:
        """Axis-aligned x1, y1, x2, y2 around the instance ([0, 0, 0, 0] for a polygon without points)."""
        if self.kind == "box":
            return list(self.coords)
        flat = [v for ring in self.coords for v in ring] if self.kind == "polygon" else self.coords
        xs, ys = flat[0::2], flat[1::2]
        return [min(xs), min(ys), max(xs), max(ys)] if xs else [0.0, 0.0, 0.0, 0.0]


def _nth(values, i):
    return None if values is None or i >= len(values) else values[i]


def _score(values, i) -> float | None:
    value = _nth(values, i)
    return None if value is None else float(value)


def _token(task: str) -> str:
    if not task:
        raise ValueError("this result has no task name set; to_florence() needs it to build the task key")
    return task if task.startswith("<") else f"<{task.upper()}>"


@dataclass
class Result:
    _: KW_ONLY
    task: str = ""
    truncated: bool = False
    score: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_florence(self) -> dict[str, Any]:
        return {_token(self.task): self._florence_value()}

    def _florence_value(self) -> Any:
        raise NotImplementedError

    def instances(self) -> list[Instance]:
        """Every located instance, in generation order; text answers have none. Drawing, exports and the eval
        scorers read results through this one list."""
        return []

    def as_text(self) -> str | None:
        """The answer as text for text answers (caption, OCR, VQA answer, label), else None."""
        return None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: {"type": class name, field: value, ...}."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    # Extras for users (issue 8); the drawing and export code lives in fiore.draw.
    def to_coco(self, image_id: int | str, categories: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """COCO result records (detections with bbox [x, y, w, h], score, segmentation; or a caption record).
        `categories` (label -> id) is extended in place for unseen labels."""
        from fiore.draw import to_coco

        return to_coco(self, image_id, categories)

    def to_supervision(self, resolution_wh: tuple[int, int] | None = None):
        """A `supervision.Detections` (needs the optional `supervision` package); `resolution_wh` = the image's
        (width, height): polygon results need it for their masks, region answers for their box."""
        from fiore.draw import to_supervision

        return to_supervision(self, resolution_wh)

    def plot(self, image=None, **kwargs):
        """PIL RGB image: `image` with boxes / polygons / quads, labels and scores (and any text) drawn."""
        from fiore.draw import plot

        return plot(self, image, **kwargs)

    def save(self, path, image=None) -> None:
        """`.json` -> `to_json()`; an image suffix (.png, .jpg, ...) -> `plot(image)` saved there."""
        import json
        from pathlib import Path

        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")
        else:
            self.plot(image).save(path)


@dataclass
class Text(Result):
    """Free text (captions, OCR, region descriptions, VQA answers). `raw` is the official pure-text string when it
    differs from `text` (e.g. region tasks echo loc tokens, which `text` drops)."""

    text: str
    raw: str | None = None

    def as_text(self) -> str:
        return self.text

    def _florence_value(self) -> str:
        return self.text if self.raw is None else self.raw


@dataclass
class Label(Result):
    """One label (image classification, region-to-category). `ranking`: closed-set scoring (`Florence.classify`)
    fills it with every candidate and its probability, most likely first."""

    label: str
    raw: str | None = None
    ranking: list[tuple[str, float]] | None = None

    def as_text(self) -> str:
        return self.label

    def _florence_value(self) -> str:
        return self.label if self.raw is None else self.raw


@dataclass
class Boxes(Result):
    """N boxes: `boxes` (N, 4) float xyxy, `labels` (N,) ("" for region proposals), `scores` (N,) or None."""

    boxes: list[list[float]]
    labels: list[str]
    scores: list[float] | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def instances(self) -> list[Instance]:
        return [
            Instance("box", [float(v) for v in box], str(_nth(self.labels, i) or ""), _score(self.scores, i))
            for i, box in enumerate(self.boxes)
        ]

    def _florence_value(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bboxes": [list(b) for b in self.boxes], "labels": list(self.labels)}
        if self.scores is not None:
            out["scores"] = list(self.scores)
        return out


@dataclass
class Phrases(Result):
    """Phrase grounding: phrase i names `boxes[i]`, a list of xyxy boxes; `scores` per phrase or None."""

    phrases: list[str]
    boxes: list[list[list[float]]]
    scores: list[float] | None = None

    def __len__(self) -> int:
        return len(self.phrases)

    def instances(self) -> list[Instance]:
        """One box instance per box, labelled by its phrase, with the phrase's score."""
        return [
            Instance("box", [float(v) for v in box], str(phrase), _score(self.scores, i))
            for i, phrase in enumerate(self.phrases)
            for box in _nth(self.boxes, i) or []
        ]

    def _florence_value(self) -> dict[str, Any]:
        # The official shape repeats the phrase once per box.
        bboxes = [list(b) for group in self.boxes for b in group]
        labels = [p for p, group in zip(self.phrases, self.boxes, strict=True) for _ in group]
        return {"bboxes": bboxes, "labels": labels}


@dataclass
class Polygons(Result):
    """Instance masks as polygons: `polygons[i]` is a list of flat rings [x1, y1, x2, y2, ...] (several rings per
    instance), `labels[i]` ("" when the task has none), `scores[i]` or None."""

    polygons: list[list[list[float]]]
    labels: list[str]
    scores: list[float] | None = None

    def __len__(self) -> int:
        return len(self.polygons)

    def instances(self) -> list[Instance]:
        return [
            Instance(
                "polygon",
                [[float(v) for v in ring] for ring in rings],
                str(_nth(self.labels, i) or ""),
                _score(self.scores, i),
            )  # fmt: skip
            for i, rings in enumerate(self.polygons)
        ]

    def _florence_value(self) -> dict[str, Any]:
        return {"polygons": [[list(r) for r in inst] for inst in self.polygons], "labels": list(self.labels)}


@dataclass
class Quads(Result):
    """OCR with regions: `quads` (N, 8) float [x1, y1, ..., x4, y4], `labels` the N texts, `scores` or None."""

    quads: list[list[float]]
    labels: list[str]
    scores: list[float] | None = None

    def __len__(self) -> int:
        return len(self.quads)

    def instances(self) -> list[Instance]:
        return [
            Instance("quad", [float(v) for v in quad], str(_nth(self.labels, i) or ""), _score(self.scores, i))
            for i, quad in enumerate(self.quads)
        ]

    def _florence_value(self) -> dict[str, Any]:
        return {"quad_boxes": [list(q) for q in self.quads], "labels": list(self.labels)}


@dataclass
class Mixed(Result):
    """Open-vocabulary detection: boxes and/or polygons (the model chooses per output)."""

    boxes: Boxes = field(default_factory=lambda: Boxes([], []))
    polygons: Polygons = field(default_factory=lambda: Polygons([], []))

    def __len__(self) -> int:
        return len(self.boxes) + len(self.polygons)

    def instances(self) -> list[Instance]:
        return self.boxes.instances() + self.polygons.instances()

    @classmethod
    def merge(cls, parts: list[Mixed], classes: list[str]) -> Mixed:
        """One result from the answers to several one-class queries of one image: every instance of `parts[i]`
        labelled `classes[i]` (the class asked, whatever text the model echoed), its own score kept; the result's
        score is the mean of the parts' scores, truncated when any part was, warnings prefixed by their class."""
        if not parts:
            return cls(task="open_vocabulary_detection")
        relabelled = [
            dataclasses.replace(
                part,
                boxes=dataclasses.replace(part.boxes, labels=[name] * len(part.boxes)),
                polygons=dataclasses.replace(part.polygons, labels=[name] * len(part.polygons)),
            )
            for part, name in zip(parts, classes, strict=True)
        ]
        merged = concat_instances(relabelled)
        merged.boxes.task = merged.polygons.task = merged.task
        scores = [p.score for p in parts if p.score is not None]
        return dataclasses.replace(
            merged,
            truncated=any(p.truncated for p in parts),
            score=sum(scores) / len(scores) if scores else None,
            warnings=[f"{name}: {w}" for part, name in zip(parts, classes, strict=True) for w in part.warnings],
        )

    def _florence_value(self) -> dict[str, Any]:
        return {
            "bboxes": [list(b) for b in self.boxes.boxes],
            "bboxes_labels": list(self.boxes.labels),
            "polygons": [[list(r) for r in inst] for inst in self.polygons.polygons],
            "polygons_labels": list(self.polygons.labels),
        }


# the field holding the located things of each result type whose instances are one list
INSTANCE_FIELD = {Boxes: "boxes", Quads: "quads", Polygons: "polygons"}


def concat_instances(parts: list[Result]) -> Result:
    """One result holding every instance of `parts` (Boxes, Quads, Polygons or Mixed, all of one type), in order,
    each with its label ("" where a part had none) and score (scores kept only when every non-empty part has them);
    the other fields are the first part's."""
    first = parts[0]
    if isinstance(first, Mixed):
        boxes, polygons = (concat_instances([getattr(p, name) for p in parts]) for name in ("boxes", "polygons"))
        return dataclasses.replace(first, boxes=boxes, polygons=polygons)
    name = INSTANCE_FIELD[type(first)]
    scored = all(p.scores is not None for p in parts if len(p))
    return dataclasses.replace(
        first,
        **{name: [v for p in parts for v in getattr(p, name)]},
        labels=[label for p in parts for label in (list(p.labels) + [""] * len(p))[: len(p)]],
        scores=[s for p in parts for s in p.scores or []] if scored else None,
    )


__all__ = ["Boxes", "Instance", "Label", "Mixed", "Phrases", "Polygons", "Quads", "Result", "Text", "concat_instances"]
