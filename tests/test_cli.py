"""CLI commands predict / label / serve with a fake model: exit codes, outputs, errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fake_florence import FakeFlorence, answer
from PIL import Image
from typer.testing import CliRunner

import fiore
from fiore import tasks as registry
from fiore.cli import app

SCENE = Path(__file__).parents[1] / "examples" / "scene.png"
runner = CliRunner()


@pytest.fixture
def fake(monkeypatch):
    """`fiore.load` replaced by a fake; records the (path, device) it was asked for."""
    model = FakeFlorence()
    model.loaded = []

    def load(path=None, device="cpu", **_):
        model.loaded.append((path, device))
        return model

    monkeypatch.setattr(fiore, "load", load, raising=False)
    return model


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"}, **kwargs)


def test_predict_table_and_outputs(fake, tmp_path):
    r = invoke("predict", SCENE, "--task", "od", "--task", "caption", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    image = Image.open(SCENE).convert("RGB")
    caption = answer(image, "caption").text
    assert "scene.png (356x314)" in r.output and caption in r.output and "od" in r.output
    assert fake.loaded == [(None, "cpu")]  # no --model: the shipped default model
    saved = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert saved == {"od": answer(image, "od").to_json(), "caption": answer(image, "caption").to_json()}
    for task in ("od", "caption"):
        drawn = Image.open(tmp_path / "out" / f"scene.{task}.png")
        assert drawn.size == image.size
    assert fake.calls == [("od,caption", 1)]  # one engine call: the image is encoded once
    assert [r.max_new_tokens for r in fake.requests[0][0]] == [None, None]  # no cap: each task's own budget
    r = invoke("predict", SCENE, "--task", "od", "--max-new-tokens", "5")
    assert r.exit_code == 0 and [r.max_new_tokens for r in fake.requests[-1][0]] == [5]


def test_predict_all_inputs_and_coco(fake, tmp_path):
    other = tmp_path / "other.png"
    shutil.copy(SCENE, other)
    r = invoke(
        "predict", SCENE, other, "-t", "all", "-t", "caption_to_phrase_grounding", "--text", "a red star",
        "-t", "region_to_category", "--region", "10,20,100,120", "--out", tmp_path / "o", "--format", "coco",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    no_input = [t.name for t in registry.all() if t.inputs == "none"]
    assert fake.calls == [(",".join([*no_input, "caption_to_phrase_grounding", "region_to_category"]), 1)] * 2
    coco = json.loads((tmp_path / "o" / "coco.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["scene.png", "other.png"]
    tasks_seen = {a["task"] for a in coco["annotations"]}
    assert {"od", "caption", "caption_to_phrase_grounding", "ocr_with_region"} <= tasks_seen
    grounding = [a for a in coco["annotations"] if a["task"] == "caption_to_phrase_grounding"]
    assert grounding[0]["category_name"] == "a red star"
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert all(names[a["category_id"]] == a["category_name"] for a in coco["annotations"] if "category_id" in a)
    assert "a red star" in r.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["-t", "nope"], "unknown task 'nope'"),
        (["-t", "caption_to_phrase_grounding"], "needs a text input"),
        (["-t", "region_to_category"], "needs a region"),
        (["-t", "region_to_category", "--region", "1,2,3"], "four finite numbers"),
        (["-t", "region_to_category", "--region", "400,0,999,10"], "outside the 356x314 image"),
        (["-t", "od", "--format", "xml"], "unknown format 'xml'"),
    ],
)
def test_predict_bad_input_exits_2(fake, args, words):
    r = invoke("predict", SCENE, *args)
    assert r.exit_code == 2
    assert words in " ".join(r.output.split())
    assert fake.calls == []


def test_predict_bad_files(fake, tmp_path):
    r = invoke("predict", tmp_path / "missing.png")
    assert r.exit_code == 2 and "does not exist" in r.output
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = invoke("predict", bad, "-t", "od")
    assert r.exit_code == 2 and "bad.png" in r.output
    assert fake.calls == []


def test_model_load_error_is_reported(monkeypatch):
    def load(path=None, device="cpu", **_):
        raise ValueError(f"checkpoint directory {path} does not exist")

    monkeypatch.setattr(fiore, "load", load, raising=False)
    r = invoke("predict", SCENE, "-t", "od", "--model", "/no/such/dir")
    assert r.exit_code == 2 and "/no/such/dir" in r.output


def test_label_command(fake, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (30 + i, 20), (i * 80, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "labels.json"
    r = invoke("label", folder, "--task", "od", "--out", out, "--batch-size", "2", "--threshold", "0.4")
    assert r.exit_code == 0, r.output
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 3 and "3 images" in r.output
    assert all(a["score"] >= 0.4 for a in coco["annotations"])
    assert [n for _, n in fake.calls] == [2, 1]
    r = invoke("label", folder, "--task", "open_vocabulary_detection", "--text", "star", "--out", tmp_path / "ov.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ov.json").read_text())["categories"][0]["name"] == "star"
    for args, words in [
        (["--task", "region_to_category"], "needs a region per image"),
        (["--task", "caption_to_phrase_grounding"], "needs --text"),
        (["--task", "nope"], "unknown task"),
        (["--batch-size", "0"], "greater than or equal to 1"),
    ]:
        r = invoke("label", folder, *args, "--out", tmp_path / "x.json")
        assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("label", empty, "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "no images" in r.output
    assert not (tmp_path / "x.json").exists()


def test_serve_command_builds_config(fake, monkeypatch):
    import fiore.serve

    seen = {}
    monkeypatch.setattr(fiore.serve, "serve", lambda florence, host, port, config: seen.update(locals()))
    r = runner.invoke(
        app,
        [
            "serve",
            "--port",
            "9123",
            "--max-batch",
            "4",
            "--max-queue",
            "7",
            "--max-upload-mb",
            "1",
            "--model",
            "m",
            "--max-new-tokens",
            "32",
        ],
        env={"FIORE_API_KEY": "k"},
    )
    assert r.exit_code == 0, r.output
    assert seen["florence"] is fake and seen["port"] == 9123 and seen["host"] == "127.0.0.1"
    config = seen["config"]
    assert (config.max_batch, config.max_queue, config.max_upload_bytes, config.api_key) == (4, 7, 2**20, "k")
    assert config.max_new_tokens == 32
    assert fake.loaded == [("m", "cpu")]
