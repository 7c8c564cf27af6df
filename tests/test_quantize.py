"""int8 on the CPU (`fiore.load(..., quantize="int8")`, `--quantize int8`): every linear quantized, answers close to
float32 on the shipped model, and a quantized model is never saved as if it held float weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_florence import save_tiny_model
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import fiore
from fiore.checkpoint import CheckpointError
from fiore.cli import app
from fiore.data.synthetic import make_sample

SCENE = Path(__file__).parents[1] / "examples" / "scene.png"
HELD_OUT_SEED = 3000


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_every_linear_becomes_int8_and_only_the_vision_strategy_stays(tiny_dir):
    florence = fiore.load(tiny_dir, strategies="all", quantize="int8")
    model = florence.model
    assert model.quantized == "int8" and florence.dtype == torch.float32
    float_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]  # incl. OneDNNLinear
    assert not float_linears, float_linears
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    assert len(quantized) > 20  # vision, projector, encoder, decoder, LM head
    assert set(model.inference_strategies) <= {"sliced_vision"}
    assert "int8" in repr(florence)
    result = florence.predict(Image.open(SCENE), "od", max_new_tokens=12)
    assert result.task == "od"


def teacher_forced(florence, images, prompt, targets) -> torch.Tensor:
    """Log-probabilities (B, t, V) of the model reading each target after the prompt."""
    proc, tok = florence.processor, florence.tokenizer
    ids, mask = proc.prompt_ids([prompt] * len(images))
    rows = [tok.frame(tok.encode(t)) for t in targets]
    t = min(len(r) for r in rows)
    decoder_ids = torch.tensor([[tok.eos_id, *r[: t - 1]] for r in rows])
    with torch.inference_mode():
        logits = florence.model(proc.pixel_values(images), ids, decoder_ids, mask)
    return logits.log_softmax(-1)


@pytest.fixture(scope="module")
def shipped_pair():
    return fiore.load(), fiore.load(quantize="int8")


def test_int8_reads_like_float32_on_the_shipped_model(shipped_pair):
    fp32, int8 = shipped_pair
    images = [make_sample(HELD_OUT_SEED, i).read_image() for i in range(8)]
    captions = [r.text for r in fp32.predict(images, "caption")]
    want = teacher_forced(fp32, images, "<CAPTION>", captions)
    got = teacher_forced(int8, images, "<CAPTION>", captions)
    kl = torch.nn.functional.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean().item()
    # The tiny model's captions have near-ties ("a red star" or "a red triangle"): int8 rounding may flip those, so
    # top-1 agreement is asked where float32 prefers its token by a clear margin (> 0.5 nats) only.
    top2 = want.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.5
    agree = (want.argmax(-1) == got.argmax(-1))[clear].float().mean().item()
    print(f"KL {kl:.4f}, agreement {agree:.3f} on {int(clear.sum())} of {clear.numel()} clear positions")
    assert kl < 0.01 and agree >= 0.98, (kl, agree)
    labels_fp32 = [r.label for r in fp32.predict(images, "classify")]
    labels_int8 = [r.label for r in int8.predict(images, "classify")]
    assert sum(a == b for a, b in zip(labels_fp32, labels_int8, strict=True)) >= 7, (labels_fp32, labels_int8)


def test_an_int8_model_is_not_saved(shipped_pair, tmp_path):
    _, int8 = shipped_pair
    target = tmp_path / "saved"
    with pytest.raises(CheckpointError, match=r"quantize='int8'.*nothing was written.*without quantize"):
        int8.save(target)
    assert not target.exists()


def test_unknown_or_misplaced_quantization_is_refused_before_loading(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="unknown quantization 'int4'; known: int8"):
        fiore.load(missing, quantize="int4")
    with pytest.raises(ValueError, match="runs on the CPU from float32 weights"):
        fiore.load(missing, device="cuda", quantize="int8")
    with pytest.raises(ValueError, match="runs on the CPU from float32 weights"):
        fiore.load(missing, dtype=torch.bfloat16, quantize="int8")


def test_cli_predict_takes_quantize(tiny_dir):
    runner = CliRunner()
    args = ["predict", str(SCENE), "--task", "caption", "--model", str(tiny_dir), "--max-new-tokens", "4"]
    r = runner.invoke(app, [*args, "--quantize", "int8"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "caption" in r.output
    r = runner.invoke(app, [*args, "--quantize", "int4"], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "unknown quantization 'int4'" in r.output
