"""`fiore convert`: native <-> original checkpoint layouts round-trip exactly, with original key names."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fiore
from fiore.checkpoint import load_checkpoint, save_checkpoint
from fiore.cli import app
from fiore.model import FlorenceModel

runner = CliRunner()


def test_convert_round_trip(tmp_path):
    torch.manual_seed(0)
    config = fiore.preset("tiny").replace(text={"vocab_size": 1100}, image_size=(128, 96))
    model = FlorenceModel(config)
    save_checkpoint(model, config, tmp_path / "native")
    _, reference = load_checkpoint(tmp_path / "native")

    r = runner.invoke(app, ["convert", str(tmp_path / "native"), str(tmp_path / "orig"), "--to", "original"])
    assert r.exit_code == 0, r.output
    keys = set(load_file(str(tmp_path / "orig" / "model.safetensors")))
    for key in (
        "vision_tower.convs.0.proj.weight",
        "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight",
        "vision_tower.blocks.0.0.spatial_block.window_attn.norm.weight",
        "vision_tower.blocks.0.0.channel_block.channel_attn.norm.bias",
        "vision_tower.blocks.0.0.channel_block.ffn.fn.net.fc1.weight",
        "vision_tower.blocks.0.0.spatial_block.ffn.norm.weight",
        "vision_tower.blocks.0.0.spatial_block.conv1.fn.dw.weight",
        "image_projection",
        "image_proj_norm.weight",
        "image_pos_embed.row_embeddings.weight",
        "language_model.model.encoder.layers.0.self_attn.q_proj.weight",
        "language_model.lm_head.weight",
        "language_model.final_logits_bias",
    ):
        assert key in keys, key
    assert not any(k.startswith("model.") for k in keys)
    assert len(keys) == len(reference) + 4  # 3 tied aliases + final_logits_bias
    raw = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert raw["vision_config"]["dim_embed"] == list(config.vision.embed_dims) and "fiore_config" not in raw

    back_config, back = load_checkpoint(tmp_path / "orig")  # through the original-key regex table
    assert back_config.vision == config.vision and back_config.text == config.text
    assert back_config.image_size == (128, 96)
    assert back.keys() == reference.keys()
    assert all(torch.equal(back[k], reference[k]) for k in reference)

    r = runner.invoke(app, ["convert", str(tmp_path / "orig"), str(tmp_path / "native2")])
    assert r.exit_code == 0, r.output
    config2, again = load_checkpoint(tmp_path / "native2")
    assert config2.vision == config.vision and config2.image_size == (128, 96)
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_convert_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert r.exit_code == 1 and "config.json" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--to", "onnx"])
    assert r.exit_code == 2 and "unknown format 'onnx'" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "does not exist" in r.output
