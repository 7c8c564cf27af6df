"""A command whose optional dependency is missing stops before any work, with the pip line that installs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fiore.cli
from fiore.cli import app
from fiore.data.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def without(monkeypatch):
    """Make the named top-level modules look uninstalled to fiore.extras."""
    real = importlib.util.find_spec

    def hide(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing extra was reported")

    monkeypatch.setattr(fiore.cli, "_load_florence", no_model)
    return hide


def test_serve_without_fastapi_names_the_extra(without):
    without("fastapi")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1 and "pip install 'fiore[serve]'" in result.output and "fastapi" in result.output


def test_eval_checks_the_metrics_it_will_need(without, tmp_path):
    write_dataset(tmp_path / "data", 2, seed=0)
    without("pycocotools", "pycocoevalcap")
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--tasks", "od,caption"])
    assert result.exit_code == 1 and "pycocotools, pycocoevalcap: pip install 'fiore[eval]'" in result.output
    # VQA needs neither: it gets as far as loading the model
    with pytest.raises(AssertionError, match="model was loaded"):
        CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--tasks", "vqa"], catch_exceptions=False)


def test_train_with_lora_or_coco_metrics_stops_before_any_work(without, tmp_path):
    without("peft", "pycocotools")
    smoke = str(ROOT / "configs" / "smoke.toml")
    out = tmp_path / "run"
    finetune = str(ROOT / "configs" / "finetune.toml")
    args = ["train", finetune, "--data", str(tmp_path / "none"), "--set", f"train.out_dir={out}", "--set", "lora.r=4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "pip install 'fiore[finetune]'" in result.output
    result = CliRunner().invoke(app, ["train", smoke, "--set", f"train.out_dir={out}", "--set", "train.eval_every=0"])
    assert result.exit_code == 1 and "pip install 'fiore[eval]'" in result.output
    assert not out.exists()


def test_export_without_onnxruntime_names_the_extra(without, tmp_path):
    without("onnxruntime")
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "onnx", "shipped", str(out)])
    assert result.exit_code == 1 and "onnxruntime: pip install 'fiore[export]'" in result.output
    assert not out.exists()
