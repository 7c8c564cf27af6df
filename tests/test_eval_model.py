"""`fiore eval` end to end with a real (tiny, random) model saved as a checkpoint, on a generated dataset.

Random weights give meaningless outputs, so the checks are about the pipeline: every example gets a prediction
through the real engine (no errors), metrics are in range, truncation is reported, and the files are written.
"""

from __future__ import annotations

import json
import math

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
        for key in t["headline"]:
            value = t["metrics"][key]
            assert value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0), (name, key)
    lines = [json.loads(x) for x in (out.parent / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4
    assert all("prediction" in item for x in lines for item in x["items"])
