"""One record for every dataset: an image and whatever ground truth it carries, in pixel coordinates.

Readers (COCO, RefCOCO-style refs, fiore JSONL) and the synthetic world all produce `Sample`s; each `Task` turns a
Sample into its training/evaluation examples (`Task.examples`). Fields a dataset lacks stay empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
Quad = tuple[float, float, float, float, float, float, float, float]  # x1, y1, ..., x4, y4 clockwise from top-left


@dataclass
class PromptPair:
    """A raw Florence-2 training pair, as Roboflow/maestro JSONL give it: `<OD>` + `car<loc_52>...`.

    `task` is the catalogue name of the prefix's task token; `input` what follows the token (a text, or a region's
    4 loc tokens; "" for tasks without input); `target` the exact string the model is trained to emit.
    """

    task: str
    input: str
    target: str
    origin: str = field(default="", compare=False)  # file:line it came from


@dataclass
class Object:
    """One annotated object instance."""

    box: Box
    label: str  # category name, e.g. "star"
    polygons: list[list[float]] = field(default_factory=list)  # visible mask as flat rings [x1, y1, x2, y2, ...]
    description: str | None = None  # dense region caption, e.g. "large red star"
    attributes: dict[str, Any] = field(default_factory=dict)  # e.g. {"color": "red", "size": "large"}
    rle: dict | None = None  # COCO RLE {"size": [h, w], "counts": str} when a dataset gives the mask that way
    origin: str = field(default="", compare=False)  # where it was read, e.g. "instances.json: annotation 17"


@dataclass
class TextItem:
    """One rendered/annotated text string (OCR), listed in reading order."""

    text: str
    quad: Quad
    box: Box


@dataclass
class Ref:
    """A referring expression that singles out exactly one object (`objects[object_index]`)."""

    expression: str
    object_index: int


@dataclass
class Grounding:
    """A caption and the phrases in it that name boxes (phrase grounding)."""

    caption: str
    phrases: list[tuple[str, list[Box]]]


@dataclass
class QA:
    question: str
    answer: str
    answers: list[str] = field(default_factory=list)  # all annotator answers (VQAv2-style); empty = [answer]
    kind: str | None = None  # counting / colour / existence / position / reading


@dataclass
class Sample:
    image_id: int | str
    width: int
    height: int
    image: Any = None  # PIL.Image.Image, loaded lazily by readers when None
    image_path: str | None = None
    objects: list[Object] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)  # keys: caption, detailed_caption, more_detailed_caption
    texts: list[TextItem] = field(default_factory=list)
    refs: list[Ref] = field(default_factory=list)
    groundings: list[Grounding] = field(default_factory=list)
    qas: list[QA] = field(default_factory=list)
    label: str | None = None  # single classification label for the whole image
    vocabulary: list[str] = field(default_factory=list)  # open-vocabulary queries that apply to this image
    reference_captions: list[str] = field(default_factory=list)  # all "caption" references (COCO: 5); empty = [caption]
    pairs: list[PromptPair] = field(default_factory=list)  # raw prompt/target pairs (Florence-2 JSONL, replay)
    origin: str = field(default="", compare=False)  # where it was read: "instances.json: image 42", "a.jsonl:7"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the order every parser and quantizer takes."""
        return (self.width, self.height)

    def load_image(self):
        """The image as RGB PIL, loading it from `image_path` (and keeping it) when not in memory."""
        if self.image is None:
            self.image = self.read_image()
        return self.image

    def read_image(self):
        """The image as RGB PIL without keeping it on the sample (training loaders read each image many times and
        must not hold a whole dataset of decoded images)."""
        if self.image is not None:
            return self.image
        if self.image_path is None:
            raise ValueError(f"sample {self.image_id!r} has neither an image nor an image_path")
        from fiore.processor import load_image

        return load_image(self.image_path)
