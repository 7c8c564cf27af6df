"""Typed results -> training target strings (no `<s>`/`</s>`), in the format the parsers read back.

`parse(serialize(x))` returns x within half a location bin for every in-image coordinate (tested). Text that the
official grammar cannot carry is refused with a clear error rather than silently mangled: a label may not contain
'<' (it would end the label) or a line break (the official label/OCR regexes stop there).
"""

from __future__ import annotations

from fiore.results import Boxes, Label, Mixed, Phrases, Polygons, Quads, Result, Text
from fiore.tasks.locations import box_to_tokens, points_to_tokens


def _expect(result: Result, kind: type) -> None:
    if not isinstance(result, kind):
        raise TypeError(f"expected a {kind.__name__} result, got {type(result).__name__}")


def _clean_label(label: str, what: str = "label") -> str:
    if "<" in label or "\n" in label or "\r" in label:
        raise ValueError(f"{what} {label!r} contains '<' or a line break, which the output format cannot carry")
    return label.strip()


def serialize_text(result: Result, image_size=None) -> str:
    if isinstance(result, Label):
        return result.label.strip()
    _expect(result, Text)
    return result.text.strip()


def serialize_boxes(result: Result, image_size, labelled: bool = True) -> str:
    """`label<loc_x1><loc_y1><loc_x2><loc_y2>` per box (labels dropped for region proposals)."""
    _expect(result, Boxes)
    parts = []
    for box, label in zip(result.boxes, result.labels, strict=True):
        label = _clean_label(label) if labelled else ""
        if labelled and not label:
            raise ValueError("a labelled box needs a non-empty label")
        parts.append(label + box_to_tokens(box, image_size))
    return "".join(parts)


def serialize_proposals(result: Result, image_size) -> str:
    return serialize_boxes(result, image_size, labelled=False)


def serialize_phrases(result: Result, image_size) -> str:
    _expect(result, Phrases)
    parts = []
    for phrase, boxes in zip(result.phrases, result.boxes, strict=True):
        phrase = _clean_label(phrase, "phrase")
        if not phrase:
            raise ValueError("a grounded phrase must not be empty")
        if not boxes:
            raise ValueError(f"phrase {phrase!r} has no boxes")
        parts.append(phrase + "".join(box_to_tokens(b, image_size) for b in boxes))
    return "".join(parts)


def _rings(rings: list[list[float]], image_size) -> str:
    for ring in rings:
        if len(ring) < 6 or len(ring) % 2:
            raise ValueError(f"a polygon ring needs at least 3 (x, y) points, got {len(ring)} numbers")
    return "<sep>".join(points_to_tokens(r, image_size) for r in rings)


def serialize_polygons(result: Result, image_size) -> str:
    """One unlabelled instance: rings joined by `<sep>` (the official segmentation output). Several or labelled
    instances: `label<poly>rings</poly>` per instance."""
    _expect(result, Polygons)
    if not result.polygons:
        return ""
    for inst in result.polygons:
        if not inst:
            raise ValueError("a polygon instance needs at least one ring")
    if len(result.polygons) == 1 and not result.labels[0].strip():
        return _rings(result.polygons[0], image_size)
    return "".join(
        _clean_label(label) + "<poly>" + _rings(inst, image_size) + "</poly>"
        for inst, label in zip(result.polygons, result.labels, strict=True)
    )


def serialize_quads(result: Result, image_size) -> str:
    _expect(result, Quads)
    parts = []
    for quad, text in zip(result.quads, result.labels, strict=True):
        if len(quad) != 8:
            raise ValueError(f"a quad is 8 numbers [x1, y1, ..., x4, y4], got {len(quad)}")
        text = _clean_label(text, "OCR text")
        if not text:
            raise ValueError("an OCR region needs non-empty text")
        parts.append(text + points_to_tokens(quad, image_size))
    return "".join(parts)


def serialize_mixed(result: Result, image_size) -> str:
    """Boxes, or labelled polygons; not both, because the official grammar reads everything as polygons as soon as
    one `<poly>` appears."""
    _expect(result, Mixed)
    if len(result.boxes) and len(result.polygons):
        raise ValueError("open-vocabulary detection targets hold boxes or polygons, not both")
    if len(result.polygons):
        polys = result.polygons
        for label in polys.labels:
            if not label.strip():
                raise ValueError("open-vocabulary polygons need a label")
        return "".join(
            _clean_label(label) + "<poly>" + _rings(inst, image_size) + "</poly>"
            for inst, label in zip(polys.polygons, polys.labels, strict=True)
        )
    return serialize_boxes(result.boxes, image_size)
