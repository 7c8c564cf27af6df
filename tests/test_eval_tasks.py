"""fiore.eval with the real task catalogue: every task has a metric, and an oracle engine that answers with the
ground truth passed through the task's own serializer and parser (quantisation included) scores (nearly) 1."""

from __future__ import annotations

import math

import pytest
from fake_florence import FakeEngine

import fiore.tasks
from fiore.data.sample import QA, Grounding, Object, Ref, Sample, TextItem
from fiore.eval import evaluate
from fiore.eval.scorers import Scorer

pytest.importorskip("pycocotools")


def _rect(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def _sample(i: int) -> Sample:
    W, H = 200, 160
    dx = 7 * i
    star = Object((10 + dx, 20, 60 + dx, 70), "star", [_rect(10 + dx, 20, 60 + dx, 70)], f"a big red star {i}")
    circle = Object((100, 80, 150, 130), "circle", [_rect(100, 80, 150, 130)], "a small blue circle")
    words = [
        TextItem("HELLO", (20, 120, 80, 120, 80, 140, 20, 140), (20, 120, 80, 140)),
        TextItem(f"NO {i}", (100, 20, 160, 20, 160, 40, 100, 40), (100, 20, 160, 40)),
    ]
    return Sample(
        image_id=f"img{i}",
        width=W,
        height=H,
        image=("image", i),
        objects=[star, circle],
        captions={
            "caption": f"a red star and a blue circle number {i}",
            "detailed_caption": f"the image shows a red star on the left and a blue circle {i}",
            "more_detailed_caption": f"a large red star sits left of a small blue circle on gray, scene {i}",
        },
        texts=words,
        refs=[Ref("the red star", 0), Ref("the blue circle", 1)],
        groundings=[
            Grounding("a red star and a blue circle", [("a red star", [star.box]), ("a blue circle", [circle.box])])
        ],
        qas=[QA("what colour is the star?", "red", answers=["red"] * 10)],
        label="two shapes",
        vocabulary=["star", "circle"],
    )


class OracleFlorence(FakeEngine):
    """Answers every request with the ground truth as the model would emit it: serialize, then parse."""

    def __init__(self, samples):
        super().__init__()
        self.by_image = {s.image: s for s in samples}

    def answer(self, image, request):
        task, sample = request.task, self.by_image[image]
        for ex in task.examples(sample):
            if ex.text == request.text and (request.region is None or tuple(ex.region) == request.region):
                raw = "</s><s>" + task.serialize(ex.target, sample.size) + "</s>"
                return task.parse(raw, sample.size)
        raise LookupError(f"no example of {task.name} for input {request.text!r} {request.region!r}")


def test_every_catalogue_task_has_a_metric():
    missing = [t.name for t in fiore.tasks.all() if not (isinstance(t.scorer, type) and issubclass(t.scorer, Scorer))]
    assert not missing, f"tasks without a default metric: {missing}"


def test_oracle_engine_scores_near_one_on_every_task(tmp_path):
    samples = [_sample(i) for i in range(4)]
    report = evaluate(OracleFlorence(samples), samples, None, batch_size=3, progress=False)
    assert set(report.tasks) == set(fiore.tasks.names())
    for name, t in report.tasks.items():
        assert t.errors == 0, (name, t.error_messages)
        assert t.examples > 0, name
        for key in t.headline:
            value = t.metrics[key]
            assert not math.isnan(value), (name, key)
            if key in ("CER", "WER"):
                assert value == 0.0, (name, key)
            elif key == "CIDEr":
                assert value > 5.0, (name, value)  # x10 scale; shared n-grams across images lower the IDF
            else:
                assert value > 0.85, (name, key, value)  # quantisation to 1000 bins costs a little IoU
    assert report.tasks["od"].metrics["mAP50"] == pytest.approx(1.0)
    assert report.tasks["caption"].metrics["BLEU-4"] == pytest.approx(1.0)
    assert report.tasks["vqa"].metrics["accuracy"] == 1.0
    assert report.tasks["caption_to_phrase_grounding"].metrics["recall@1"] == 1.0
    assert report.tasks["ocr_with_region"].metrics["F1"] == 1.0
    report.save(tmp_path / "report.json")
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == sum(t.samples for t in report.tasks.values())


def test_oracle_engine_on_synthetic_scenes():
    """The synthetic world's samples (exact masks, OCR quads, refs, groundings, VQA) go through every scorer."""
    from fiore.data.synthetic import make_sample

    samples = [make_sample(7, i) for i in range(3)]
    for s in samples:
        s.image = ("image", s.image_id)  # the oracle needs no pixels
    report = evaluate(OracleFlorence(samples), samples, None, batch_size=2, progress=False)
    assert all(t.errors == 0 for t in report.tasks.values()), {n: t.error_messages for n, t in report.tasks.items()}
    head = report.headline()
    assert head["od/mAP50"] == pytest.approx(1.0)
    assert head["referring_expression_segmentation/mIoU"] > 0.85
    assert head["ocr/CER"] == 0.0


class PartialOracle(OracleFlorence):
    """The ground truth on the images in `answered`, the empty answer ("</s><s></s>" parsed) on the others."""

    def __init__(self, samples, answered):
        super().__init__(samples)
        self.answered = set(answered)

    def answer(self, image, request):
        if image[1] in self.answered:
            return super().answer(image, request)
        return request.task.parse("</s><s></s>", self.by_image[image].size)


AP_HALF = 51 / 101  # COCO AP with every detection right and recall 0.5: precision 1 at 51 of the 101 recall points
BLEU_HALF = math.exp(-1)  # precision 1; half the reference length predicted -> brevity penalty exp(1 - r/c) = e^-1
BOXES_HALF = {"mAP": AP_HALF, "mAP50": AP_HALF, "AR100": 0.5}
# Answered on images 0 and 1 of 4, where every task's answers have the same size on each image.
HALF: dict[str, dict[str, float]] = {
    "od": BOXES_HALF,
    "open_vocabulary_detection": {**BOXES_HALF, "acc@0.5": 0.5},
    "region_proposal": {**BOXES_HALF, "AR1": 0.25},  # 2 objects per image, 1 detection counted
    # descriptions act as labels: the star's differs per image (4 categories of 1 object: AP 1, 1, 0, 0), the
    # circle's is shared (1 category of 4 objects, 2 found: AP_HALF)
    "dense_region_caption": {"mAP50": (1 + 1 + 0 + 0 + AP_HALF) / 5, "AR100": 0.5},
    **{
        n: {"mIoU": 0.5, "cIoU": 0.5, "acc@0.5": 0.5}
        for n in ("referring_expression_segmentation", "region_to_segmentation")
    },  # fmt: skip
    **{
        n: {"CIDEr": 5.0, **{f"BLEU-{k}": BLEU_HALF for k in (1, 2, 3, 4)}}  # CIDEr: the mean of 10 and 0 per item
        for n in ("caption", "detailed_caption", "more_detailed_caption", "region_to_description")
    },  # fmt: skip
    "caption_to_phrase_grounding": {"recall@1": 0.5, "acc@0.5": 0.5},
    **{n: {"exact_match": 0.5, "CER": 0.5, "WER": 0.5} for n in ("ocr", "region_to_ocr")},
    "ocr_with_region": {"precision": 1.0, "recall": 0.5, "F1": 2 / 3, "F1_det": 2 / 3},
    "vqa": {"accuracy": 0.5},
    **{n: {"top1": 0.5} for n in ("classify", "region_to_category")},
}
ERROR_RATES = ("CER", "WER")


def test_partial_and_empty_answers_score_their_known_values_on_every_task():
    assert set(HALF) == set(fiore.tasks.names())
    samples = [_sample(i) for i in range(4)]
    half = evaluate(PartialOracle(samples, {0, 1}), samples, None, batch_size=3, progress=False)
    empty = evaluate(PartialOracle(samples, ()), samples, None, batch_size=3, progress=False)
    for name, expected in HALF.items():
        assert half.tasks[name].errors == 0 and empty.tasks[name].errors == 0, name
        got = {k: half.tasks[name].metrics[k] for k in expected}
        assert got == pytest.approx(expected, abs=1e-6), name
        for key in {*expected, *half.tasks[name].headline}:
            assert empty.tasks[name].metrics[key] == (1.0 if key in ERROR_RATES else 0.0), (name, key)
