"""Files fiore writes get the mode the umask gives new files (not mkstemp's / safetensors' private 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from fiore.checkpoint import save_checkpoint
from fiore.config import preset
from fiore.convert import convert
from fiore.label import write_json_atomic
from fiore.model import FlorenceModel


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_labels_and_conversions_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    config = preset("tiny").replace(contrastive_dim=8, text={"vocab_size": 300})
    native = save_checkpoint(FlorenceModel(config), config, tmp_path / "native")
    write_json_atomic(tmp_path / "labels.json", {"images": []})
    convert(native, tmp_path / "original", "original")
    written = [native / "model.safetensors", native / "contrastive.safetensors", native / "config.json",
               tmp_path / "labels.json", tmp_path / "original" / "model.safetensors"]  # fmt: skip
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in written} == {
        str(p.relative_to(tmp_path)): oct(expected) for p in written
    }
