"""Evaluation metrics: thin, pure functions over plain Python values (boxes in xyxy pixels, polygons as flat rings).

Where a standard library exists the function only converts inputs and calls it: COCO mAP and mask IoU through
pycocotools, CIDEr / BLEU (and optionally METEOR) through pycocoevalcap's scorers. Both are imported lazily (the
`eval` extra) and pycocotools' printing is swallowed. Everything else (VQA accuracy, edit distances, grounding recall)
is small enough to write out here; each function's docstring names the protocol it follows.

Conventions: a metric over zero items is NaN ("undefined"), never an exception; the report writes NaN as null.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = Sequence[float]  # x1, y1, x2, y2 in pixels
Ring = Sequence[float]  # flat polygon x1, y1, x2, y2, ...
NAN = float("nan")


# --------------------------------------------------------------------------------------------------------------------
# geometry


def box_iou(a: Box, b: Box) -> float:
    """IoU of two xyxy boxes (continuous coordinates, no +1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def polygons_box(polygons: Sequence[Ring]) -> tuple[float, float, float, float] | None:
    """The xyxy box around all points of the given rings; None when there are no points."""
    xs = [x for ring in polygons for x in ring[0 : len(ring) // 2 * 2 : 2]]
    ys = [y for ring in polygons for y in ring[1 : len(ring) // 2 * 2 : 2]]
    if not xs:
        return None
    return (min(xs), min(ys), max(xs), max(ys))


def _mask_utils():
    try:
        from pycocotools import mask
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fiore.eval needs pycocotools: pip install 'fiore[eval]'") from e
    return mask


def polygons_rle(polygons: Sequence[Ring], width: int, height: int) -> dict:
    """One COCO RLE (compressed) for the union of `polygons` in a width x height image.

    Rings with fewer than 3 points are dropped (pycocotools would read a 4-number ring as a box) and an odd trailing
    coordinate is ignored, so any parser output rasterises; no valid ring gives an empty mask.
    """
    mask = _mask_utils()
    rings = [[float(v) for v in r[: len(r) // 2 * 2]] for r in polygons if len(r) >= 6]
    if not rings:
        return mask.encode(np.asfortranarray(np.zeros((height, width), dtype=np.uint8)))
    return mask.merge(mask.frPyObjects(rings, height, width))


def mask_iou_parts(pred: Sequence[Ring], gt: Sequence[Ring], width: int, height: int) -> tuple[float, float]:
    """(intersection, union) in pixels of the rasterised unions of two polygon sets."""
    mask = _mask_utils()
    a, b = polygons_rle(pred, width, height), polygons_rle(gt, width, height)
    inter = float(mask.area(mask.merge([a, b], intersect=True)))
    union = float(mask.area(mask.merge([a, b], intersect=False)))
    return inter, union


# --------------------------------------------------------------------------------------------------------------------
# detection and instance segmentation (COCO mAP)


@dataclass
class Detections:
    """Instances in one image. boxes (N, xyxy pixels); labels (N); scores (N) or None = all 1.0;
    polygons (N lists of flat rings) or None = boxes only (a box then stands for its own rectangular mask)."""

    boxes: Sequence[Box]
    labels: Sequence[str]
    scores: Sequence[float] | None = None
    polygons: Sequence[Sequence[Ring]] | None = None

    def __post_init__(self):
        n = len(self.boxes)
        if len(self.labels) != n or (self.scores is not None and len(self.scores) != n):
            raise ValueError(
                f"Detections: {n} boxes, {len(self.labels)} labels, "
                f"{'no' if self.scores is None else len(self.scores)} scores — counts must agree"
            )
        if self.polygons is not None and len(self.polygons) != n:
            raise ValueError(f"Detections: {n} boxes but {len(self.polygons)} polygon sets")


COCO_KEYS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100")


def _instance_rle(det: Detections, i: int, width: int, height: int) -> dict:
    if det.polygons is not None and any(len(r) >= 6 for r in det.polygons[i]):
        return polygons_rle(det.polygons[i], width, height)
    x1, y1, x2, y2 = det.boxes[i]
    return polygons_rle([[x1, y1, x2, y1, x2, y2, x1, y2]], width, height)


def to_coco(
    gts: Sequence[Detections],
    preds: Sequence[Detections],
    sizes: Sequence[tuple[int, int]],
    iou_type: str = "bbox",
    class_agnostic: bool = False,
) -> tuple[dict, list[dict]]:
    """COCO ground-truth dataset dict and result list for per-image gts/preds; sizes are (width, height).

    Image ids are positions 1..n; categories are the sorted union of all labels (one "object" category when
    class_agnostic). Written out, these are exactly what pycocotools' COCO()/loadRes() read.
    """
    if not (len(gts) == len(preds) == len(sizes)):
        raise ValueError(f"to_coco: {len(gts)} gts, {len(preds)} preds, {len(sizes)} sizes — one each per image")
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    mask = _mask_utils()

    def label(x: str) -> str:
        return "object" if class_agnostic else x

    names = sorted({label(x) for d in list(gts) + list(preds) for x in d.labels})
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns, results = [], [], []
    for img_id, (gt, pred, (w, h)) in enumerate(zip(gts, preds, sizes, strict=True), start=1):
        images.append({"id": img_id, "width": int(w), "height": int(h)})
        for i, (box, lab) in enumerate(zip(gt.boxes, gt.labels, strict=True)):
            x1, y1, x2, y2 = (float(v) for v in box)
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": cat[label(lab)], "iscrowd": 0}
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            has_mask = gt.polygons is not None and any(len(r) >= 6 for r in gt.polygons[i])
            if iou_type == "segm" or has_mask:
                rle = _instance_rle(gt, i, int(w), int(h))
                ann["area"] = float(mask.area(rle))  # COCO's area ranges use the mask area when there is one
                if iou_type == "segm":
                    ann["segmentation"] = rle
            else:
                ann["area"] = (x2 - x1) * (y2 - y1)
            anns.append(ann)
        scores = pred.scores if pred.scores is not None else [1.0] * len(pred.boxes)
        for i, (box, lab, score) in enumerate(zip(pred.boxes, pred.labels, scores, strict=True)):
            res = {"image_id": img_id, "category_id": cat[label(lab)], "score": float(score)}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in box)
                res["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                res["segmentation"] = _instance_rle(pred, i, int(w), int(h))
            results.append(res)
    dataset = {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat.items()]}
    return dataset, results


def coco_map(
    gts: Sequence[Detections],
    preds: Sequence[Detections],
    sizes: Sequence[tuple[int, int]],
    iou_type: str = "bbox",
    class_agnostic: bool = False,
) -> dict[str, float]:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75, by-area mAP and AR@{1,10,100} (pycocotools COCOeval), as fractions.

    Predictions are ranked by their scores (fiore's confidences). Protocol notes: AP is averaged over the ground-truth
    categories, so a predicted label that names no ground-truth category is ignored, as in COCO. With no ground-truth
    instances at all every value is NaN (nothing to find); with ground truth but no predictions every value is 0.
    A metric pycocotools marks undefined (-1, e.g. no small objects) becomes NaN.
    """
    n_gt = sum(len(g.boxes) for g in gts)
    n_pred = sum(len(p.boxes) for p in preds)
    if n_gt == 0:
        return dict.fromkeys(COCO_KEYS, NAN)
    if n_pred == 0:
        return dict.fromkeys(COCO_KEYS, 0.0)
    dataset, results = to_coco(gts, preds, sizes, iou_type, class_agnostic)
    return run_cocoeval(dataset, results, iou_type)


def run_cocoeval(dataset: dict, results: list[dict], iou_type: str) -> dict[str, float]:
    """COCOeval on an in-memory GT dict and result list, its printing swallowed; stats keyed by COCO_KEYS."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover
        raise ImportError("fiore.eval needs pycocotools: pip install 'fiore[eval]'") from e
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])  # loadRes writes ids/areas into the dicts: copy
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # COCOeval.stats: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...
    return {k: (NAN if stats[i] < 0 else stats[i]) for k, i in zip(COCO_KEYS, order, strict=True)}


# --------------------------------------------------------------------------------------------------------------------
# referring segmentation, referring expressions, phrase grounding


def segmentation_iou(
    preds: Sequence[Sequence[Ring]], gts: Sequence[Sequence[Ring]], sizes: Sequence[tuple[int, int]]
) -> dict[str, float]:
    """Referring segmentation: mIoU (mean of per-expression IoU) and cIoU (summed intersections / summed unions).

    Each item is the union of its rings, rasterised by pycocotools at its (width, height). Two empty masks agree
    perfectly (IoU 1). No items gives NaN.
    """
    if not (len(preds) == len(gts) == len(sizes)):
        raise ValueError(f"segmentation_iou: {len(preds)} preds, {len(gts)} gts, {len(sizes)} sizes")
    if not preds:
        return {"mIoU": NAN, "cIoU": NAN}
    parts = [mask_iou_parts(p, g, int(w), int(h)) for p, g, (w, h) in zip(preds, gts, sizes, strict=True)]
    ious = [i / u if u > 0 else 1.0 for i, u in parts]
    total_u = sum(u for _, u in parts)
    return {"mIoU": float(np.mean(ious)), "cIoU": sum(i for i, _ in parts) / total_u if total_u > 0 else 1.0}


def box_accuracy(preds: Sequence[Box | None], gts: Sequence[Box], threshold: float = 0.5) -> float:
    """Referring-expression accuracy: fraction of items whose predicted box has IoU >= threshold with the
    ground-truth box (None = no box predicted = miss). NaN for no items."""
    if len(preds) != len(gts):
        raise ValueError(f"box_accuracy: {len(preds)} preds but {len(gts)} gts")
    if not gts:
        return NAN
    return sum(p is not None and box_iou(p, g) >= threshold for p, g in zip(preds, gts, strict=True)) / len(gts)


def _phrase_key(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _union_box(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def grounding_recall(
    preds: Sequence[Sequence[tuple[str, Sequence[Box]]]],
    gts: Sequence[Sequence[tuple[str, Sequence[Box]]]],
    threshold: float = 0.5,
) -> dict[str, float]:
    """Phrase grounding over ground-truth phrases, each a (phrase, boxes) pair; preds likewise, per image.

    A GT phrase is paired with the first predicted phrase of the same normalised text (lowercase, punctuation
    dropped). recall@1 ("any-box" protocol, as MDETR on Flickr30k Entities): the pair's first predicted box has
    IoU >= threshold with any GT box of the phrase. acc@0.5 ("merged-box" protocol): the union box of the predicted
    boxes has IoU >= threshold with the union box of the GT boxes. An unpaired GT phrase is a miss. NaN when there
    are no GT phrases.
    """
    if len(preds) != len(gts):
        raise ValueError(f"grounding_recall: {len(preds)} preds but {len(gts)} gts")
    hits_any = hits_merged = total = 0
    for pred, gt in zip(preds, gts, strict=True):
        by_key: dict[str, Sequence[Box]] = {}
        for phrase, boxes in pred:
            if boxes:
                by_key.setdefault(_phrase_key(phrase), boxes)
        for phrase, gt_boxes in gt:
            if not gt_boxes:
                continue
            total += 1
            boxes = by_key.get(_phrase_key(phrase))
            if not boxes:
                continue
            hits_any += any(box_iou(boxes[0], g) >= threshold for g in gt_boxes)
            hits_merged += box_iou(_union_box(boxes), _union_box(gt_boxes)) >= threshold
    if total == 0:
        return {"recall@1": NAN, "acc@0.5": NAN}
    return {"recall@1": hits_any / total, "acc@0.5": hits_merged / total}


# --------------------------------------------------------------------------------------------------------------------
# captions


# Stanford PTBTokenizer (what pycocoevalcap runs in Java) lower-cased output, then its punctuation list removed.
# We reproduce the parts that occur in captions: contractions split off, brackets as -lrb- etc. (the reference keeps
# these because its punctuation list is upper-case), % and $ split off, quotes/dashes/sentence punctuation dropped,
# abbreviations such as "u.s." and numbers such as "3.5" / "2,000" kept whole.
_PTB_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'m|'ll|'ve|'d)$")
_CONTRACTION_TAILS = {"n't", "'s", "'re", "'m", "'ll", "'ve", "'d"}
_ABBREV = re.compile(r"^([a-z]\.)+$")


def caption_tokens(text: str) -> str:
    """Lower-cased, space-joined tokens of a caption, matching pycocoevalcap's PTBTokenizer on ordinary English."""
    t = text.lower().replace("\n", " ").replace("\u2019", "'")
    for ch in '"\u2018\u201c\u201d\u2013\u2014\u2026':
        t = t.replace(ch, " ")
    for b, r in _BRACKETS.items():
        t = t.replace(b, f" {r} ")
    t = re.sub(r"[%$]", lambda m: f" {m.group(0)} ", t)
    t = re.sub(r"-{2,}|\.{3,}", " ", t)
    out: list[str] = []
    for tok in t.split():
        if tok not in _CONTRACTION_TAILS:
            tok = tok.lstrip("`'")
        tok = tok.rstrip(",;:!?'`")
        if tok.endswith(".") and not _ABBREV.match(tok):
            tok = tok.rstrip(".")
        m = _CONTRACTION.match(tok)
        parts = [m.group(1), m.group(2)] if m else [tok]
        out.extend(p for p in parts if p and p not in _PTB_PUNCT)
    return " ".join(out)


CAPTION_SKIPPED = {
    "METEOR": "skipped: needs Java (java=True / --java)",
    "SPICE": "skipped: needs CoreNLP models (not downloaded)",
}


def caption_metrics(preds: Sequence[str], refs: Sequence[Sequence[str]], java: bool = False) -> dict[str, float | str]:
    """Corpus CIDEr-D and BLEU-1..4 (pycocoevalcap scorers) over per-item prediction and reference captions.

    Tokenisation is `caption_tokens` (Java-free PTB equivalent). CIDEr is on pycocoevalcap's scale (x10: identical
    captions score 10 when their n-grams are not shared by every image; its IDF is computed over this corpus, so a
    single-image corpus scores 0). METEOR runs only when java=True and a `java` binary exists, else it is reported
    as a "skipped: ..." string, like SPICE always. NaN for no items.
    """
    if len(preds) != len(refs):
        raise ValueError(f"caption_metrics: {len(preds)} preds but {len(refs)} reference lists")
    if any(len(r) == 0 for r in refs):
        raise ValueError("caption_metrics: every prediction needs at least one reference caption")
    out: dict[str, float | str] = {}
    if not preds:
        out.update({"CIDEr": NAN, "BLEU-1": NAN, "BLEU-2": NAN, "BLEU-3": NAN, "BLEU-4": NAN})
        out.update(CAPTION_SKIPPED)
        return out
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:  # pragma: no cover
        raise ImportError("fiore.eval needs pycocoevalcap: pip install 'fiore[eval]'") from e
    res = {i: [caption_tokens(p)] for i, p in enumerate(preds)}
    gts = {i: [caption_tokens(r) for r in rs] for i, rs in enumerate(refs)}
    with contextlib.redirect_stdout(io.StringIO()):
        cider, _ = Cider().compute_score(gts, res)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["CIDEr"] = float(cider)
    out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    out.update(CAPTION_SKIPPED)
    if java and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])  # its __del__ stops the Java process
    return out


# --------------------------------------------------------------------------------------------------------------------
# OCR


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (unit costs), one numpy row per element of `a`."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    vocab: dict = {}
    bi = np.array([vocab.setdefault(x, len(vocab)) for x in b])
    row = np.arange(len(b) + 1)
    steps = np.arange(len(b) + 1)
    for x in a:
        xi = vocab.get(x, -1)
        # deletion (row + 1) and substitution (diagonal + cost); insertions are a running min along the row:
        # new[j] = min_k(cand[k] + j - k) = j + cummin(cand - k)
        cand = np.empty_like(row)
        cand[0] = row[0] + 1
        cand[1:] = np.minimum(row[1:] + 1, row[:-1] + (bi != xi))
        row = steps + np.minimum.accumulate(cand - steps)
    return int(row[-1])


def ocr_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """exact_match (after stripping), CER and WER: corpus edit distance / reference length, on characters and on
    whitespace-split words. Rates can exceed 1 (many insertions). NaN for no items."""
    if len(preds) != len(refs):
        raise ValueError(f"ocr_metrics: {len(preds)} preds but {len(refs)} refs")
    if not refs:
        return {"exact_match": NAN, "CER": NAN, "WER": NAN}
    exact = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / len(refs)
    c_err = sum(edit_distance(p.strip(), r.strip()) for p, r in zip(preds, refs, strict=True))
    c_len = sum(len(r.strip()) for r in refs)
    w_err = sum(edit_distance(p.split(), r.split()) for p, r in zip(preds, refs, strict=True))
    w_len = sum(len(r.split()) for r in refs)

    def rate(err: int, n: int) -> float:
        return err / n if n else (0.0 if err == 0 else NAN)

    return {"exact_match": exact, "CER": rate(c_err, c_len), "WER": rate(w_err, w_len)}


def ocr_region_f1(
    preds: Sequence[Sequence[tuple[Sequence[float], str]]],
    gts: Sequence[Sequence[tuple[Sequence[float], str]]],
    sizes: Sequence[tuple[int, int]],
    threshold: float = 0.5,
) -> dict[str, float]:
    """OCR with regions, per image lists of (quad x1..y4, text). A prediction is a true positive when it is matched
    one-to-one (greedy, highest IoU first) to a GT line whose quad overlaps it with mask IoU >= threshold and whose
    text equals it after stripping. Reports precision, recall, F1, and F1_det (the same matching ignoring text).
    F1 is 0 when either side is empty and NaN when both are."""
    if not (len(preds) == len(gts) == len(sizes)):
        raise ValueError(f"ocr_region_f1: {len(preds)} preds, {len(gts)} gts, {len(sizes)} sizes")
    mask = _mask_utils()
    tp = tp_det = n_pred = n_gt = 0
    for pred, gt, (w, h) in zip(preds, gts, sizes, strict=True):
        n_pred, n_gt = n_pred + len(pred), n_gt + len(gt)
        if not pred or not gt:
            continue
        p_rle = [polygons_rle([q], int(w), int(h)) for q, _ in pred]
        g_rle = [polygons_rle([q], int(w), int(h)) for q, _ in gt]
        iou = np.asarray(mask.iou(p_rle, g_rle, [0] * len(g_rle))).reshape(len(pred), len(gt))
        same = np.array([[p.strip() == g.strip() for _, g in gt] for _, p in pred])
        tp += _greedy_matches(np.where(same, iou, 0.0), threshold)
        tp_det += _greedy_matches(iou, threshold)

    def f1(t: int) -> float:
        if n_pred == 0 and n_gt == 0:
            return NAN
        return 2 * t / (n_pred + n_gt)

    precision = tp / n_pred if n_pred else (NAN if n_gt == 0 else 0.0)
    recall = tp / n_gt if n_gt else NAN
    return {"precision": precision, "recall": recall, "F1": f1(tp), "F1_det": f1(tp_det)}


def _greedy_matches(iou: np.ndarray, threshold: float) -> int:
    """Number of one-to-one pairs taken greedily by descending IoU, each with IoU >= threshold."""
    iou = iou.copy()
    n = 0
    while iou.size and iou.max() >= threshold:
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        iou[i, :] = -1
        iou[:, j] = -1
        n += 1
    return n


# --------------------------------------------------------------------------------------------------------------------
# VQA and classification

# Normalisation of the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py as of its last fix, a013f00, 2021):
# punctuation dropped or turned into a space, periods not in numbers dropped, number words to digits, articles
# dropped, apostrophe-less contractions restored. tests/test_metrics.py holds that script's outputs on many cases.
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_DIGITS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_CONTRACTED = (
    "ain't aren't can't couldn't could've didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't shouldn't "
    "should've somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there're there's they'd they'll they're they've 'twas wasn't weren't we've what'll what're what's what've "
    "when's where'd where's where've who'd who'll who's who've why'll why're why's won't wouldn't would've y'all "
    "you'd you'll you're you've couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've "
    "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'd've "
    "y'all'll you'd've 'ow's'at"
).split()


def _contraction_keys(form: str) -> list[str]:
    """The spellings the official table restores to `form`: without its apostrophe, or, where it has several,
    without any one of them. ("im", "ive", "id", "shes", "lets", "wed", "shell" stay: the official table's keys for
    them are capitalised or absent, and "shell" and "wed" are words.)"""
    at = [i for i, ch in enumerate(form) if ch == "'"]
    if len(at) == 1:
        return [form.replace("'", "")]
    return [form[:i] + form[i + 1 :] for i in at]


_VQA_CONTRACTIONS = {key: form for form in _VQA_CONTRACTED for key in _contraction_keys(form)}
_VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table has this one backwards; kept for parity


def normalize_vqa_answer(text: str) -> str:
    """VQAv2 answer normalisation (official processPunctuation + processDigitArticle)."""
    text = _vqa_plain(text)
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _VQA_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_DIGITS.get(w, w) for w in out.lower().split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """VQAv2 accuracy, averaged over questions, as the official script computes it: with k annotator answers, for
    each answer i left out, acc_i = min(1, #other answers equal to the prediction / 3), averaged over i. Prediction and
    answers go through `normalize_vqa_answer` only when the answers disagree; when all agree the official script
    compares the prediction as written (stripped), so "Red." against ten "red" scores 0 there, and here.
    Generalised for small k (custom data): the divisor is min(3, k - 1), and k = 1 is an exact match after
    normalisation. NaN for no questions."""
    if len(preds) != len(answers):
        raise ValueError(f"vqa_accuracy: {len(preds)} preds but {len(answers)} answer lists")
    if not preds:
        return NAN
    total = 0.0
    for pred, gts in zip(preds, answers, strict=True):
        if not gts:
            raise ValueError("vqa_accuracy: a question has no ground-truth answers")
        p = _vqa_plain(pred)
        norm = [_vqa_plain(a) for a in gts]
        if len(norm) == 1 or len(set(norm)) > 1:
            p, norm = normalize_vqa_answer(p), [normalize_vqa_answer(a) for a in norm]
        if len(norm) == 1:
            total += float(p == norm[0])
            continue
        div = min(3, len(norm) - 1)
        matches = sum(a == p for a in norm)
        # leaving out a matching answer removes one match; leaving out another keeps all of them
        accs = [min(1.0, (matches - (a == p)) / div) for a in norm]
        total += sum(accs) / len(accs)
    return total / len(preds)


def _vqa_plain(text: str) -> str:
    """What the official script does to every answer before comparing: newlines and tabs to spaces, stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _label_key(s: str) -> str:
    return " ".join(s.lower().split())


def top1_accuracy(preds: Sequence[str | None], labels: Sequence[str]) -> float:
    """Fraction of predicted labels equal to the ground truth (case- and whitespace-insensitive). NaN for none."""
    if len(preds) != len(labels):
        raise ValueError(f"top1_accuracy: {len(preds)} preds but {len(labels)} labels")
    if not labels:
        return NAN
    return sum(p is not None and _label_key(p) == _label_key(g) for p, g in zip(preds, labels, strict=True)) / len(
        labels
    )


def is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)
