"""Official checkpoints by repository id, resolved through huggingface_hub's cache (offline: no network here)."""

from __future__ import annotations

import pytest
import torch
from fake_florence import save_tiny_model
from typer.testing import CliRunner

import fiore
from fiore.checkpoint import CheckpointError
from fiore.cli import app

pytest.importorskip("huggingface_hub", reason="the hub extra (installed with the dev extra)")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub lays it out, holding acme/Florence-2-tiny at COMMIT."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--Florence-2-tiny"
    save_tiny_model(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / COMMIT


def test_a_cached_repository_id_loads_offline(hub_cache):
    by_id = fiore.load("acme/Florence-2-tiny")
    by_dir = fiore.load(hub_cache)
    assert str(by_id.source) == str(hub_cache)
    for a, b in zip(by_id.model.parameters(), by_dir.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        fiore.load("acme/not-cached")


def test_the_cli_takes_a_repository_id(hub_cache, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    result = CliRunner().invoke(
        app, ["predict", str(image), "--task", "caption", "--model", "acme/Florence-2-tiny", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0, result.output
    missing = CliRunner().invoke(app, ["predict", str(image), "--task", "caption", "--model", "acme/gone"])
    assert missing.exit_code != 0 and "HF_HUB_OFFLINE" in "".join(missing.output.split())
