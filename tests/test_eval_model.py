"""`fiore eval` end to end with a real (tiny, random) model saved as a checkpoint, on a generated dataset.

A random model checks the pipeline: every example gets a prediction through the real engine (no errors), truncation
is reported, the files are written. The shipped model, whose answers score above zero, checks the numbers: each
metric of the report is recomputed from predictions.jsonl with the reference libraries called directly.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fiore.cli
from fiore.config import preset
from fiore.data.synthetic import write_dataset
from fiore.florence import Florence
from fiore.model import FlorenceModel
from fiore.tokenizer import Tokenizer

pytest.importorskip("pycocotools")

WORDS = "a red blue green star circle square triangle on the left right of small large text".split()
TASKS = "od,caption,region_to_category,classify"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    g = np.random.default_rng(0)
    tok = Tokenizer.train([" ".join(g.choice(WORDS, size=8)) for _ in range(300)], vocab_size=300)
    config = preset("tiny").replace(
        vision={"embed_dims": (16, 32, 32, 64), "num_heads": (1, 1, 2, 2), "num_groups": (1, 1, 2, 2),
                "depths": (1, 1, 1, 1), "projection_dim": 64},
        text={"vocab_size": tok.vocab_size, "d_model": 64, "encoder_layers": 1, "decoder_layers": 1,
              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128, "max_position_embeddings": 256},
        image_size=(64, 64),
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    Florence(FlorenceModel(config).eval(), config, tokenizer=tok).save(path)
    return path


@pytest.mark.slow  # ~15 s alone, 30+ s on a busy 2-core machine
def test_fiore_eval_with_a_tiny_random_model(checkpoint, tmp_path):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    out = tmp_path / "eval" / "report.json"
    args = ["eval", "--model", str(checkpoint), "--data", str(data), "--tasks", TASKS, "--limit", "2"]
    result = CliRunner().invoke(fiore.cli.app, args + ["--out", str(out), "--max-new-tokens", "8", "-b", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for name in TASKS.split(","):
        t = report["tasks"][name]
        assert t["errors"] == 0, (name, t["error_messages"])
        assert t["examples"] > 0 and t["samples"] == 2, name
        assert t["truncated"] > 0, name  # 8 new tokens are too few for a random model to stop on its own
    lines = [json.loads(x) for x in (out.parent / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4
    assert all("prediction" in item for x in lines for item in x["items"])


def _items(lines: list[dict], task: str) -> list[tuple[dict, dict]]:
    return [(line, item) for line in lines if line["task"] == task for item in line["items"]]


def _coco_map(pairs: list[tuple[dict, dict]]) -> dict[str, float]:
    """mAP / mAP50 by pycocotools on COCO files built here from the predicted and target boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections, names = [], [], [], {}
    for image_id, (line, item) in enumerate(pairs):
        images.append({"id": image_id, "width": line["width"], "height": line["height"]})
        for (x1, y1, x2, y2), label in zip(item["target"]["boxes"], item["target"]["labels"], strict=True):
            cat = names.setdefault(label, len(names) + 1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})  # fmt: skip
        p = item["prediction"]
        for (x1, y1, x2, y2), label, score in zip(p["boxes"], p["labels"], p["scores"], strict=True):
            if label in names:  # a label no target has cannot match (pycocotools would ignore its category)
                detections.append({"image_id": image_id, "category_id": names[label], "score": score,
                                   "bbox": [x1, y1, x2 - x1, y2 - y1]})  # fmt: skip
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in names.values()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections:
            return {"mAP": 0.0, "mAP50": 0.0}
        run = COCOeval(gt, gt.loadRes(detections), "bbox")
        run.evaluate(), run.accumulate(), run.summarize()
    return {"mAP": max(0.0, run.stats[0]), "mAP50": max(0.0, run.stats[1])}


@pytest.mark.slow  # ~10 s
def test_report_metrics_are_recomputed_from_the_written_predictions(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from fiore.eval.metrics import caption_tokens  # the Java PTB tokenizer's equal (tests/test_metrics.py)

    data = write_dataset(tmp_path / "data", 6, seed=2000)
    out = tmp_path / "eval" / "report.json"
    result = CliRunner().invoke(fiore.cli.app, ["eval", "--data", str(data), "--tasks", TASKS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())["tasks"]
    lines = [json.loads(x) for x in (out.parent / "predictions.jsonl").read_text().splitlines()]

    for name in ("classify", "region_to_category"):
        pairs = _items(lines, name)
        hits = [i["prediction"]["label"].strip().lower() == i["target"]["label"].lower() for _, i in pairs]
        assert tasks[name]["metrics"]["top1"] == pytest.approx(sum(hits) / len(hits), abs=1e-12), name
        assert tasks[name]["examples"] == len(pairs)
    assert tasks["classify"]["metrics"]["top1"] > 0  # the shipped model scores, so a report of zeros would fail

    pairs = _items(lines, "caption")
    preds = {k: [caption_tokens(i["prediction"]["text"])] for k, (_, i) in enumerate(pairs)}
    refs = {k: [caption_tokens(i["target"]["text"])] for k, (_, i) in enumerate(pairs)}
    cider, _ = Cider().compute_score(refs, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(refs, preds)
    metrics = tasks["caption"]["metrics"]
    assert cider > 0 and metrics["CIDEr"] == pytest.approx(cider, abs=1e-9)
    assert [metrics[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-9)

    pairs = _items(lines, "od")
    assert sum(len(i["prediction"]["boxes"]) for _, i in pairs) > 0  # something to score
    expected = _coco_map(pairs)
    assert {k: tasks["od"]["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-12)
