"""`fiore predict` and `fiore label` on a real tiny random-weight checkpoint (the path a user takes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_florence import same_json, save_tiny_model
from PIL import Image
from typer.testing import CliRunner

import fiore
from fiore.cli import app

SCENE = Path(__file__).parents[1] / "examples" / "scene.png"
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_predict_all_with_real_model(model_dir, tmp_path):
    out = tmp_path / "out"
    args = [
        "predict",
        str(SCENE),
        "--task",
        "all",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    ]
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    answer = json.loads((out / "scene.json").read_text())
    assert {"caption", "od", "ocr_with_region", "region_proposal"} <= set(answer)
    direct = fiore.load(model_dir).run(Image.open(SCENE), list(answer), max_new_tokens=4)  # what the library says
    assert same_json(answer, {k: v.to_json() for k, v in direct.items()}), answer
    assert Image.open(out / "scene.od.png").size == Image.open(SCENE).size
    assert "scene.png (356x314)" in r.output


def test_label_with_real_model_then_rerun(model_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (50 + 10 * i, 40), (60 * i, 120, 200)).save(folder / f"{i}.png")
    out = tmp_path / "labels.json"
    args = ["label", str(folder), "--model", str(model_dir), "--max-new-tokens", "6", "--out", str(out), "-b", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    coco = json.loads(out.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["0.png", "1.png", "2.png"]
    assert [im["width"] for im in coco["images"]] == [50, 60, 70]
    assert all(a["image_id"] in (1, 2, 3) and len(a["bbox"]) == 4 for a in coco["annotations"])
    r = runner.invoke(app, args)  # a finished run leaves no journal: rerunning relabels to the same answer
    assert r.exit_code == 0 and json.loads(out.read_text()) == coco
    assert "skipped" not in r.output
    (folder / "3.png").write_bytes(b"not an image")
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "3 images" in r.output and "1 image(s) skipped" in r.output
    journal = out.with_name(out.name + ".journal.jsonl")  # a journal left by a run with other options
    journal.write_text(json.dumps({"fiore_label_journal": 1, "task": "ocr", "text": None, "model": "x"}) + "\n")
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "same options or delete it" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_label_killed_mid_run_resumes_to_the_uninterrupted_answer(model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from fiore.label import journal_path

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + 5 * i, 36), (40 * i, 90, 250 - 40 * i)).save(folder / f"{i}.png")
    common = ["--model", str(model_dir), "--max-new-tokens", "6", "-b", "1"]
    reference = tmp_path / "reference.json"
    assert runner.invoke(app, ["label", str(folder), "--out", str(reference), *common]).exit_code == 0

    out = tmp_path / "labels.json"
    cmd = [sys.executable, "-m", "fiore.cli", "label", str(folder), "--out", str(out), *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    journal = journal_path(out)
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 3):  # header + 2 images
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists()
    done = journal.read_text().count("\n") - 1
    assert 2 <= done < 6
    r = runner.invoke(app, ["label", str(folder), "--out", str(out), *common])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text()) == json.loads(reference.read_text())
    assert not journal.exists()


def test_the_table_shows_truncation_and_file_names_as_written(tmp_path):
    """rich would read "[truncated]" and "[red]" as markup and drop them: the table prints them as text."""
    import shutil

    image = tmp_path / "scene[red].png"
    shutil.copy(SCENE, image)
    result = runner.invoke(app, ["predict", str(image), "--task", "caption", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "scene[red].png" in "".join(result.output.split())  # the title may wrap
    assert "[truncated]" in result.output


def test_max_pixels_is_an_option_of_predict_and_label(model_dir, tmp_path):
    small = ["--model", str(model_dir), "--max-pixels", "1000", "--max-new-tokens", "2"]
    r = runner.invoke(app, ["predict", str(SCENE), "--task", "caption", *small])
    assert r.exit_code != 0 and "--max-pixels" in "".join(r.output.split())  # the message names the option
    r = runner.invoke(app, ["predict", str(SCENE), "--task", "caption", "--model", str(model_dir), "--max-new-tokens",
                            "2", "--max-pixels", str(356 * 314)])  # fmt: skip
    assert r.exit_code == 0, r.output
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "small.png")
    Image.new("RGB", (40, 40)).save(folder / "big.png")
    out = tmp_path / "labels.json"
    r = runner.invoke(app, ["label", str(folder), "--out", str(out), "--model", str(model_dir), "--max-pixels", "500",
                            "--max-new-tokens", "2"])  # fmt: skip
    assert r.exit_code == 0 and "1 image(s) skipped" in r.output, r.output
