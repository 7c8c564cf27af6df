"""Sub-bin coordinates (`coords="expected"`): each location token's coordinate is the expected bin over the chosen
bin and its neighbours under the model's distribution, instead of the chosen bin's centre."""

from __future__ import annotations

import math

import pytest
import torch

import fiore
from fiore.data.synthetic import make_sample
from fiore.generate import GenerationConfig, _expected_bins, generate
from fiore.predictor import LOC_WINDOW, predict
from fiore.tasks import get as get_task
from fiore.tasks.locations import dequantize

LOC0 = 10  # location tokens at ids 10..1009 of a made-up 1020-token vocabulary
CONFIG = GenerationConfig(loc_token_start=LOC0, loc_window=2)


def logits_with(mass: dict[int, float], vocab: int = 1020) -> torch.Tensor:
    """One row of logits whose softmax puts `mass[bin]` on those location bins (and ~0 elsewhere)."""
    row = torch.full((1, vocab), -1e4)
    for b, p in mass.items():
        row[0, LOC0 + b] = math.log(p)
    return row


def test_a_one_hot_distribution_gives_the_chosen_bin():
    for b in (0, 1, 500, 998, 999):
        got = _expected_bins(logits_with({b: 1.0}), torch.tensor([LOC0 + b]), CONFIG)
        assert got.item() == pytest.approx(b)


def test_mass_on_a_neighbour_moves_the_coordinate_toward_it():
    got = _expected_bins(logits_with({500: 0.6, 501: 0.4}), torch.tensor([LOC0 + 500]), CONFIG)
    assert got.item() == pytest.approx(500.4, abs=1e-4)
    got = _expected_bins(logits_with({500: 0.5, 498: 0.25, 502: 0.25}), torch.tensor([LOC0 + 500]), CONFIG)
    assert got.item() == pytest.approx(500.0, abs=1e-4)  # symmetric mass: no shift
    # mass outside the window (another object's edge) is ignored
    got = _expected_bins(logits_with({500: 0.5, 900: 0.5}), torch.tensor([LOC0 + 500]), CONFIG)
    assert got.item() == pytest.approx(500.0, abs=1e-4)
    # at the edge the window stays inside 0..999
    got = _expected_bins(logits_with({0: 0.5, 1: 0.5}), torch.tensor([LOC0]), CONFIG)
    assert got.item() == pytest.approx(0.5, abs=1e-4)


def test_other_tokens_get_no_bin():
    logits = logits_with({5: 1.0}).repeat(2, 1)
    got = _expected_bins(logits, torch.tensor([3, LOC0 + 1000]), CONFIG)
    assert torch.isnan(got).all()


def test_a_window_needs_the_location_ids():
    with pytest.raises(ValueError, match="loc_token_start"):
        GenerationConfig(loc_window=2).validate(1)


def test_parsers_place_coordinates_at_the_sub_bin_positions():
    task = get_task("od")
    text = "</s><s>star<loc_100><loc_200><loc_300><loc_400></s>"
    pieces = ["</s>", "<s>", "star", "<loc_100>", "<loc_200>", "<loc_300>", "<loc_400>", "</s>"]
    logprobs = [(p, -0.1) for p in pieces]
    nan = float("nan")
    bins = [nan, nan, nan, 100.25, 199.5, 300.0, 400.75, nan]
    size = (1000, 500)
    plain = task.parse(text, size, token_logprobs=logprobs)
    refined = task.parse(text, size, token_logprobs=logprobs, token_bins=bins)
    assert plain.boxes == [[dequantize(100, 1000), dequantize(200, 500), dequantize(300, 1000), dequantize(400, 500)]]
    assert refined.boxes[0] == pytest.approx([100.75, 100.0, 300.5, 200.625])  # (bin + 0.5) * size / 1000
    assert refined.labels == plain.labels and refined.scores == plain.scores
    # a location token without a bin leaves its instance at the bin centres
    partial = task.parse(text, size, token_logprobs=logprobs, token_bins=bins[:3] + [nan] + bins[4:])
    assert partial.boxes == plain.boxes
    with pytest.raises(ValueError, match="one bin"):
        task.parse(text, size, token_logprobs=logprobs, token_bins=bins[:-1])


def test_polygons_and_quads_take_sub_bin_positions_too():
    size = (1000, 1000)
    seg = get_task("referring_expression_segmentation")
    locs = [10, 20, 30, 20, 30, 40]
    pieces = ["<s>"] + [f"<loc_{k}>" for k in locs] + ["</s>"]
    bins = [float("nan")] + [k + 0.5 for k in locs] + [float("nan")]
    result = seg.parse("".join(pieces), size, token_logprobs=[(p, -0.1) for p in pieces], token_bins=bins)
    assert result.polygons[0][0] == pytest.approx([k + 1.0 for k in locs])


@pytest.fixture(scope="module")
def florence():
    return fiore.load()


def test_expected_coordinates_stay_within_the_window_of_the_chosen_bins(florence):
    image = make_sample(12345, 2).image
    for task in ("od", "ocr_with_region"):
        plain = predict(florence, image, task)
        refined = predict(florence, image, task, coords="expected")
        a, b = plain.instances(), refined.instances()
        assert len(a) == len(b) > 0
        assert [i.label for i in a] == [i.label for i in b]
        moved = 0
        for x, y in zip(a, b, strict=True):
            for axis, (u, v) in enumerate(zip(x.coords, y.coords, strict=True)):
                size = image.width if axis % 2 == 0 else image.height
                assert abs(u - v) <= LOC_WINDOW * size / 1000 + 1e-6
                moved += u != v
        assert moved > 0, f"{task}: no coordinate moved: the sub-bin positions were not used"


def test_beam_search_keeps_its_tokens_and_reports_bins(florence):
    image = make_sample(12345, 3).image
    plain = predict(florence, image, "od", num_beams=3)
    refined = predict(florence, image, "od", num_beams=3, coords="expected")
    assert [i.label for i in plain.instances()] == [i.label for i in refined.instances()]
    assert plain.scores == refined.scores
    with pytest.raises(ValueError, match="coords"):
        predict(florence, image, "od", coords="exact")


def test_generate_reports_bins_only_for_location_tokens(florence):
    model, tok = florence.model, florence.tokenizer
    pixel_values = florence.processor.pixel_values([make_sample(12345, 4).image])
    ids, mask = florence.processor.prompt_ids([get_task("od").prompt()])
    with torch.inference_mode():
        hidden, enc_mask = model.encode(model.encode_image(pixel_values), ids, mask)
    config = GenerationConfig(max_new_tokens=40, loc_token_start=tok.loc_id(0), loc_window=LOC_WINDOW)
    (seq,) = generate(model, hidden, enc_mask, config)
    is_loc = [tok.loc_id(0) <= t <= tok.loc_id(999) for t in seq.ids]
    assert any(is_loc)
    for t, b, loc in zip(seq.ids, seq.token_bins, is_loc, strict=True):
        assert math.isnan(b) != loc
        if loc:
            assert abs(b - (t - tok.loc_id(0))) <= LOC_WINDOW


def test_cli_predict_and_label_take_coords(tmp_path):
    from typer.testing import CliRunner

    from fiore.cli import app

    image = tmp_path / "imgs" / "scene.png"
    image.parent.mkdir()
    make_sample(12345, 2).image.save(image)
    out = tmp_path / "out"
    args = ["predict", str(image), "--task", "od", "--out", str(out), "--coords", "expected"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(app, ["predict", str(image), "--task", "od", "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert (out / "scene.json").read_text() != (tmp_path / "plain" / "scene.json").read_text()
    labels = tmp_path / "labels.json"
    result = CliRunner().invoke(app, ["label", str(image.parent), "--out", str(labels), "--coords", "expected"])
    assert result.exit_code == 0, result.output
    assert labels.exists()
    bad = CliRunner().invoke(app, ["predict", str(image), "--task", "od", "--coords", "exact"])
    assert bad.exit_code == 2 and "unknown coords" in bad.output
