"""fiore.eval.metrics: hand-computed tiny cases (perfect = 1, empty = 0, a known partial case) and agreement with
the reference libraries (pycocotools, pycocoevalcap) run directly on the same inputs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil

import pytest

from fiore.eval import metrics as M
from fiore.eval.metrics import Detections

pytest.importorskip("pycocotools")


def _square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


# ------------------------------------------------------------------------------------------------------- geometry


def test_box_iou_hand_values():
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert M.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert M.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate boxes do not divide by zero


def test_polygons_rle_tolerates_degenerate_rings():
    # A 4-number ring would be read as a box by pycocotools; a ring with an odd count loses its last number.
    i, u = M.mask_iou_parts([[0, 0, 10, 0], _square(0, 0, 10) + [3]], [_square(0, 0, 10)], 20, 20)
    assert i == u == 100.0
    assert M.mask_iou_parts([], [], 20, 20) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------------- COCO mAP


def _reference_cocoeval(dataset: dict, results: list[dict], iou_type: str, tmp_path) -> list[float]:
    """pycocotools run directly, the way its README does: GT from a JSON file, results from a list."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:9]]


def _random_scene(rng: random.Random, n_images=6, labels=("star", "circle", "square")):
    gts, preds, sizes = [], [], []
    for _ in range(n_images):
        w, h = rng.randint(80, 200), rng.randint(80, 200)
        g_boxes, g_labels, g_polys = [], [], []
        for _ in range(rng.randint(0, 4)):
            s = rng.uniform(8, 40)
            x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
            g_boxes.append((x, y, x + s, y + s))
            g_labels.append(rng.choice(labels))
            g_polys.append([[x + s / 2, y, x + s, y + s, x, y + s]])  # a triangle inside its box
        p_boxes, p_labels, p_scores, p_polys = [], [], [], []
        for b, lab in zip(g_boxes, g_labels, strict=True):
            if rng.random() < 0.8:
                d = rng.uniform(-6, 6)
                p_boxes.append((b[0] + d, b[1], b[2] + d, b[3]))
                p_labels.append(lab if rng.random() < 0.8 else rng.choice(labels))
                p_scores.append(rng.random())
                x1, y1, x2, y2 = p_boxes[-1]
                p_polys.append([[(x1 + x2) / 2, y1, x2, y2, x1, y2]])
        for _ in range(rng.randint(0, 2)):  # false positives
            x, y = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            p_boxes.append((x, y, x + 10, y + 10))
            p_labels.append(rng.choice(labels))
            p_scores.append(rng.random())
            p_polys.append([_square(x, y, 10)])
        gts.append(Detections(g_boxes, g_labels, polygons=g_polys))
        preds.append(Detections(p_boxes, p_labels, p_scores, polygons=p_polys))
        sizes.append((w, h))
    return gts, preds, sizes


def _hand_coco(gts, preds, sizes, iou_type):
    """COCO JSON written independently of fiore.eval.metrics.to_coco: GT polygons stay polygons (pycocotools
    rasterises them itself), results carry xywh boxes or RLEs encoded here."""
    from pycocotools import mask as mask_utils

    names = sorted({x for d in gts + preds for x in d.labels})
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns, results = [], [], []
    for k, (g, p, (w, h)) in enumerate(zip(gts, preds, sizes, strict=True)):
        images.append({"id": k + 1, "width": w, "height": h})
        for b, lab, polys in zip(g.boxes, g.labels, g.polygons, strict=True):
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": k + 1,
                    "category_id": cat[lab],
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": float(mask_utils.area(rle)),
                    "segmentation": polys,
                    "iscrowd": 0,
                }
            )
        for b, lab, s, polys in zip(p.boxes, p.labels, p.scores, p.polygons, strict=True):
            r = {"image_id": k + 1, "category_id": cat[lab], "score": s}
            if iou_type == "bbox":
                r["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            else:
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
                rle["counts"] = rle["counts"].decode()
                r["segmentation"] = rle
            results.append(r)
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for n, i in cat.items()],
    }, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_agrees_with_pycocotools(iou_type, seed, tmp_path):
    gts, preds, sizes = _random_scene(random.Random(seed))
    ours = M.coco_map(gts, preds, sizes, iou_type=iou_type)
    ref = _reference_cocoeval(*_hand_coco(gts, preds, sizes, iou_type), iou_type, tmp_path)
    for key, value in zip(M.COCO_KEYS, ref, strict=True):
        if value < 0:
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert 0.0 < ours["mAP"] < 1.0  # the scene is a real partial case, not trivially 0 or 1


def test_coco_map_perfect_empty_and_no_ground_truth():
    gts = [Detections([(10, 10, 50, 50), (60, 60, 90, 95)], ["star", "circle"])]
    sizes = [(100, 100)]
    perfect = Detections(gts[0].boxes, gts[0].labels, [0.9, 0.8])
    for iou_type in ("bbox", "segm"):
        m = M.coco_map(gts, [perfect], sizes, iou_type=iou_type)
        assert m["mAP"] == pytest.approx(1.0) and m["mAP50"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
    assert M.coco_map(gts, [Detections([], [])], sizes) == dict.fromkeys(M.COCO_KEYS, 0.0)
    assert all(math.isnan(v) for v in M.coco_map([Detections([], [])], [perfect], sizes).values())


def test_coco_map_known_partial_case():
    # Two stars, one found exactly: precision 1 up to recall 0.5, so 51 of COCO's 101 recall points -> 51/101.
    gts = [Detections([(10, 10, 40, 40), (60, 60, 90, 90)], ["star", "star"])]
    preds = [Detections([(10, 10, 40, 40)], ["star"], [0.7])]
    m = M.coco_map(gts, preds, [(100, 100)])
    assert m["mAP"] == pytest.approx(51 / 101)
    assert m["AR100"] == pytest.approx(0.5)
    # a wrong label finds nothing; class-agnostic evaluation (region proposals) ignores labels
    wrong = [Detections([(10, 10, 40, 40)], ["circle"], [0.7])]
    assert M.coco_map(gts, wrong, [(100, 100)])["mAP"] == 0.0
    assert M.coco_map(gts, wrong, [(100, 100)], class_agnostic=True)["mAP"] == pytest.approx(51 / 101)


def test_coco_map_ranks_by_score():
    # Same boxes, one true and one false positive: AP is high only when the true one has the higher score.
    gts = [Detections([(10, 10, 40, 40)], ["star"])]
    boxes = [(10, 10, 40, 40), (60, 60, 90, 90)]
    good = M.coco_map(gts, [Detections(boxes, ["star", "star"], [0.9, 0.1])], [(100, 100)])["mAP"]
    bad = M.coco_map(gts, [Detections(boxes, ["star", "star"], [0.1, 0.9])], [(100, 100)])["mAP"]
    assert good == pytest.approx(1.0) and bad == pytest.approx(0.5, abs=0.01)


def test_detections_validates_counts():
    with pytest.raises(ValueError, match="counts must agree"):
        Detections([(0, 0, 1, 1)], ["a", "b"])


# ------------------------------------------------------------------------------------- referring / grounding


def test_segmentation_iou_hand_case():
    preds = [[_square(0, 0, 10)], [_square(5, 0, 10)], [[]]]
    gts = [[_square(0, 0, 10)], [_square(0, 0, 10)], [_square(0, 0, 20)]]
    m = M.segmentation_iou(preds, gts, [(40, 40)] * 3)
    # IoUs 1, 50/150, 0 ; cIoU = (100 + 50 + 0) / (100 + 150 + 400)
    assert m["mIoU"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["cIoU"] == pytest.approx(150 / 650)
    assert all(math.isnan(v) for v in M.segmentation_iou([], [], []).values())


def test_box_accuracy():
    gts = [(0, 0, 10, 10)] * 3
    assert M.box_accuracy(gts, gts) == 1.0
    assert M.box_accuracy([None, None, None], gts) == 0.0
    # IoU 50/150 < .5 fails; IoU 80/100 passes
    assert M.box_accuracy([(0, 0, 10, 10), (5, 0, 15, 10), (0, 0, 10, 8)], gts) == pytest.approx(2 / 3)


def test_grounding_recall_any_box_and_merged_box():
    gt = [[("a red star", [(0, 0, 10, 10), (50, 50, 60, 60)]), ("the circle", [(20, 20, 30, 30)])]]
    assert M.grounding_recall(gt, gt) == {"recall@1": 1.0, "acc@0.5": 1.0}
    assert M.grounding_recall([[]], gt) == {"recall@1": 0.0, "acc@0.5": 0.0}
    # first box hits one star (any-box hit) but the merged boxes differ; the circle phrase matches after
    # normalisation (case, punctuation) but its box misses.
    pred = [[("A red star.", [(50, 50, 60, 60)]), ("The Circle", [(0, 0, 5, 5)])]]
    assert M.grounding_recall(pred, gt) == {"recall@1": 0.5, "acc@0.5": 0.0}


# ------------------------------------------------------------------------------------------------------- captions

CAPTIONS = [
    "A man's dog, running fast!",
    "Two black-and-white cats don't sit on a sofa.",
    'It\'s 3.5 meters (approx) high; "quoted" words...',
    "THE CAT'S   toy: 50% off $20 a/b",
    "there're 2,000 people can't won't I'm we'll they've he'd",
    "Hello world-- ok -- fine. U.S. cars e.g. this",
    "A red star and a blue circle on a gray background.",
    "Three small green squares in the top left corner",
]


def _java_ptb(captions: dict) -> dict:
    if shutil.which("java") is None:
        pytest.skip("the reference PTBTokenizer needs Java, which is not installed")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def test_caption_tokens_match_java_ptb_tokenizer():
    ref = _java_ptb({i: [c] for i, c in enumerate(CAPTIONS)})
    for i, c in enumerate(CAPTIONS):
        assert M.caption_tokens(c) == ref[i][0], c


def test_caption_metrics_agree_with_pycocoevalcap_pipeline():
    """The reference pipeline (PTBTokenizer in Java + Cider + Bleu) on the same raw captions gives the same scores."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds = ["A red star next to a blue circle.", "Two cats sit on the sofa!", "a dog running on grass", ""]
    refs = [
        ["A red star and a blue circle.", "red star beside blue circle"],
        ["Two black cats on a sofa.", "cats sitting on a couch"],
        ["A dog runs on the grass.", "the dog is running"],
        ["Three green squares.", "some squares"],
    ]
    gts = _java_ptb({i: r for i, r in enumerate(refs)})
    res = _java_ptb({i: [p] for i, p in enumerate(preds)})
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = M.caption_metrics(preds, refs)
    assert ours["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert [ours[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert 0 < ours["CIDEr"] < 10


def test_caption_metrics_hand_cases():
    refs = [["a red star on gray"], ["two blue circles side by side"], ["one green square in the corner"]]
    perfect = M.caption_metrics([r[0] for r in refs], refs)
    assert perfect["BLEU-4"] == pytest.approx(1.0)
    assert perfect["CIDEr"] == pytest.approx(10.0)  # pycocoevalcap's x10 scale
    empty = M.caption_metrics(["", "", ""], refs)
    assert empty["BLEU-4"] == pytest.approx(0.0) and empty["CIDEr"] == 0.0
    # one substitution in 5 words, brevity penalty 1: BLEU-4 = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4)
    partial = M.caption_metrics(["a b c d e"], [["a b c d f"]])
    assert partial["BLEU-4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-6)
    assert perfect["METEOR"].startswith("skipped") and perfect["SPICE"].startswith("skipped")
    assert math.isnan(M.caption_metrics([], [])["CIDEr"])


# ------------------------------------------------------------------------------------------------------------ OCR


def _reference_levenshtein(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_edit_distance_hand_and_random():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance("", "abc") == 3 and M.edit_distance("abc", "") == 3 and M.edit_distance("abc", "abc") == 0
    assert M.edit_distance("a b c".split(), "a x c d".split()) == 2
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 12)))
        assert M.edit_distance(a, b) == _reference_levenshtein(a, b), (a, b)


def test_ocr_metrics():
    refs = ["HELLO WORLD", "fiore 2"]
    assert M.ocr_metrics(refs, refs) == {"exact_match": 1.0, "CER": 0.0, "WER": 0.0}
    empty = M.ocr_metrics(["", ""], refs)
    assert empty["exact_match"] == 0.0 and empty["CER"] == 1.0 and empty["WER"] == 1.0
    m = M.ocr_metrics(["HELLO WORLD", "fiori 2"], refs)
    assert m["exact_match"] == 0.5
    assert m["CER"] == pytest.approx(1 / (11 + 7))
    assert m["WER"] == pytest.approx(1 / 4)


def test_ocr_region_f1():
    q1, q2 = _square(0, 0, 20), _square(40, 0, 20)
    gt = [[(q1, "HELLO"), (q2, "WORLD")]]
    assert M.ocr_region_f1(gt, gt, [(100, 100)])["F1"] == 1.0
    assert M.ocr_region_f1([[]], gt, [(100, 100)])["F1"] == 0.0
    # second line found at the right place with the wrong text; a third, spurious prediction
    pred = [[(q1, "HELLO"), (q2, "W0RLD"), (_square(70, 70, 10), "x")]]
    m = M.ocr_region_f1(pred, gt, [(100, 100)])
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 2)
    assert m["F1"] == pytest.approx(2 * 1 / (3 + 2)) and m["F1_det"] == pytest.approx(2 * 2 / (3 + 2))


# ---------------------------------------------------------------------------------------------- VQA / classification


# Produced by the official VQA evaluation script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py
# at a013f00, its last fix), run on these inputs: its normalisation and its per-question accuracy.
VQA_NORMALISED = {  # input -> vqaEval.py's processDigitArticle(processPunctuation(input.strip()))
    "Two": "2",
    "the dog.": "dog",
    "  A Red  star ": "red star",
    "1,000": "1000",
    "3.5": "3.5",
    "yes.": "yes",
    "No!": "no",
    "dont": "don't",
    "dont know": "don't know",
    "don't know": "don't know",
    "Im": "im",
    "im": "im",
    "ive": "ive",
    "youre": "you're",
    "whats that": "what's that",
    "wheres": "where's",
    "it's": "it's",
    "its": "its",
    "won't": "won't",
    "wont": "won't",
    "couldnt’ve": "couldnt’ve",
    "somebody’d": "somebody’d",
    "twas": "'twas",
    "o'clock": "o'clock",
    "oclock": "o'clock",
    "10:30": "10:30",
    "10: 30": "10: 30",
    "a/b": "b",
    "a / b": "b",
    "left, right": "left right",
    "1,000,000 dollars": "1000000 dollars",
    "1,5 and x,y": "15 and xy",
    "(red)": "red",
    "red (dark)": "red dark",
    "e.g. blue": "eg blue",
    "3.": "3",
    ".5": ".5",
    "U.S.": "us",
    "none": "0",
    "None of them": "0 of them",
    "an apple": "apple",
    "The THE the": "",
    "one two ten eleven": "1 2 10 eleven",
    "#1": "#1",
    "50%": "50%",
    "$5": "$5",
    "a-b": "b",
    "hot-dog": "hot dog",
    "tab\there": "tab here",
    "line\nbreak": "line break",
    "it’s": "it’s",
    "semi;colon": "semi colon",
    "semi; colon": "semi colon",
    "a_b": "b",
    "@home": "home",
    "yes,": "yes",
    "no?": "no",
    "2 + 2": "2 2",
    "x=1": "x 1",
    "q&a": "q&a",
    "'quoted'": "'quoted'",
    '"double"': "double",
    "back\\slash": "back slash",
    "<b>": "b",
    "`tick`": "tick",
    "[1]": "1",
    "ain't": "ain't",
    "aint": "ain't",
    "y'all": "y'all",
    "yall": "y'all",
    "shes": "shes",
    "hes": "he's",
    "lets": "lets",
    "let’s": "let’s",
    "maam": "ma'am",
    "notve": "not've",
    "whove": "who've",
    "weve": "we've",
    "whos": "who's",
    "whereve": "where've",
    "hed": "he'd",
    "theyre": "they're",
    "isnt": "isn't",
    "shell": "shell",
    "wed": "wed",
    "shed": "shed",
    "id": "id",
    "somebody'd": "somebodyd",
    "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've",
    "yall'll": "y'all'll",
    "'ows'at": "'ow's'at",
    "y'all'dve": "y'all'd've",
    "Ten!": "10",
    "2.5.": "2.5",
    "a.b": "ab",
    "x. y": "x y",
    "{set}": "set",
    "yes - no": "yes no",
    "well-known": "well known",
    "!!": "",
    "": "",
    "   ": "",
    "3,5 m": "35 m",
    "1,000.5": "1000.5",
    "What's up?": "what's up",
    "no, thanks": "no thanks",
    "the one": "1",
    "An A": "",
    "it is 5:00": "it is 5:00",
    'foo"bar': "foo bar",
    "a=b c": "b c",
    "nine-ten": "9 10",
}
VQA_ACCURACY = [  # (prediction, [(answer, count), ...]) -> vqaEval.py's evalQA / 100
    ("red", [("red", 10)], 1.0),
    ("Red", [("red", 10)], 0.0),
    ("Red.", [("red", 10)], 0.0),
    ("red", [("red", 3), ("blue", 7)], 0.9),
    ("Red.", [("red", 3), ("blue", 7)], 0.9),
    ("two", [("2", 5), ("two", 5)], 1.0),
    ("2", [("2", 2), ("3", 8)], 0.6),
    ("the dog", [("dog", 4), ("a dog", 6)], 1.0),
    ("yes", [("yes", 9), ("no", 1)], 1.0),
    ("no", [("yes", 9), ("no", 1)], 0.3),
    ("Yes!", [("yes", 9), ("no", 1)], 1.0),
    (" blue ", [("blue", 10)], 1.0),
    ("dont know", [("don't know", 4), ("no", 6)], 1.0),
]


def test_vqa_normalisation_matches_the_official_script():
    ours = {text: M.normalize_vqa_answer(text) for text in VQA_NORMALISED}
    assert ours == VQA_NORMALISED


def test_vqa_accuracy_matches_the_official_script():
    for prediction, runs, official in VQA_ACCURACY:
        answers = [answer for answer, count in runs for _ in range(count)]
        assert M.vqa_accuracy([prediction], [answers]) == pytest.approx(official, abs=1e-9), (prediction, runs)


def test_vqa_accuracy_official_ten_answers():
    # leave-one-out over 10 answers: 2 matches -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 3 -> (3 * 2/3 + 7) / 10 = 0.9
    two = ["red"] * 2 + ["blue"] * 8
    three = ["red"] * 3 + ["blue"] * 7
    assert M.vqa_accuracy(["red"], [two]) == pytest.approx(0.6)
    assert M.vqa_accuracy(["Red."], [three]) == pytest.approx(0.9)
    assert M.vqa_accuracy(["blue"], [two]) == pytest.approx(1.0)
    assert M.vqa_accuracy(["green"], [two]) == 0.0
    assert M.vqa_accuracy(["two", "a cat"], [["2"], ["dog"]]) == 0.5  # single answers: exact after normalisation
    assert math.isnan(M.vqa_accuracy([], []))


def test_top1_accuracy():
    assert M.top1_accuracy(["Star", "circle "], ["star", "circle"]) == 1.0
    assert M.top1_accuracy([None, "square"], ["star", "circle"]) == 0.0
    assert M.top1_accuracy(["star", "square"], ["star", "circle"]) == 0.5


@pytest.mark.slow
def test_meteor_runs_with_java_when_asked():
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java, which is not installed")
    m = M.caption_metrics(
        ["a red star next to a blue circle", "two cats on a sofa"],
        [["a red star and a blue circle"], ["two black cats sit on a sofa"]],
        java=True,
    )
    assert isinstance(m["METEOR"], float) and 0.0 < m["METEOR"] < 1.0
    assert m["SPICE"].startswith("skipped")
