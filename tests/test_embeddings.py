"""Image/text embeddings, zero-shot classification and search (Python API and CLI) on a checkpoint with heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_florence import save_tiny_model
from PIL import Image
from typer.testing import CliRunner

import fiore
from fiore.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("heads"), contrastive_dim=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40 + 8 * i, 30), colour).save(d / f"{colour}[{i}].png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_embeddings_zero_shot_and_search_agree_with_each_other(model_dir, folder):
    florence = fiore.load(model_dir)
    paths = sorted(folder.glob("*.png"))
    images = florence.embed_images(paths)
    texts = florence.embed_texts(["a red star", "cross"])
    assert images.shape == (4, 32) and texts.shape == (2, 32)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(florence.embed_images(paths[1]), images[1:2], atol=1e-5, rtol=1e-5)

    ranked = florence.search("a red star", paths)
    sims = (images @ texts[0]).tolist()
    assert [p for p, _ in ranked] == [paths[i] for i in sorted(range(4), key=lambda i: -sims[i])]
    assert [s for _, s in ranked] == pytest.approx(sorted(sims, reverse=True), abs=1e-5)
    assert len(florence.search("a red star", paths, top_k=2)) == 2

    result = florence.zero_shot(paths[0], ["star", "cross", "disc"], template="a {}")
    probs = dict(result.ranking)
    assert sum(probs.values()) == pytest.approx(1.0)
    label_texts = florence.embed_texts(["a star", "a cross", "a disc"])
    best = int((images[0] @ label_texts.t()).argmax())
    assert result.label == ["star", "cross", "disc"][best] and result.score == max(probs.values())
    with pytest.raises(ValueError, match="distinct"):
        florence.zero_shot(paths[0], ["star", "star"])
    with pytest.raises(ValueError, match="contain"):
        florence.zero_shot(paths[0], ["star"], template="no slot")


def test_cli_search_and_zero_shot(model_dir, folder):
    r = runner.invoke(app, ["search", str(folder), "--text", "a red star", "--model", str(model_dir), "--top", "3"],
                      env={"COLUMNS": "200"})  # fmt: skip
    assert r.exit_code == 0, r.output
    listed = [line for line in r.output.splitlines() if ".png" in line]
    assert len(listed) == 3 and all("[" in line for line in listed)  # file names printed as they are, unescaped
    florence = fiore.load(model_dir)
    best = florence.search("a red star", sorted(folder.glob("*.png")))[0][0]
    assert best.name in listed[0]

    image = sorted(folder.glob("*.png"))[0]
    r = runner.invoke(app, ["zero-shot", str(image), "--labels", "star; cross", "--model", str(model_dir)],
                      env={"COLUMNS": "200"})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert florence.zero_shot(image, ["star", "cross"]).label in r.output.splitlines()[3]


def test_models_without_heads_refuse_clearly(folder, tmp_path):
    plain = save_tiny_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="no image-text heads"):
        fiore.load(plain).embed_texts("a star")
    r = runner.invoke(app, ["search", str(folder), "--text", "a star", "--model", str(plain)], env={"COLUMNS": "400"})
    assert r.exit_code != 0 and "no image-text heads" in r.output
    r = runner.invoke(app, ["search", str(Path(folder) / "..")])
    assert r.exit_code != 0
