"""fiore.eval.runner with fake tasks and a fake engine (no model): metric wiring, batching, error accounting,
report files, and recomputing a metric from predictions.jsonl with pycocotools directly."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from dataclasses import dataclass

import pytest

import fiore.tasks
from fiore.data.sample import QA, Object, Sample
from fiore.eval import evaluate, headline_metrics
from fiore.eval.runner import resolve_tasks
from fiore.results import Boxes, Label, Polygons, Text

pytest.importorskip("pycocotools")


# ---------------------------------------------------------------------------------- fakes (tasks with real scorers)


@dataclass
class Example:
    text: str | None = None
    region: tuple | None = None
    target: object = None


def FakeTask(name, inputs, make):
    """The catalogue task `name` (its prompt rules and scorer) drawing its examples with `make`."""
    task = dataclasses.replace(fiore.tasks.get(name), _examples=make)
    assert task.inputs == inputs
    return task


def _od(s):
    return [Example(target=Boxes([list(o.box) for o in s.objects], [o.label for o in s.objects]))] if s.objects else []


def _caption(s):
    return [Example(target=Text(s.captions["caption"]))] if "caption" in s.captions else []


def _vqa(s):
    return [Example(text=qa.question, target=Text(qa.answer)) for qa in s.qas]


def _classify(s):
    return [Example(target=Label(s.label))] if s.label else []


def _r2s(s):
    return [Example(region=o.box, target=Polygons([o.polygons], [""])) for o in s.objects]


TASKS = [
    FakeTask("od", "none", _od),
    FakeTask("caption", "none", _caption),
    FakeTask("vqa", "text", _vqa),
    FakeTask("classify", "none", _classify),
    FakeTask("region_to_segmentation", "region", _r2s),
]
BY_NAME = {t.name: t for t in TASKS}


class BrokenImage(Sample):
    def load_image(self):
        raise ValueError("corrupt PNG")


def _sample(i: int) -> Sample:
    x = 10 + 5 * i
    objects = [Object((x, 10, x + 20, 40), "star", [[x, 10, x + 20, 10, x + 20, 40, x, 40]])]
    if i % 2:
        objects.append(Object((60, 60, 90, 80), "circle", [[60, 60, 90, 60, 90, 80, 60, 80]]))
    return Sample(
        image_id=i,
        width=100,
        height=100,
        image=("image", i),  # the fake engine recognises its sample by this token
        objects=objects,
        captions={"caption": f"a red star number {i} on a gray background"},
        qas=[QA(f"how many stars in image {i}?", "one", answers=["one", "1", "one", "one"])],
        label="shapes" if i % 3 else "stars",
    )


class FakeFlorence:
    """Answers with the ground truth (mode="perfect") or nothing (mode="empty"); can fail on chosen images.
    `calls` records, per predictor pass, the task names asked of each image."""

    def __init__(self, samples, mode="perfect", fail_on=()):
        self.by_image = {s.image: s for s in samples if not isinstance(s, BrokenImage)}
        self.mode, self.fail_on = mode, set(fail_on)
        self.calls, self.requests = [], []

    def predictor(self, **options):
        return FakePredictor(self)

    def answer(self, image, request):
        if image[1] in self.fail_on:
            raise RuntimeError(f"decoder exploded on {image}")
        sample = self.by_image[image]
        ex = next(
            e
            for e in BY_NAME[request.task.name].examples(sample)
            if e.text == request.text and (e.region is None or tuple(e.region) == request.region)
        )
        return self._answer(request.task.name, sample, ex)

    def _answer(self, name, sample, ex):
        if self.mode == "empty":
            return {
                "od": Boxes([], []),
                "caption": Text(""),
                "vqa": Text(""),
                "classify": Label(""),
                "region_to_segmentation": Polygons([], []),
            }[name]
        return ex.target


class FakePredictor:
    def __init__(self, florence):
        self.florence, self.images = florence, []

    def set_images(self, images):
        self.images = list(images)

    def predict(self, requests):
        f = self.florence
        f.calls.append([[r.task.name for r in reqs] for reqs in requests])
        f.requests += [r for reqs in requests for r in reqs]
        return [[f.answer(im, r) for r in reqs] for im, reqs in zip(self.images, requests, strict=True)]


# ------------------------------------------------------------------------------------------------------- tests


def test_perfect_predictions_score_one():
    samples = [_sample(i) for i in range(5)]
    report = evaluate(FakeFlorence(samples), samples, TASKS, batch_size=2, progress=False)
    m = {n: t.metrics for n, t in report.tasks.items()}
    assert m["od"]["mAP"] == pytest.approx(1.0)
    assert m["caption"]["BLEU-4"] == pytest.approx(1.0) and m["caption"]["CIDEr"] == pytest.approx(10.0)
    assert m["vqa"]["accuracy"] == pytest.approx(1.0)  # "one" == "1" after normalisation: 4 of 4
    assert m["classify"]["top1"] == 1.0
    assert m["region_to_segmentation"]["mIoU"] == pytest.approx(1.0)
    assert all(t.errors == 0 for t in report.tasks.values())
    assert report.tasks["region_to_segmentation"].examples == sum(len(s.objects) for s in samples)


def test_empty_predictions_score_zero():
    samples = [_sample(i) for i in range(4)]
    report = evaluate(FakeFlorence(samples, mode="empty"), samples, TASKS, progress=False)
    m = {n: t.metrics for n, t in report.tasks.items()}
    assert m["od"]["mAP"] == 0.0 and m["caption"]["CIDEr"] == 0.0 and m["vqa"]["accuracy"] == 0.0
    assert m["classify"]["top1"] == 0.0 and m["region_to_segmentation"]["mIoU"] == 0.0


def test_one_predictor_pass_per_image_batch_with_every_request():
    samples = [_sample(i) for i in range(5)]
    engine = FakeFlorence(samples)
    evaluate(engine, samples, TASKS, batch_size=2, progress=False)
    # one pass per batch of <= 2 images; 5 images -> 3 passes, each image asked every task in the same pass
    assert [len(call) for call in engine.calls] == [2, 2, 1]
    for i, names in enumerate(n for call in engine.calls for n in call):
        # region_to_segmentation once per object (odd images have two)
        assert names == ["od", "caption", "vqa", "classify"] + ["region_to_segmentation"] * (1 + i % 2), names


def test_bad_samples_are_counted_not_dropped():
    samples = [_sample(i) for i in range(6)]
    broken = BrokenImage(**{**vars(_sample(99)), "image_id": "broken", "image": None})
    samples.insert(2, broken)

    def bad_examples(s):
        if s.image_id == 4:
            raise KeyError("caption level missing")
        return _caption(s)

    tasks = [TASKS[0], FakeTask("caption", "none", bad_examples), TASKS[2]]
    engine = FakeFlorence(samples, fail_on={5})
    report = evaluate(engine, samples, tasks, batch_size=4, progress=False)
    od, cap, vqa = (report.tasks[n] for n in ("od", "caption", "vqa"))
    # the broken image is an error for every task; image 5 makes the model fail for every task
    assert od.errors == 2 and vqa.errors == 2 and cap.errors == 3
    assert any("corrupt PNG" in m for m in od.error_messages)
    assert any("decoder exploded" in m for m in vqa.error_messages)
    assert any("caption level missing" in m for m in cap.error_messages)
    # the other samples are still scored, perfectly
    assert od.examples == 5 and od.metrics["mAP"] == pytest.approx(1.0)
    assert cap.examples == 4 and vqa.metrics["accuracy"] == pytest.approx(1.0)
    # errors surface in JSON and Markdown
    js = report.to_json()["tasks"]["caption"]
    assert js["errors"] == 3 and len(js["error_messages"]) == 3
    assert "caption level missing" in report.to_markdown()


def test_report_files_and_recompute_from_predictions(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    samples = [_sample(i) for i in range(4)]

    class Noisy(FakeFlorence):
        def _answer(self, name, sample, ex):  # od: shift boxes of odd images, scores decreasing
            if name != "od":
                return super()._answer(name, sample, ex)
            d = 8 * (sample.image_id % 2)
            boxes = [[b[0] + d, b[1], b[2] + d, b[3]] for b in ex.target.boxes]
            return Boxes(boxes, ex.target.labels, [0.9 - 0.1 * k for k in range(len(boxes))])

    report = evaluate(Noisy(samples), samples, TASKS, limit=3, progress=False, meta={"model": "fake"})
    paths = report.save(tmp_path / "out" / "report.json")
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["n_samples"] == 3 and data["meta"]["model"] == "fake"
    assert "| od |" in paths["markdown"].read_text()
    lines = [json.loads(x) for x in paths["predictions"].read_text().splitlines()]
    assert len(lines) == 3 * len(TASKS)  # one line per sample and task
    assert {(x["image_id"], x["task"]) for x in lines} == {(i, t.name) for i in range(3) for t in TASKS}

    # recompute od mAP from predictions.jsonl alone, with pycocotools directly
    od = [x for x in lines if x["task"] == "od"]
    cats = {"star": 1, "circle": 2}
    gt = {"images": [], "annotations": [], "categories": [{"id": v, "name": k} for k, v in cats.items()]}
    res = []
    for x in od:
        gt["images"].append({"id": x["image_id"] + 1, "width": x["width"], "height": x["height"]})
        item = x["items"][0]
        for b, lab in zip(item["target"]["boxes"], item["target"]["labels"], strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": x["image_id"] + 1,
                    "category_id": cats[lab],
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        p = item["prediction"]
        for b, lab, sc in zip(p["boxes"], p["labels"], p["scores"], strict=True):
            res.append(
                {
                    "image_id": x["image_id"] + 1,
                    "category_id": cats[lab],
                    "score": sc,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert data["tasks"]["od"]["metrics"]["mAP"] == pytest.approx(ev.stats[0])
    assert 0 < ev.stats[0] < 1


def test_nan_metrics_are_null_in_json(tmp_path):
    samples = [_sample(0)]  # a single-image corpus: CIDEr is 0, mAP_small etc. are undefined (NaN)
    report = evaluate(FakeFlorence(samples), samples, [TASKS[0]], progress=False)
    assert math.isnan(report.tasks["od"].metrics["mAP_large"])
    data = json.loads(report.save(tmp_path / "r.json")["json"].read_text())
    assert data["tasks"]["od"]["metrics"]["mAP_large"] is None


def test_headline_metrics_flat_and_restores_training_mode():
    import torch

    samples = [_sample(i) for i in range(3)]
    engine = FakeFlorence(samples)
    engine.model = torch.nn.Linear(1, 1)
    engine.model.train()
    seen = []
    original = engine.answer

    def answer(image, request):
        seen.append(engine.model.training)
        return original(image, request)

    engine.answer = answer
    out = headline_metrics(engine, samples, TASKS)
    assert out["od/mAP"] == pytest.approx(1.0) and out["classify/top1"] == 1.0 and "caption/CIDEr" in out
    assert all(isinstance(v, float) for v in out.values())
    assert seen and not any(seen) and engine.model.training


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(FakeFlorence([]), [], TASKS, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="no tasks"):
        resolve_tasks([])


def test_max_new_tokens_is_forwarded_to_the_engine():
    samples = [_sample(i) for i in range(2)]
    engine = FakeFlorence(samples)
    report = evaluate(engine, samples, TASKS, progress=False, max_new_tokens=7)
    assert engine.requests and all(r.max_new_tokens == 7 for r in engine.requests)
    assert report.meta["max_new_tokens"] == 7
