"""Parser properties (hypothesis): never raises on arbitrary text; parse(serialize(x)) == x within half a bin for
boxes, polygons, quads and phrases at any image size; per-instance scores from token log-probs."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fiore import tasks
from fiore.results import Boxes, Mixed, Phrases, Polygons, Quads
from fiore.tasks import locations
from fiore.tokenizer import Tokenizer

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENS = ["<s>", "</s>", "<pad>", "<sep>", "<poly>", "</poly>", "<loc_0>", "<loc_999>", "<loc_42>", "car", " ", "\n"]
sizes = st.tuples(
    st.floats(1, 10_000, allow_nan=False) | st.integers(1, 10_000), st.floats(1, 10_000) | st.integers(1, 10_000)
)
texts = st.text(max_size=200) | st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=60).map("".join)
labels = st.text(st.characters(blacklist_characters="<\n\r", blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: s.strip() and s == s.strip()
)


@st.composite
def pieces_of(draw, text):
    """Split text into pieces with log-probs (what the engine passes as token_logprobs)."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=20))) | {0, len(text)})
    parts = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    return [(p, draw(st.floats(-20, 0))) for p in parts]


@FAST
@given(
    text=texts, size=sizes, task_index=st.integers(0, 16), data=st.data(), mode=st.sampled_from(["loc", "label_loc"])
)
def test_never_raises(text, size, task_index, data, mode):
    task = tasks.all()[task_index]
    lp = data.draw(st.none() | pieces_of(text))
    result = task.parse(text, image_size=size, token_logprobs=lp, score_mode=mode)
    result.to_florence()
    result.to_json()
    for s in [result.score] + list(getattr(result, "scores", None) or []):
        assert s is None or math.isnan(s) or 0 < s <= 1
    if lp is None:
        assert result.score is None


def _coord(draw, limit):
    return draw(st.floats(0, limit, allow_nan=False))


@st.composite
def box_in(draw, size):
    w, h = size
    x1, x2 = sorted([_coord(draw, w), _coord(draw, w)])
    y1, y2 = sorted([_coord(draw, h), _coord(draw, h)])
    return [x1, y1, x2, y2]


@st.composite
def ring_in(draw, size):
    n = draw(st.integers(3, 8))
    return [_coord(draw, size[i % 2]) for i in range(2 * n)]


def _close(got, want, size):
    w, h = size
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        half = (w if i % 2 == 0 else h) / 2000
        assert abs(a - b) <= half * (1 + 1e-9) + 1e-9, (i, a, b, half)


def _round_trip(task, result, size):
    target = task.serialize(result, size)
    back = task.parse("</s><s>" + target + "</s>", image_size=size)
    assert back.warnings == []
    return back


@FAST
@given(data=st.data(), size=sizes)
def test_round_trip_boxes(data, size):
    boxes = data.draw(st.lists(box_in(size), max_size=6))
    names = data.draw(st.lists(labels, min_size=len(boxes), max_size=len(boxes)))
    back = _round_trip(tasks.get("od"), Boxes(boxes, names), size)
    assert back.labels == names
    for got, want in zip(back.boxes, boxes, strict=True):
        _close(got, want, size)
    proposals = _round_trip(tasks.get("region_proposal"), Boxes(boxes, [""] * len(boxes)), size)
    for got, want in zip(proposals.boxes, boxes, strict=True):
        _close(got, want, size)
    ovd = _round_trip(tasks.get("open_vocabulary_detection"), Mixed(boxes=Boxes(boxes, names)), size)
    assert isinstance(ovd, Mixed) and ovd.boxes.labels == names


@FAST
@given(data=st.data(), size=sizes)
def test_round_trip_polygons(data, size):
    insts = data.draw(st.lists(st.lists(ring_in(size), min_size=1, max_size=3), min_size=1, max_size=3))
    back = _round_trip(tasks.get("referring_expression_segmentation"), Polygons(insts, [""] * len(insts)), size)
    assert len(back.polygons) == len(insts) and back.labels == [""] * len(insts)
    for got_inst, inst in zip(back.polygons, insts, strict=True):
        assert len(got_inst) == len(inst)
        for got, want in zip(got_inst, inst, strict=True):
            _close(got, want, size)
    names = data.draw(st.lists(labels, min_size=len(insts), max_size=len(insts)))
    ovd = _round_trip(tasks.get("open_vocabulary_detection"), Mixed(polygons=Polygons(insts, names)), size)
    assert ovd.polygons.labels == names and len(ovd.boxes) == 0


@FAST
@given(data=st.data(), size=sizes)
def test_round_trip_quads_and_phrases(data, size):
    quads = data.draw(st.lists(ring_in(size).filter(lambda r: len(r) == 8) | st.just([0.0] * 8), max_size=4))
    words = data.draw(st.lists(labels, min_size=len(quads), max_size=len(quads)))
    back = _round_trip(tasks.get("ocr_with_region"), Quads(quads, words), size)
    assert back.labels == words
    for got, want in zip(back.quads, quads, strict=True):
        _close(got, want, size)
    phrases = data.draw(st.lists(labels.filter(lambda s: s not in tasks.parsers.BANNED_GROUNDING_PHRASES), max_size=3))
    groups = [data.draw(st.lists(box_in(size), min_size=1, max_size=3)) for _ in phrases]
    back = _round_trip(tasks.get("caption_to_phrase_grounding"), Phrases(phrases, groups), size)
    assert back.phrases == phrases
    for got_group, group in zip(back.boxes, groups, strict=True):
        for got, want in zip(got_group, group, strict=True):
            _close(got, want, size)


def test_quantizer():
    assert locations.quantize(0, 800) == 0 and locations.quantize(800, 800) == 999  # no <loc_1000>
    assert locations.quantize(-5, 800) == 0 and locations.quantize(30, 800) == 37
    assert locations.dequantize(37, 800) == 30.0 and isinstance(locations.dequantize(0, 1), float)
    with pytest.raises(ValueError, match="finite"):
        locations.quantize(float("nan"), 10)
    with pytest.raises(ValueError, match="positive"):
        locations.box_to_tokens([0, 0, 1, 1], (0, 10))


# ---- scores ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["a red car and a blue dog on the road"] * 20, vocab_size=300)


def test_instance_scores(tok):
    text = "</s><s>car<loc_1><loc_2><loc_3><loc_4>dog<loc_5><loc_6><loc_7><loc_8></s>"
    ids = [tok.eos_id, tok.bos_id, *tok.encode("car<loc_1><loc_2><loc_3><loc_4>dog<loc_5><loc_6><loc_7><loc_8>")]
    ids.append(tok.eos_id)
    pieces = tok.pieces(ids)
    assert "".join(pieces) == text
    lps = [-0.1 * (i + 1) for i in range(len(pieces))]
    od = tasks.get("od")
    r = od.parse(text, (100, 100), token_logprobs=list(zip(pieces, lps, strict=True)))
    loc = [i for i, p in enumerate(pieces) if p.startswith("<loc_")]
    want = [math.exp(sum(lps[i] for i in loc[:4]) / 4), math.exp(sum(lps[i] for i in loc[4:]) / 4)]
    assert r.scores == pytest.approx(want)
    car = [i for i, p in enumerate(pieces[: loc[0]]) if p not in ("<s>", "</s>")]
    r2 = od.parse(text, (100, 100), token_logprobs=list(zip(pieces, lps, strict=True)), score_mode="label_loc")
    assert r2.scores[0] == pytest.approx(math.exp(sum(lps[i] for i in car + loc[:4]) / (len(car) + 4)))
    plain = [lp for p, lp in zip(pieces, lps, strict=True) if p not in ("<s>", "</s>", "<pad>")]
    assert r.score == pytest.approx(math.exp(sum(plain) / len(plain)))  # specials excluded
    assert od.parse(text, (100, 100)).scores is None
    bad = od.parse(text, (100, 100), token_logprobs=[("nope", -1.0)])
    assert bad.scores is None and "concatenate" in bad.warnings[0]
    with pytest.raises(ValueError, match="score_mode"):
        od.parse(text, (100, 100), score_mode="max")


def test_text_score(tok):
    ids = [tok.eos_id, tok.bos_id, *tok.encode("a red car"), tok.eos_id]
    pieces = tok.pieces(ids)
    lps = [-5.0, -5.0] + [-0.5] * (len(pieces) - 3) + [-5.0]
    r = tasks.get("caption").parse("".join(pieces), (10, 10), token_logprobs=list(zip(pieces, lps, strict=True)))
    assert r.text == "a red car" and r.score == pytest.approx(math.exp(-0.5))


def test_location_tokens_past_999_are_clamped_with_a_warning():
    from fiore import tasks

    result = tasks.get("od").parse("</s><s>car<loc_10><loc_20><loc_1200><loc_40></s>", (100, 100))
    assert result.boxes == [[1.05, 2.05, 99.95, 4.05]]  # clamped to the last bin, as documented
    assert any("<loc_1200>" in w for w in result.warnings)
    assert tasks.get("od").parse("</s><s>car<loc_10><loc_20><loc_999><loc_40></s>", (100, 100)).warnings == []
