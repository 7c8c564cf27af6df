"""`fiore export onnx`: the published Florence-2 ONNX layout, checked in onnxruntime against fiore (features and
logits within 1e-4, greedy tokens equal) and by a real client, transformers.js in Node, captioning like fiore."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import fiore
from fiore.cli import app
from fiore.data.synthetic import make_sample
from fiore.export import GRAPHS, OnnxFlorence, check_export

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "tests" / "js"
HELD_OUT_SEED = 3000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped model exported through the CLI (its own check included)."""
    out = tmp_path_factory.mktemp("onnx") / "shipped"
    result = CliRunner().invoke(app, ["export", "onnx", "shipped", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_cli_writes_the_published_layout_and_checks_it(exported):
    out, output = exported
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    graphs = {f"onnx/{name}.onnx" for name in GRAPHS}
    assert graphs | {"config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    assert "greedy tokens equal" in output, output
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 256, "width": 256} and pre["task_prompts_without_inputs"]["<OD>"]
    assert pre["tasks_answer_post_processing_type"]["<OD>"] == "description_with_bboxes"


def test_graphs_are_named_as_transformers_js_reads_them(exported):
    import onnx

    out, _ = exported
    decoder = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.input}
    outputs = [o.name for o in decoder.output]
    layers = json.loads((out / "config.json").read_text())["text_config"]["decoder_layers"]
    heads = json.loads((out / "config.json").read_text())["text_config"]["decoder_attention_heads"]
    assert {"inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"} <= set(inputs)
    for i in range(layers):
        assert inputs[f"past_key_values.{i}.decoder.key"][:3] == ["batch_size", heads, "past_decoder_sequence_length"]
        assert inputs[f"past_key_values.{i}.encoder.value"][:3] == ["batch_size", heads, "past_encoder_sequence_length"]
    assert outputs[0] == "logits" and len(outputs) == 1 + 4 * layers and outputs[1] == "present.0.decoder.key"
    vision = onnx.load(str(out / "onnx" / "vision_encoder.onnx"), load_external_data=False).graph
    assert [i.name for i in vision.input] == ["pixel_values"] and [o.name for o in vision.output] == ["image_features"]


def test_onnxruntime_answers_as_fiore(exported):
    out, _ = exported
    image = make_sample(HELD_OUT_SEED, 0).read_image()
    report = check_export(out, None, image, task="caption", max_new_tokens=40)
    assert report["vision_max_abs_diff"] < 1e-4 and report["logits_max_abs_diff"] < 1e-4, report
    assert report["tokens_equal"] and len(report["fiore_tokens"]) > 5, report
    # batches: two images through the vision encoder and the encoder at once
    florence, runner = fiore.load(), OnnxFlorence(out)
    images = [make_sample(HELD_OUT_SEED, i).read_image() for i in (1, 2)]
    pixel_values = florence.processor.pixel_values(images)
    ids, _ = florence.processor.prompt_ids(["<OD>"] * 2)
    hidden, _ = runner.encode(pixel_values.numpy(), ids.numpy())
    with torch.inference_mode():
        want, _ = florence.model.encode(florence.model.encode_image(pixel_values), ids)
    assert np.abs(hidden - want.numpy()).max() < 1e-4


def test_transformers_js_captions_the_export_with_fiores_tokens(exported, tmp_path):
    out, _ = exported
    node, package = shutil.which("node"), JS / "node_modules" / "@huggingface" / "transformers"
    if node is None or not package.is_dir():
        pytest.skip("needs Node.js and `npm ci --ignore-scripts` in tests/js (.ci/run does both)")
    # Given at the model's size, the image is not resized by either side: transformers.js resizes with its own
    # bicubic, which differs from PIL's by up to 1.2 normalised units at edges (docs/performance.md).
    size = fiore.load().config.image_size
    image_path = tmp_path / "scene.png"
    Image.open(ROOT / "examples" / "scene.png").convert("RGB").resize(size[::-1], Image.Resampling.BICUBIC).save(
        image_path
    )
    run = subprocess.run(
        [node, "caption.mjs", str(out), str(image_path), "<CAPTION>", "40"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    report = check_export(out, None, Image.open(image_path), task="caption", max_new_tokens=40)
    assert answer["ids"][0] == 2  # the decoder start token, which transformers.js returns with the generated ids
    assert answer["ids"][1:] == report["fiore_tokens"], (answer, report["fiore_tokens"])
    assert len(report["fiore_tokens"]) > 5
