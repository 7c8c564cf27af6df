"""The synthetic world: determinism, independence of seeds, and validity of every annotation.

The checks here re-derive each fact from the pixels or from the annotations alone (the label map, a fresh
rasterization of the polygons, an independent parser of referring expressions), never from the generator's logic.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from fiore.data import lexicon
from fiore.data.sample import Sample
from fiore.data.synthetic import SyntheticDataset, World, make_sample, render_scene

N = 40  # scenes per validity test: every kind of background and 1..8 objects show up


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(11, i) for i in range(N)]


def _fingerprint(s: Sample) -> str:
    return hashlib.sha1(s.image.tobytes()).hexdigest()


def test_same_seed_and_index_give_the_same_sample():
    a, b = make_sample(5, 17), make_sample(5, 17)
    assert _fingerprint(a) == _fingerprint(b)
    a.image = b.image = None
    assert a == b


def test_seeds_and_indices_give_different_images():
    seed0 = {_fingerprint(make_sample(0, i)) for i in range(25)}
    seed1 = {_fingerprint(make_sample(1, i)) for i in range(25)}
    assert len(seed0) == 25 and len(seed1) == 25
    assert not seed0 & seed1


def test_canvas_sizes_vary_within_the_world_limits(scenes):
    sizes = {(s.width, s.height) for _, _, s in scenes}
    assert len(sizes) > N // 2
    for _, _, s in scenes:
        assert 192 <= s.width <= 384 and 192 <= s.height <= 384
        assert max(s.size) / min(s.size) <= 1.6 + 1e-9
        assert s.image.size == s.size


def test_scenes_cover_the_world(scenes):
    counts = [len(s.objects) for _, _, s in scenes]
    assert min(counts) >= 1 and max(counts) <= 8 and len(set(counts)) >= 5
    shapes = {o.label for _, _, s in scenes for o in s.objects}
    colors = {o.attributes["color"] for _, _, s in scenes for o in s.objects}
    sizes = {o.attributes["size"] for _, _, s in scenes for o in s.objects}
    assert shapes == set(lexicon.SHAPES) and colors == set(lexicon.COLORS) and sizes == set(lexicon.SIZES)
    assert {len(s.texts) for _, _, s in scenes} >= {0, 1, 2}


def _polygon_mask(polygons, width, height) -> np.ndarray:
    img = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for ring in polygons:
        # pixel-corner coordinates -> PIL's pixel-centre convention
        draw.polygon([(x - 0.5, y - 0.5) for x, y in zip(ring[::2], ring[1::2], strict=True)], fill=1)
    return np.asarray(img, dtype=bool)


def test_masks_boxes_and_polygons_are_exact(scenes):
    for image, z, s in scenes:
        pixels = np.asarray(image)
        for o in s.objects:
            visible = z == o.attributes["z"]
            assert visible.sum() == o.attributes["area"] > 0
            # The mask is exact: every visible pixel has the object's colour.
            assert (pixels[visible] == lexicon.COLORS[o.attributes["color"]]).all()
            # The box is the visible mask's box, inside the canvas.
            rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
            assert o.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert 0 <= o.box[0] < o.box[2] <= s.width and 0 <= o.box[1] < o.box[3] <= s.height
            # Polygons lie inside the box and cover the visible mask.
            assert o.polygons
            for ring in o.polygons:
                assert len(ring) >= 6 and len(ring) % 2 == 0
                xs, ys = np.array(ring[::2]), np.array(ring[1::2])
                assert xs.min() >= o.box[0] and xs.max() <= o.box[2]
                assert ys.min() >= o.box[1] and ys.max() <= o.box[3]
            # No holes: flood the background from outside the box; whatever stays unreached is enclosed.
            x1, y1, x2, y2 = (int(v) for v in o.box)
            flood = Image.fromarray(np.pad(visible[y1:y2, x1:x2], 1).astype(np.uint8) * 255).copy()  # writable
            ImageDraw.floodfill(flood, (0, 0), 128)
            # (PIL floods 4-connected: a background pixel meeting the outside only at a corner counts as enclosed.)
            enclosed = int((np.asarray(flood) == 0).sum())
            assert enclosed <= 2, f"hole of {enclosed} px in the mask of {o.description} in {s.image_id}"
            drawn = _polygon_mask(o.polygons, s.width, s.height)
            iou = (drawn & visible).sum() / (drawn | visible).sum()
            assert iou > 0.85, (s.image_id, o.description, iou)


def test_objects_stay_mostly_visible(scenes):
    for _, _, s in scenes:
        for o in s.objects:
            # The largest possible area of this object class bounds the hidden part from below.
            short = min(s.size)
            assert o.attributes["area"] >= 0.25 * (short * lexicon.SIZES[o.attributes["size"]][0]) ** 2


def _resolve(expression: str, s: Sample) -> list[int]:
    """Independent reading of "the [extreme] [size] [colour] shape": the indices of the objects it names."""
    words = expression.split()
    assert words[0] == "the", expression
    words = words[1:]
    extreme = words.pop(0) if words[0].endswith("most") else None
    *adjectives, shape = words
    hits = [
        i
        for i, o in enumerate(s.objects)
        if o.label == shape and all(a in (o.attributes["size"], o.attributes["color"]) for a in adjectives)
    ]
    if extreme is None or not hits:
        return hits
    cx = {i: (s.objects[i].box[0] + s.objects[i].box[2]) / 2 for i in hits}
    cy = {i: (s.objects[i].box[1] + s.objects[i].box[3]) / 2 for i in hits}
    key = {"leftmost": cx, "rightmost": {i: -v for i, v in cx.items()}, "topmost": cy,
           "bottommost": {i: -v for i, v in cy.items()}}[extreme]  # fmt: skip
    best = min(key.values())
    return [i for i in hits if key[i] == best]


def test_every_referring_expression_names_exactly_one_object(scenes):
    n_refs = 0
    for _, _, s in scenes:
        for r in s.refs:
            assert _resolve(r.expression, s) == [r.object_index], r.expression
            n_refs += 1
        assert len({r.object_index for r in s.refs}) == len(s.refs)
    assert n_refs >= sum(len(s.objects) for _, _, s in scenes) * 0.8


def _inside_quad(px: np.ndarray, py: np.ndarray, quad, tol: float) -> np.ndarray:
    q = np.array(quad).reshape(4, 2)
    inside = np.ones(px.shape, dtype=bool)
    for k in range(4):
        (x1, y1), (x2, y2) = q[k], q[(k + 1) % 4]
        ex, ey = x2 - x1, y2 - y1
        # clockwise on screen (y down) -> the interior is where the cross product is >= 0
        inside &= (ex * (py - y1) - ey * (px - x1)) / np.hypot(ex, ey) >= -tol
    return inside


def test_ocr_quads_contain_their_text(scenes):
    seen = 0
    for i, (image, _, s) in enumerate(scenes):
        if not s.texts:
            continue
        bare, _, s2 = render_scene(11, i, World(render_text=False))
        assert s2.texts == s.texts and [o.box for o in s2.objects] == [o.box for o in s.objects]
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(bare, dtype=int)).sum(-1) > 0
        ys, xs = np.nonzero(diff)
        # Pixel centres of changed pixels, 1 px slack for antialiased edges.
        covered = np.zeros(xs.shape, dtype=bool)
        for t in s.texts:
            inside = _inside_quad(xs + 0.5, ys + 0.5, t.quad, tol=1.0)
            assert inside.sum() > 20, t  # the quad holds ink
            covered |= inside
            q = np.array(t.quad).reshape(4, 2)
            assert (q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()) == pytest.approx(t.box, abs=0.02)
            assert 0 <= t.box[0] and t.box[2] <= s.width and 0 <= t.box[1] and t.box[3] <= s.height
            assert re.fullmatch(r"[a-z]+|\d{1,3}", t.text)
        assert covered.all(), f"text pixels outside every quad in scene {i}"
        seen += 1
    assert seen >= 5


def test_texts_are_big_and_in_reading_order(scenes):
    for _, _, s in scenes:
        for t in s.texts:
            q = np.array(t.quad).reshape(4, 2)
            assert np.hypot(*(q[3] - q[0])) >= s.height / 10 * 0.7  # ink height of a >= H/10 px font
        centres = [((t.box[0] + t.box[2]) / 2, (t.box[1] + t.box[3]) / 2) for t in s.texts]
        for (x1, y1), (x2, y2), a in zip(centres, centres[1:], s.texts, strict=False):
            same_line = a.box[1] <= y2 <= a.box[3]
            assert (same_line and x2 > x1) or y2 > y1


def test_questions_agree_with_the_objects(scenes):
    kinds = set()
    for _, _, s in scenes:
        for qa in s.qas:
            kinds.add(qa.kind)
            q = qa.question
            if m := re.fullmatch(r"how many (\w+) are there\?", q):
                noun = m.group(1)
                n = len(s.objects) if noun == "objects" else sum(lexicon.plural(o.label) == noun for o in s.objects)
                assert qa.answer == str(n), q
            elif m := re.fullmatch(r"is there a (?:(\w+) )?(\w+)\?", q):
                color, shape = m.groups()
                found = any(o.label == shape and color in (None, o.attributes["color"]) for o in s.objects)
                assert qa.answer == ("yes" if found else "no"), q
            elif m := re.fullmatch(r"what color is the (\w+)\?", q):
                (o,) = [o for o in s.objects if o.label == m.group(1)]
                assert qa.answer == o.attributes["color"]
            elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", q):
                (o,) = [o for o in s.objects if (o.attributes["color"], o.label) == m.groups()]
                cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
                row = ["top", "", "bottom"][min(int(3 * cy / s.height), 2)]
                col = ["left", "", "right"][min(int(3 * cx / s.width), 2)]
                assert qa.answer == (f"{row} {col}".strip() or "center"), q
            elif q == "what does the text say?":
                assert len(s.texts) == 1 and qa.answer == s.texts[0].text
            elif q == "what number is written?":
                assert [t.text for t in s.texts if t.text.isdigit()] == [qa.answer]
            else:
                raise AssertionError(f"unexpected question {q!r}")
    assert kinds == {"counting", "color", "existence", "position", "reading"}


def test_captions_label_groundings_and_vocabulary(scenes):
    for _, _, s in scenes:
        assert set(s.captions) == {"caption", "detailed_caption", "more_detailed_caption"}
        # The short caption counts every object once.
        words = {w: i for i, w in enumerate(lexicon.NUMBER_WORDS)} | {"a": 1, "an": 1}
        counted = sum(words[m] for m in re.findall(r"(?:^|, | and )(\w+) ", s.captions["caption"]))
        assert counted == len(s.objects)
        (g,) = s.groundings
        assert g.caption == s.captions["caption"]
        boxes = sorted(b for _, bs in g.phrases for b in bs)
        assert boxes == sorted(o.box for o in s.objects)
        for phrase, _ in g.phrases:
            assert phrase in g.caption
        for t in s.texts:
            assert f'"{t.text}"' in s.captions["detailed_caption"]
            assert f'"{t.text}"' in s.captions["more_detailed_caption"]
        assert s.label in lexicon.BACKGROUNDS
        assert f"on a {lexicon.BACKGROUNDS[s.label]} background" in s.captions["detailed_caption"]
        assert set(s.vocabulary) == {o.label for o in s.objects} | {
            f"{o.attributes['color']} {o.label}" for o in s.objects
        }
        for o in s.objects:
            assert o.description == f"{o.attributes['size']} {o.attributes['color']} {o.label}"


def test_dataset_is_a_sequence_of_samples():
    data = SyntheticDataset(seed=2, n=3)
    assert len(data) == 3
    assert data[1].image_id == 1 and data[-1].image_id == 2
    assert [s.image_id for s in data] == [0, 1, 2]
    with pytest.raises(IndexError):
        data[3]


def test_overrides_and_bad_worlds():
    s = make_sample(0, 0, size_range=(256, 256), max_objects=2)
    assert s.size == (256, 256) and 1 <= len(s.objects) <= 2
    with pytest.raises(ValueError, match="size_range"):
        World(size_range=(300, 200))
    with pytest.raises(ValueError, match="non-negative"):
        make_sample(-1, 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 10**9))
def test_any_seed_and_index_give_a_valid_scene(seed, index):
    s = make_sample(seed, index)
    assert _fingerprint(s) == _fingerprint(make_sample(seed, index))
    for o in s.objects:
        assert 0 <= o.box[0] < o.box[2] <= s.width and 0 <= o.box[1] < o.box[3] <= s.height
        for ring in o.polygons:
            assert min(ring[::2]) >= o.box[0] and max(ring[::2]) <= o.box[2]
            assert min(ring[1::2]) >= o.box[1] and max(ring[1::2]) <= o.box[3]
    for r in s.refs:
        assert _resolve(r.expression, s) == [r.object_index]
    for t in s.texts:
        q = np.array(t.quad).reshape(4, 2)
        assert q[:, 0].min() >= 0 and q[:, 0].max() <= s.width and q[:, 1].min() >= 0 and q[:, 1].max() <= s.height
