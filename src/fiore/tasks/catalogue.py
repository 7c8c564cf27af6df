"""The task catalogue: the 15 Florence-2 tasks plus `<CLASSIFY>` and `<VQA>` for models trained by fiore.

Prompt texts are Florence-2's own (so official checkpoints see what they were trained on); each entry names its
output parser/serializer, how it draws examples from a `fiore.data.Sample`, and the scorer its predictions are
evaluated by (`fiore.eval.scorers`).
"""

from __future__ import annotations

from functools import partial

from fiore.data.sample import Sample
from fiore.eval import scorers as E
from fiore.results import Boxes, Label, Mixed, Phrases, Polygons, Quads, Text
from fiore.tasks import parsers as P
from fiore.tasks import serializers as S
from fiore.tasks.base import Example, Task

# ---- examples: Sample -> [(inputs, ground truth)] -------------------------------------------------------------


def _caption(key: str, s: Sample) -> list[Example]:
    text = s.captions.get(key)
    return [Example(target=Text(text, task=key))] if text else []


def _od(s: Sample) -> list[Example]:
    if not s.objects:
        return []
    return [Example(target=Boxes([list(o.box) for o in s.objects], [o.label for o in s.objects], task="od"))]


def _dense(s: Sample) -> list[Example]:
    objs = [o for o in s.objects if o.description]
    if not objs:
        return []
    boxes = Boxes([list(o.box) for o in objs], [o.description for o in objs], task="dense_region_caption")
    return [Example(target=boxes)]


def _proposals(s: Sample) -> list[Example]:
    if not s.objects:
        return []
    return [Example(target=Boxes([list(o.box) for o in s.objects], [""] * len(s.objects), task="region_proposal"))]


def _ocr(s: Sample) -> list[Example]:
    return [Example(target=Text("\n".join(t.text for t in s.texts), task="ocr"))] if s.texts else []


def _ocr_region(s: Sample) -> list[Example]:
    if not s.texts:
        return []
    return [Example(target=Quads([list(t.quad) for t in s.texts], [t.text for t in s.texts], task="ocr_with_region"))]


def _grounding(s: Sample) -> list[Example]:
    out = []
    for g in s.groundings:
        phrases = [(p, [list(b) for b in boxes]) for p, boxes in g.phrases if boxes]
        if phrases:
            target = Phrases([p for p, _ in phrases], [b for _, b in phrases], task="caption_to_phrase_grounding")
            out.append(Example(text=g.caption, target=target))
    return out


def _res(s: Sample) -> list[Example]:
    out = []
    for ref in s.refs:
        obj = s.objects[ref.object_index]
        if obj.polygons:
            polys = Polygons([[list(r) for r in obj.polygons]], [""], task="referring_expression_segmentation")
            out.append(Example(text=ref.expression, target=polys))
    return out


def _region_seg(s: Sample) -> list[Example]:
    return [
        Example(
            region=tuple(o.box), target=Polygons([[list(r) for r in o.polygons]], [""], task="region_to_segmentation")
        )
        for o in s.objects
        if o.polygons
    ]


def _names(query: str, o) -> bool:
    """A query ("star", "red star") names an object when each of its words is the label or a description word."""
    words = {w.casefold() for w in (o.description or "").split()} | {o.label.casefold()}
    return bool(query.split()) and all(w.casefold() in words for w in query.split())


def _ovd(s: Sample) -> list[Example]:
    out = []
    for entry in s.vocabulary:
        objs = [o for o in s.objects if _names(entry, o)]
        if objs:
            boxes = Boxes([list(o.box) for o in objs], [entry] * len(objs), task="open_vocabulary_detection")
            out.append(Example(text=entry, target=Mixed(boxes=boxes, task="open_vocabulary_detection")))
    return out


def _region_category(s: Sample) -> list[Example]:
    return [Example(region=tuple(o.box), target=Label(o.label, task="region_to_category")) for o in s.objects]


def _region_description(s: Sample) -> list[Example]:
    return [
        Example(region=tuple(o.box), target=Text(o.description, task="region_to_description"))
        for o in s.objects
        if o.description
    ]


def _region_ocr(s: Sample) -> list[Example]:
    return [Example(region=tuple(t.box), target=Text(t.text, task="region_to_ocr")) for t in s.texts if t.text]


def _classify(s: Sample) -> list[Example]:
    return [Example(target=Label(s.label, task="classify"))] if s.label else []


def _vqa(s: Sample) -> list[Example]:
    return [Example(text=qa.question, target=Text(qa.answer, task="vqa")) for qa in s.qas]


# ---- the catalogue --------------------------------------------------------------------------------------------


def _task(name, template, inputs, max_new_tokens, description, parse, serialize, examples, **options) -> Task:
    token = f"<{name.upper()}>"
    return Task(name, token, template, inputs, max_new_tokens, description, parse, serialize, examples, **options)


_text = partial(P.parse_text, strip_locs=False)
_region_text = partial(P.parse_text, strip_locs=True)

TASKS: list[Task] = [
    _task("caption", "What does the image describe?", "none", 64, "short caption",
          _text, S.serialize_text, partial(_caption, "caption"), scorer=E.CaptionScorer),
    _task("detailed_caption", "Describe in detail what is shown in the image.", "none", 256, "detailed caption",
          _text, S.serialize_text, partial(_caption, "detailed_caption"), scorer=E.CaptionScorer),
    _task("more_detailed_caption", "Describe with a paragraph what is shown in the image.", "none", 512,
          "paragraph caption", _text, S.serialize_text, partial(_caption, "more_detailed_caption"),
          scorer=E.CaptionScorer),
    _task("ocr", "What is the text in the image?", "none", 512, "read all text",
          _text, S.serialize_text, _ocr, scorer=E.OCRScorer),
    _task("ocr_with_region", "What is the text in the image, with regions?", "none", 1024,
          "read text with quadrilaterals", P.parse_quads, S.serialize_quads, _ocr_region, scorer=E.OCRRegionScorer,
          tileable=True),
    _task("od", "Locate the objects with category name in the image.", "none", 1024,
          "object detection: boxes and labels", partial(P.parse_boxes, allow_empty_phrase=False),
          S.serialize_boxes, _od, scorer=E.DetectionScorer, tileable=True),
    _task("dense_region_caption", "Locate the objects in the image, with their descriptions.", "none", 1024,
          "boxes with descriptions", partial(P.parse_boxes, allow_empty_phrase=False), S.serialize_boxes, _dense,
          scorer=E.DetectionScorer, tileable=True),
    _task("region_proposal", "Locate the region proposals in the image.", "none", 1024,
          "boxes without labels", partial(P.parse_boxes, allow_empty_phrase=True), S.serialize_proposals,
          _proposals, scorer=E.ProposalScorer, tileable=True),
    _task("caption_to_phrase_grounding", "Locate the phrases in the caption: {input}", "text", 512,
          "text = a caption; boxes for its phrases", P.parse_phrases, S.serialize_phrases, _grounding,
          scorer=E.GroundingScorer),
    _task("referring_expression_segmentation", "Locate {input} in the image with mask", "text", 1024,
          "text = an expression naming one object; its polygons", partial(P.parse_polygons, allow_empty_phrase=True),
          S.serialize_polygons, _res, scorer=E.ReferringSegmentationScorer),
    _task("region_to_segmentation", "What is the polygon mask of region {input}", "region", 1024,
          "region = a box; the polygons of the object in it", partial(P.parse_polygons, allow_empty_phrase=True),
          S.serialize_polygons, _region_seg, scorer=E.ReferringSegmentationScorer),
    _task("open_vocabulary_detection", "Locate {input} in the image.", "text", 1024,
          "text = a class name or phrase, or several separated by ';'; their boxes or polygons", P.parse_mixed,
          S.serialize_mixed, _ovd, scorer=E.DetectionScorer, class_list=True, tileable=True),
    _task("region_to_category", "What is the region {input}?", "region", 32, "region = a box; its category",
          P.parse_label, S.serialize_text, _region_category, echoes_region=True, scorer=E.Top1Scorer),
    _task("region_to_description", "What does the region {input} describe?", "region", 64,
          "region = a box; its description", _region_text, S.serialize_text, _region_description,
          echoes_region=True, scorer=E.CaptionScorer),
    _task("region_to_ocr", "What text is in the region {input}?", "region", 128, "region = a box; the text in it",
          _region_text, S.serialize_text, _region_ocr, echoes_region=True, scorer=E.OCRScorer),
    _task("classify", "What is the category of the image?", "none", 16, "one label for the whole image (fiore)",
          P.parse_label, S.serialize_text, _classify, scorer=E.Top1Scorer),
    _task("vqa", "Answer the question: {input}", "text", 32, "text = a question; a short answer (fiore)",
          _text, S.serialize_text, _vqa, scorer=E.VQAScorer),
]  # fmt: skip
