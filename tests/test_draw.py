"""Result extras: plot, save, to_coco, to_supervision (drawing/export code in fiore.draw)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from fiore.draw import colour, summary, supervision_arrays
from fiore.results import Boxes, Label, Mixed, Phrases, Polygons, Quads, Text

BOXES = Boxes([[10, 20, 60, 70], [5, 5, 20, 15]], ["star", "disc"], [0.9, 0.25], task="od", score=0.8)


def test_plot_draws_boxes_in_label_colour_and_keeps_input():
    image = Image.new("RGB", (100, 90), (0, 0, 0))
    out = BOXES.plot(image)
    assert out.size == image.size and out.mode == "RGB"
    assert image.getpixel((10, 45)) == (0, 0, 0)  # input untouched
    assert out.getpixel((10, 45)) == colour("star")  # left edge of the first box, below its label
    assert out.getpixel((35, 45)) == (0, 0, 0)  # inside a box: not filled
    assert out.getpixel((95, 85)) == (0, 0, 0)


def test_plot_polygon_is_filled_translucent_and_quads_outlined():
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    poly = Polygons([[[20, 20, 80, 20, 80, 80, 20, 80]]], ["blob"], [0.5], task="referring_expression_segmentation")
    inside = poly.plot(image).getpixel((50, 60))
    assert inside != (0, 0, 0) and inside != colour("blob")  # blended fill
    quads = Quads([[10, 10, 90, 10, 90, 40, 10, 40]], ["HELLO"], None, task="ocr_with_region")
    assert quads.plot(image).getpixel((50, 40)) == colour("HELLO")


def test_plot_text_banner_and_blank_canvas():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    out = Text("a red star", task="caption", score=0.7).plot(image)
    top = np.asarray(out)[:20]
    assert (top == 255).all(axis=-1).any()  # white text on the banner
    blank = BOXES.plot()  # no image: a canvas large enough for the boxes
    assert blank.width >= 61 and blank.height >= 71


def test_save_json_and_png(tmp_path):
    BOXES.save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == BOXES.to_json()
    BOXES.save(tmp_path / "r.png", Image.new("RGB", (100, 90)))
    assert Image.open(tmp_path / "r.png").size == (100, 90)


def test_to_coco_boxes_polygons_quads_phrases_mixed_text():
    cats: dict[str, int] = {}
    recs = BOXES.to_coco(7, cats)
    assert cats == {"star": 1, "disc": 2}
    assert recs[0] == {
        "image_id": 7,
        "category_id": 1,
        "category_name": "star",
        "bbox": [10.0, 20.0, 50.0, 50.0],
        "score": 0.9,
        "area": 2500.0,
    }
    poly = Polygons([[[0, 0, 4, 0, 4, 3, 0, 3], [10, 10, 12, 10, 12, 12]]], ["star"], [0.5])
    (rec,) = poly.to_coco(8, cats)
    assert rec["category_id"] == 1 and rec["bbox"] == [0.0, 0.0, 12.0, 12.0]
    assert rec["segmentation"] == [[0, 0, 4, 0, 4, 3, 0, 3], [10, 10, 12, 10, 12, 12]] and rec["area"] == 14.0
    (rec,) = Quads([[0, 0, 10, 0, 10, 5, 0, 5]], ["HI"], None).to_coco(1)
    assert rec["bbox"] == [0.0, 0.0, 10.0, 5.0] and rec["score"] is None and rec["category_name"] == "HI"
    recs = Phrases(["a cat", "two dogs"], [[[0, 0, 1, 1]], [[2, 2, 3, 3], [4, 4, 6, 6]]], [0.3, 0.6]).to_coco(1)
    assert [(r["category_name"], r["score"]) for r in recs] == [("a cat", 0.3), ("two dogs", 0.6), ("two dogs", 0.6)]
    mixed = Mixed(boxes=Boxes([[0, 0, 2, 2]], ["a"], [0.4]), polygons=Polygons([[[0, 0, 2, 0, 2, 2]]], ["b"], [0.2]))
    assert [r["category_name"] for r in mixed.to_coco(1)] == ["a", "b"]
    assert Text("a cat", task="caption").to_coco(3) == [{"image_id": 3, "caption": "a cat"}]
    assert Boxes([], [], []).to_coco(3) == []


def test_supervision_arrays_and_optional_dependency():
    arrays = supervision_arrays(BOXES)
    np.testing.assert_allclose(arrays["xyxy"], [[10, 20, 60, 70], [5, 5, 20, 15]])
    np.testing.assert_allclose(arrays["confidence"], [0.9, 0.25])
    assert arrays["class_id"].tolist() == [0, 1] and arrays["data"]["class_name"].tolist() == ["star", "disc"]
    empty = supervision_arrays(Text("x"))
    assert empty["xyxy"].shape == (0, 4)
    if importlib.util.find_spec("supervision") is None:
        with pytest.raises(ImportError, match="pip install supervision"):
            BOXES.to_supervision()
    else:
        det = BOXES.to_supervision()
        assert len(det) == 2 and det.data["class_name"].tolist() == ["star", "disc"]


def test_instances_and_summary():
    assert [i.kind for i in Mixed(boxes=BOXES).instances()] == ["box", "box"]
    assert summary(BOXES) == "2: star 0.90, disc 0.25"
    assert summary(Label("cat")) == "cat"
    assert summary(Boxes([], [], None)) == "nothing found"


def test_coco_export_drops_degenerate_polygons_and_cocoeval_segm_runs():
    """A 2-point polygon (a weak model's referring segmentation) is left out with a warning; what is written is
    valid for pycocotools: segm COCOeval runs on it and scores the real polygon."""
    pytest.importorskip("pycocotools", reason="pycocotools is the consumer under test (eval extra)")
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from fiore.draw import to_coco
    from fiore.results import Polygons

    square = [10.0, 10.0, 50.0, 10.0, 50.0, 50.0, 10.0, 50.0]
    result = Polygons([[[5.0, 5.0, 30.0, 30.0]], [square, [1.0, 1.0, 2.0, 2.0]]], ["a", "a"], [0.9, 0.8])
    with pytest.warns(UserWarning, match="1 instance"):
        records = to_coco(result, 1, {"a": 1})
    assert len(records) == 1 and records[0]["segmentation"] == [square]  # the 2-point ring of the second is gone
    assert records[0]["area"] == pytest.approx(1600.0)
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square], "area": 1600.0,
                         "bbox": [10, 10, 40, 40], "iscrowd": 0}],
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(records)
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# One answer per task that supervision's Florence-2 parser reads (its SUPPORTED_TASKS_FLORENCE_2).
FROM_VLM_ANSWERS = {
    "od": "car<loc_100><loc_200><loc_300><loc_400>dog<loc_500><loc_500><loc_900><loc_900>",
    "dense_region_caption": "a red car<loc_100><loc_200><loc_300><loc_400>",
    "region_proposal": "<loc_100><loc_200><loc_300><loc_400><loc_10><loc_20><loc_30><loc_40>",
    "caption_to_phrase_grounding": "a car<loc_100><loc_200><loc_300><loc_400>a dog<loc_5><loc_6><loc_70><loc_80>",
    "open_vocabulary_detection": "car<loc_100><loc_200><loc_300><loc_400>",
    "ocr_with_region": "HI<loc_100><loc_200><loc_300><loc_210><loc_290><loc_400><loc_90><loc_390>"
    "YO<loc_500><loc_500><loc_600><loc_500><loc_600><loc_550><loc_500><loc_550>",
    "referring_expression_segmentation": "<loc_100><loc_200><loc_300><loc_200><loc_300><loc_400><loc_100><loc_400>",
    "region_to_segmentation": "<loc_100><loc_200><loc_300><loc_200><loc_300><loc_400><loc_100><loc_400>"
    "<sep><loc_500><loc_500><loc_600><loc_600>",  # a 2-point part: no area, left out by both
    "region_to_category": "car<loc_100><loc_200><loc_300><loc_400>",
    "region_to_description": "a red car<loc_100><loc_200><loc_300><loc_400>",
}


@pytest.mark.parametrize("task_name", sorted(FROM_VLM_ANSWERS))
def test_to_supervision_is_as_complete_as_from_vlm(task_name):
    """Side by side with `sv.Detections.from_vlm(sv.VLM.FLORENCE_2, result.to_florence(), ...)`: the same boxes
    (to a pixel: supervision rounds polygon vertices to integers), labels, masks and quads; fiore adds scores."""
    sv = pytest.importorskip("supervision", reason="supervision is the reference here (dev extra)")
    import numpy as np

    from fiore import tasks

    size = (200, 100)
    result = tasks.get(task_name).parse("</s><s>" + FROM_VLM_ANSWERS[task_name] + "</s>", size)
    theirs = sv.Detections.from_vlm(sv.VLM.FLORENCE_2, result.to_florence(), resolution_wh=size)
    ours = result.to_supervision(resolution_wh=size)
    assert len(ours) == len(theirs) > 0
    assert np.allclose(ours.xyxy, theirs.xyxy, atol=1.0), (ours.xyxy, theirs.xyxy)
    if "class_name" in theirs.data:
        assert ours.data["class_name"].tolist() == theirs.data["class_name"].tolist()
    for key in theirs.data:
        if key != "class_name":
            assert np.allclose(ours.data[key], theirs.data[key]), key
    if theirs.mask is not None:
        assert ours.mask is not None and np.array_equal(ours.mask, theirs.mask)
    assert ours.confidence is not None and len(ours.confidence) == len(ours)
