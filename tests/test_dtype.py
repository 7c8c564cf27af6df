"""The opt-in half-precision path (`fiore.load(..., dtype=torch.bfloat16)`, `--dtype bfloat16`): plain modules in
bf16 on the CPU (no fp32 speed strategy), answers close to float32 on the shipped model, bad names refused."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from typer.testing import CliRunner

import fiore
from fiore.cli import app
from fiore.data.synthetic import make_sample

SCENE = Path(__file__).parents[1] / "examples" / "scene.png"


def test_bf16_runs_the_plain_modules_and_stays_close_to_fp32():
    fp32, bf16 = fiore.load(), fiore.load(dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.inference_strategies == ()  # the fp32 strategies stay off
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert type(bf16.model.lm_head).__name__ == "Float32Head"  # logits in fp32: bf16 flips greedy near-ties
    assert bf16.model.lm_head.weight_float32.dtype == torch.float32
    assert set(bf16.model.state_dict()) == set(fp32.model.state_dict())  # the fp32 copy is not saved
    with torch.inference_mode():
        hidden = torch.randn(2, 3, bf16.config.text.d_model, dtype=torch.bfloat16)
        assert bf16.model.logits(hidden).dtype == torch.float32
    images = [make_sample(3000, i).image for i in range(8)]
    a, b = (m.processor.pixel_values(images) for m in (fp32, bf16))
    with torch.inference_mode():
        fa, fb = fp32.model.encode_image(a), bf16.model.encode_image(b.to(torch.bfloat16))
    rel = float((fa - fb.float()).norm() / fa.norm())
    assert rel < 0.05, rel  # bf16 keeps ~3 significant digits; the image tokens agree to a few percent
    labels = [r.label for r in fp32.predict(images, "classify")]
    assert [r.label for r in bf16.predict(images, "classify")] == labels  # the answers that come from the image


def test_cli_dtype_option(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(SCENE), "--task", "od", "--dtype", "bf16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scene.json").read_text())["od"]["boxes"] is not None
    bad = CliRunner().invoke(app, ["predict", str(SCENE), "--dtype", "float8"])
    assert bad.exit_code == 2 and "unknown dtype 'float8'" in bad.output
    both = CliRunner().invoke(app, ["predict", str(SCENE), "--dtype", "bfloat16", "--quantize", "int8"])
    assert both.exit_code == 2 and "float32 weights" in " ".join(both.output.replace("│", " ").split())
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "red").save(image)
    shot = CliRunner().invoke(app, ["zero-shot", str(image), "--labels", "solid; stripes", "--dtype", "bfloat16"])
    assert shot.exit_code == 0, shot.output
