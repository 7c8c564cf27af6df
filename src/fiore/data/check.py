"""Find bad training data before the first step: every problem named with its file and line or annotation id.

Checked per sample: the image exists and decodes, and has the size the annotations were made for; boxes,
polygons, text quads and grounding boxes lie inside the image with positive size; no empty label, caption,
answer, phrase or text; raw Florence-2 pairs name a known task token, fit its input kind and have a target.
`fiore data check PATH` runs the same checks alone; `fiore train` runs them on every source it reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fiore.data.sample import Sample

# Coordinates may overshoot the image by this many pixels (annotation tools round outward) before it is a problem.
TOLERANCE = 1.0


@dataclass
class Problem:
    where: str  # file and line or annotation id
    what: str
    sample: int  # index of the sample in the list checked

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _box_problem(box: Sequence[float], size: tuple[int, int]) -> str | None:
    w, h = size
    x1, y1, x2, y2 = box
    if not x2 > x1 or not y2 > y1:
        return f"box {_fmt(box)} has no area"
    if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > w + TOLERANCE or y2 > h + TOLERANCE:
        return f"box {_fmt(box)} lies outside the {w}x{h} image"
    return None


def _points_problem(points: Sequence[float], size: tuple[int, int], what: str) -> str | None:
    w, h = size
    xs, ys = points[0::2], points[1::2]
    if min(xs) < -TOLERANCE or min(ys) < -TOLERANCE or max(xs) > w + TOLERANCE or max(ys) > h + TOLERANCE:
        return f"{what} reaches outside the {w}x{h} image"
    return None


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _image_problem(sample: Sample) -> str | None:
    from fiore.processor import load_image

    if sample.image is None and sample.image_path is None:
        return "no image"
    if sample.image is None and not os.path.isfile(sample.image_path):
        return f"image file {sample.image_path} is missing"
    try:
        image = sample.image if sample.image is not None else load_image(sample.image_path)
    except (OSError, ValueError) as e:
        return f"image cannot be read: {e}"
    if image.size != sample.size:
        w, h = image.size
        return f"image {sample.image_path} is {w}x{h}, the annotations say {sample.width}x{sample.height}"
    return None


def annotation_problems(sample: Sample) -> Iterable[tuple[str, str]]:
    """(where, what) for every problem in one sample's annotations (not its image)."""
    import fiore.tasks
    from fiore.tasks.base import TaskInputError

    where, size = sample.origin or f"image {sample.image_id!r}", sample.size
    for obj in sample.objects:
        at = obj.origin or where
        if (p := _box_problem(obj.box, size)) is not None:
            yield at, p
        if not obj.label.strip():
            yield at, "empty category name"
        for ring in obj.polygons:
            if len(ring) < 6 or len(ring) % 2:
                yield at, f"polygon with {len(ring)} coordinates (needs 3+ points as x, y pairs)"
            elif (p := _points_problem(ring, size, "polygon")) is not None:
                yield at, p
    for key, text in sample.captions.items():
        if not text.strip():
            yield where, f"empty {key}"
    for item in sample.texts:
        if not item.text.strip():
            yield where, "empty OCR text"
        if (p := _points_problem(item.quad, size, f"quad of text {item.text!r}")) is not None:
            yield where, p
    for qa in sample.qas:
        if not qa.question.strip() or not qa.answer.strip():
            yield where, f"question {qa.question!r} with an empty question or answer"
    for ref in sample.refs:
        if not 0 <= ref.object_index < len(sample.objects):
            yield where, f"referring expression {ref.expression!r} points at no object"
        elif not ref.expression.strip():
            yield where, "empty referring expression"
    for g in sample.groundings:
        for phrase, boxes in g.phrases:
            if not phrase.strip():
                yield where, f"empty phrase in grounding {g.caption!r}"
            for box in boxes:
                if (p := _box_problem(box, size)) is not None:
                    yield where, f"phrase {phrase!r}: {p}"
    tasks = {t.name: t for t in fiore.tasks.all()}
    for pair in sample.pairs:
        at = pair.origin or where
        task = tasks.get(pair.task)
        if task is None:
            token = pair.task or "(none)"
            yield at, f"unknown task token {token} in the prompt; known: {', '.join(t.token for t in tasks.values())}"
            continue
        if not pair.target.strip():
            yield at, f"empty target (suffix) for {task.token}"
        try:
            task.pair_example(pair, size if size[0] > 0 else (1, 1))
        except TaskInputError as e:
            yield at, str(e)


def check_samples(
    samples: Sequence[Sample], images: bool = True, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    """Every problem of `samples`; images are decoded in threads (PIL releases the GIL while decoding)."""
    problems: list[Problem] = []
    image_problems: list[str | None] = [None] * len(samples)
    if images:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, p in enumerate(pool.map(_image_problem, samples)):
                image_problems[i] = p
                if progress is not None:
                    progress(i + 1)
    for i, sample in enumerate(samples):
        if image_problems[i] is not None:
            problems.append(Problem(sample.origin or f"image {sample.image_id!r}", image_problems[i], i))
        elif sample.width <= 0 or sample.height <= 0:
            problems.append(Problem(sample.origin or f"image {sample.image_id!r}", "image size unknown", i))
            continue
        problems.extend(Problem(where, what, i) for where, what in annotation_problems(sample))
    return problems


def without_problems(samples: Sequence[Sample], problems: Sequence[Problem]) -> list[Sample]:
    """`samples` less every sample with a problem (what `on_bad = "skip"` trains on)."""
    bad = {p.sample for p in problems}
    return [s for i, s in enumerate(samples) if i not in bad]


def summary(problems: Sequence[Problem], limit: int = 20) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)
