"""fiore.model.inference: the one step that prepares a model for inference. Strategies are chosen by measuring
them (cached per machine and model shape), forced by name, and change no answer beyond float32 rounding."""

from __future__ import annotations

import json

import pytest
import torch
from fake_florence import same_json, save_tiny_model
from PIL import Image

import fiore
from fiore.config import preset
from fiore.model import FlorenceModel
from fiore.model import inference as inf


def tiny() -> FlorenceModel:
    torch.manual_seed(0)
    return FlorenceModel(preset("tiny").replace(text={"vocab_size": 300}, image_size=(64, 64)))


def test_faster_picks_the_strategy_only_when_it_is_faster():
    import time

    def slow():
        time.sleep(0.002)

    def fast():
        pass

    assert inf._faster(slow, fast) is True
    assert inf._faster(fast, slow) is False


def test_calibration_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIORE_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(model):
        calls.append(model)
        return {name: name == "fused_decoder" for name in inf.STRATEGIES}

    monkeypatch.setattr(inf, "measure", fake_measure)
    model = tiny()
    assert inf.calibrate(model) == {name: name == "fused_decoder" for name in inf.STRATEGIES}
    assert inf.calibrate(model)["fused_decoder"] and len(calls) == 1  # the second answer came from the cache
    cached = json.loads((tmp_path / "strategies.json").read_text())
    (key,) = cached
    assert "threads" in key and "vision" in key  # per machine and model shape
    other = FlorenceModel(preset("tiny").replace(text={"vocab_size": 300}, image_size=(96, 96)))
    inf.calibrate(other)
    assert len(calls) == 2  # another shape is measured again
    prepared = inf.prepare_for_inference(tiny(), "auto")
    assert prepared.inference_strategies == ("fused_decoder",) and len(calls) == 2


def test_measure_gives_a_verdict_for_every_strategy():
    verdicts = inf.measure(tiny().eval())
    assert set(verdicts) == set(inf.STRATEGIES) and all(isinstance(v, bool) for v in verdicts.values())


def test_names_none_all_and_unknown():
    model = tiny()
    assert inf.resolve("none", model) == set() and inf.resolve("all", model) == set(inf.STRATEGIES)
    assert inf.resolve("fused_decoder, sliced_vision", model) == {"fused_decoder", "sliced_vision"}
    with pytest.raises(ValueError, match="unknown inference strategies.*warp_drive"):
        inf.resolve(["warp_drive"], model)


def test_only_cpu_float32_models_get_strategies():
    model = inf.prepare_for_inference(tiny().to(torch.bfloat16), "all")
    assert model.inference_strategies == () and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_prepared_and_plain_models_answer_alike(tmp_path):
    path = save_tiny_model(tmp_path / "tiny")
    image = Image.open(__import__("pathlib").Path(__file__).parents[1] / "examples" / "scene.png")
    tasks = ["caption", "od", "ocr_with_region", "region_proposal"]
    plain = fiore.load(path, strategies="none")
    prepared = fiore.load(path, strategies="all")
    assert plain.model.inference_strategies == () and len(prepared.model.inference_strategies) >= 2
    a = plain.run(image, tasks, max_new_tokens=12)
    b = prepared.run(image, tasks, max_new_tokens=12, num_beams=1)
    assert same_json({k: v.to_json() for k, v in a.items()}, {k: v.to_json() for k, v in b.items()}, 1e-3)
    beams_a = plain.predict(image, "caption", max_new_tokens=8, num_beams=3)
    beams_b = prepared.predict(image, "caption", max_new_tokens=8, num_beams=3)
    assert same_json(beams_a.to_json(), beams_b.to_json(), 1e-3)
    prepared.save(tmp_path / "again")  # a prepared model saves like any other (fused q/k/v are views)
    reloaded = fiore.load(tmp_path / "again", strategies="none")
    for (name, p), q in zip(plain.model.state_dict().items(), reloaded.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
