"""`fiore eval` end to end on a generated dataset on disk: write_dataset -> read_dataset -> engine -> report files.

The engine here is an oracle (ground truth through each task's serializer and parser) so the numbers are known;
tests/test_eval_model.py runs the same command with a tiny random model.
"""

from __future__ import annotations

import json

import pytest
from fake_florence import FakeEngine
from typer.testing import CliRunner

import fiore.cli
import fiore.data.readers
import fiore.tasks
from fiore.data.readers import read_dataset
from fiore.data.synthetic import write_dataset
from fiore.eval import evaluate

pytest.importorskip("pycocotools")


class DiskOracle(FakeEngine):
    """Answers with the ground truth of the sample whose (already loaded) image it is given."""

    def __init__(self, samples):
        super().__init__()
        self.samples = samples

    def _sample(self, image):
        for s in self.samples:
            if s.image is image:
                return s
        raise LookupError("image of no known sample")

    def answer(self, image, request):
        task, s = request.task, self._sample(image)
        for ex in task.examples(s):
            if ex.text == request.text and (request.region is None or tuple(ex.region) == request.region):
                return task.parse("</s><s>" + task.serialize(ex.target, s.size) + "</s>", s.size)
        raise LookupError(f"no {task.name} example for {request.text!r} {request.region!r}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "synth", 4, seed=11)


def test_eval_on_dataset_read_from_disk(dataset):
    samples = read_dataset(dataset)
    report = evaluate(DiskOracle(samples), samples, "od,caption,vqa,ocr_with_region", batch_size=3, progress=False)
    assert all(t.errors == 0 for t in report.tasks.values())
    assert report.tasks["od"].metrics["mAP50"] == pytest.approx(1.0)
    assert report.tasks["vqa"].metrics["accuracy"] == 1.0
    assert report.tasks["ocr_with_region"].metrics["F1"] == 1.0
    assert all(s.image is None for s in samples)  # images read from disk are released after their batch


def test_fiore_eval_command(dataset, tmp_path, monkeypatch):
    samples = read_dataset(dataset)
    # the command reads the directory itself; hand it the oracle's own Sample objects so images can be recognised
    monkeypatch.setattr(fiore.data.readers, "read_dataset", lambda d: samples if str(d) == str(dataset) else None)
    monkeypatch.setattr(fiore.cli, "_load_florence", lambda model, device, *options: DiskOracle(samples))
    out = tmp_path / "run" / "report.json"
    result = CliRunner().invoke(
        fiore.cli.app,
        ["eval", "--data", str(dataset), "--tasks", "od,caption,region_to_category", "--limit", "3", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "od" in result.output and "mAP" in result.output  # the per-task tables
    report = json.loads(out.read_text())
    assert report["meta"]["n_samples"] == 3 and report["meta"]["data"] == str(dataset)
    assert report["tasks"]["od"]["metrics"]["mAP50"] == pytest.approx(1.0)
    assert report["tasks"]["region_to_category"]["metrics"]["top1"] == 1.0
    assert (out.parent / "report.md").read_text().startswith("# fiore evaluation")
    lines = (out.parent / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 3
    assert {json.loads(x)["task"] for x in lines} == {"od", "caption", "region_to_category"}


def test_fiore_eval_rejects_bad_arguments(dataset, tmp_path):
    runner = CliRunner()
    bad_task = runner.invoke(fiore.cli.app, ["eval", "--data", str(dataset), "--tasks", "od,nope"])
    assert bad_task.exit_code != 0 and "nope" in bad_task.output
    bad_data = runner.invoke(fiore.cli.app, ["eval", "--data", str(tmp_path), "--tasks", "od"])
    assert bad_data.exit_code != 0 and "fiore.jsonl" in bad_data.output  # names the files it looked for


def test_swapped_images_give_each_sample_the_next_ones_image(dataset, tmp_path, monkeypatch):
    samples = read_dataset(dataset)
    for s in samples:
        s.load_image()  # the oracle recognises images by identity
    monkeypatch.setattr(fiore.data.readers, "read_dataset", lambda d: samples)
    monkeypatch.setattr(fiore.cli, "_load_florence", lambda model, device, *options: DiskOracle(samples))
    out = tmp_path / "swapped.json"
    args = ["eval", "--data", str(dataset), "--tasks", "classify,vqa", "--swap-images", "--out", str(out)]
    result = CliRunner().invoke(fiore.cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["meta"]["swap_images"] is True
    # the oracle answers for the image it sees: sample i is scored against its own label with sample i+1's answer
    labels = [s.label for s in samples]
    expected = sum(labels[i] == labels[(i + 1) % len(labels)] for i in range(len(labels))) / len(labels)
    assert report["tasks"]["classify"]["metrics"]["top1"] == pytest.approx(expected)
    assert report["tasks"]["vqa"]["metrics"]["accuracy"] < 1.0


def test_zero_shot_evaluation_matches_the_embeddings(dataset, tmp_path):
    from fake_florence import save_tiny_model

    from fiore.eval.runner import evaluate_zero_shot

    florence = fiore.load(save_tiny_model(tmp_path / "m", contrastive_dim=16))
    samples = read_dataset(dataset)
    report = evaluate_zero_shot(florence, samples)
    labels = sorted({s.label for s in samples})
    texts = florence.embed_texts([florence.config.contrastive_template.format(x) for x in labels])
    images = florence.embed_images([s.load_image() for s in samples])
    best = (images @ texts.t()).argmax(1).tolist()
    expected = sum(labels[b] == s.label for b, s in zip(best, samples, strict=True)) / len(samples)
    assert report.examples == len(samples) and report.metrics["top1"] == pytest.approx(expected)
    assert report.metrics["candidates"] == len(labels)
