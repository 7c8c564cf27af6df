"""Tiled inference (fiore.tiling): windows cover the image, tile answers map back to image pixels, duplicates
across overlaps and objects cut by a tile's edge are merged away, and --tile on predict and label."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fiore.request import Request
from fiore.results import Boxes, Mixed, Polygons, Quads, Text
from fiore.tiling import Tiling, merge, predict_tiled, shift, tile_windows


@pytest.mark.parametrize(
    "width,height,size,overlap", [(1000, 600, 256, 0.25), (4000, 300, 768, 0.2), (513, 512, 512, 0)]
)
def test_windows_cover_every_pixel_and_overlap(width, height, size, overlap):
    windows = tile_windows(width, height, size, overlap)
    covered = np.zeros((height, width), dtype=int)
    for x1, y1, x2, y2 in windows:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert x2 - x1 == min(size, width) and y2 - y1 == min(size, height)  # native resolution, never resized up
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    xs = sorted({w[0] for w in windows})
    assert all(b - a <= round(size * (1 - overlap)) for a, b in zip(xs, xs[1:], strict=False))  # neighbours overlap


def test_an_image_that_fits_one_tile_is_not_tiled():
    assert tile_windows(256, 200, 256, 0.25) == []


def test_tiling_options_are_checked():
    for bad in ({"size": 8}, {"overlap": 0.95}, {"overlap": -0.1}, {"iou": 0.0}):
        with pytest.raises(ValueError):
            Tiling(**bad)


def test_shift_moves_every_coordinate_into_image_pixels():
    boxes = shift(Boxes([[1, 2, 3, 4]], ["a"], [0.5]), 100, 50)
    assert boxes.boxes == [[101, 52, 103, 54]] and boxes.labels == ["a"] and boxes.scores == [0.5]
    quads = shift(Quads([[0, 0, 10, 0, 10, 5, 0, 5]], ["hi"]), 7, 3)
    assert quads.quads == [[7, 3, 17, 3, 17, 8, 7, 8]]
    polygons = shift(Polygons([[[0, 0, 4, 0, 4, 4]]], ["x"]), 1, 2)
    assert polygons.polygons == [[[1, 2, 5, 2, 5, 6]]]
    mixed = shift(Mixed(boxes=Boxes([[0, 0, 1, 1]], ["b"]), polygons=Polygons([[[0, 0, 1, 0, 1, 1]]], ["p"])), 10, 20)
    assert mixed.boxes.boxes == [[10, 20, 11, 21]] and mixed.polygons.polygons == [[[10, 20, 11, 20, 11, 21]]]
    with pytest.raises(TypeError):
        shift(Text("a caption"), 1, 1)


def test_merge_keeps_one_instance_per_object_and_drops_cut_ones():
    size = (600, 300)
    left, right = (0, 0, 300, 300), (200, 0, 500, 300)  # they share x 200..300
    whole = Boxes([[230, 100, 260, 130]], ["star"], [0.6], task="od")  # the star, coarsely, from the whole image
    tiles = [
        (left, Boxes([[231, 101, 261, 131], [280, 10, 300, 40]], ["star", "circle"], [0.9, 0.8], task="od")),
        # the same star in the right tile's pixels, a circle cut by the left tile's right edge, seen whole here
        (right, Boxes([[31, 101, 61, 131], [75, 10, 100, 40], [31, 101, 61, 131]], ["star", "circle", "heart"],
                      [0.7, 0.85, 0.5], task="od")),
    ]  # fmt: skip
    merged = merge(whole, tiles, size, iou=0.5)
    found = sorted(zip(merged.labels, merged.boxes, merged.scores, strict=True))
    assert found == [
        ("circle", [275.0, 10.0, 300.0, 40.0], 0.85),  # the whole circle (right tile), not the cut one (left tile)
        ("heart", [231.0, 101.0, 261.0, 131.0], 0.5),  # another label on the star's box: class-aware, kept
        ("star", [231.0, 101.0, 261.0, 131.0], 0.9),  # the best-scored of the star's three boxes
    ]
    assert merged.task == "od"


def test_merge_does_not_drop_what_touches_the_image_border():
    tiles = [((0, 0, 300, 300), Boxes([[0, 0, 20, 20]], ["dot"], [0.9]))]  # the tile's left/top edges are the image's
    merged = merge(Boxes([], [], []), tiles, (600, 600), iou=0.5)
    assert merged.boxes == [[0.0, 0.0, 20.0, 20.0]]


class SquareFinder:
    """A stand-in predictor that 'detects' coloured squares in each image it is given, but, like a model that
    squashes its input to `side` pixels, misses any square smaller than `min_px` pixels at that scale."""

    def __init__(self, colours: dict[tuple[int, int, int], str], side=256, min_px=6):
        self.colours, self.side, self.min_px = colours, side, min_px
        self.florence = type("F", (), {"config": type("C", (), {"image_size": (side, side)})()})()
        self.encoded = 0

    def set_images(self, images):
        self.images = [np.asarray(im) for im in images]
        self.encoded += len(images)

    def _find(self, pixels) -> Boxes:
        scale = self.side / max(pixels.shape[:2])
        boxes, labels = [], []
        for colour, label in self.colours.items():
            ys, xs = np.nonzero((pixels == colour).all(-1))
            if len(xs) and (xs.max() + 1 - xs.min()) * scale >= self.min_px:
                boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
                labels.append(label)
        return Boxes(boxes, labels, [0.9] * len(boxes), task="od")

    def predict(self, requests):
        return [[self._find(pixels) if r.task.tileable else Text("seen") for r in rs]
                for pixels, rs in zip(self.images, requests, strict=True)]  # fmt: skip


def test_tiles_find_small_objects_the_whole_image_misses_and_map_them_back():
    image = np.full((900, 1500, 3), 128, dtype=np.uint8)
    squares = {  # colour -> (x1, y1, side): small ones (12 px: 2 px when squashed), one large, one on a tile seam
        (255, 0, 0): (100, 100, 12),
        (0, 255, 0): (1400, 820, 12),
        (0, 0, 255): (600, 300, 200),
        (255, 255, 0): (250, 500, 12),
    }
    for (r, g, b), (x, y, s) in squares.items():
        image[y : y + s, x : x + s] = (r, g, b)
    finder = SquareFinder({c: f"square {i}" for i, c in enumerate(squares)})
    pil = Image.fromarray(image)
    requests = [Request.make("od"), Request.make("caption")]
    plain = predict_tiled(finder, pil, requests, Tiling(size=pil.width))  # one tile = the whole image: no tiling
    assert plain[0].labels == ["square 2"]  # the large square only
    finder.encoded = 0
    od, caption = predict_tiled(finder, pil, requests, Tiling(size=256, overlap=0.25))
    assert caption.text == "seen"  # untileable tasks: the whole image's answer
    assert finder.encoded == 1 + len(tile_windows(1500, 900, 256, 0.25))
    found = dict(zip(od.labels, od.boxes, strict=True))
    assert len(od.labels) == len(squares) == len(found)  # each square once, however many tiles saw it
    for i, (x, y, s) in enumerate(squares.values()):
        assert found[f"square {i}"] == [x, y, x + s, y + s]


def test_cli_predict_and_label_tile_with_the_shipped_model(tmp_path):
    from typer.testing import CliRunner

    from fiore.cli import app
    from fiore.data.synthetic import make_sample

    folder = tmp_path / "imgs"
    folder.mkdir()
    big = make_sample(777, 0).image.resize((700, 400))
    big.save(folder / "big.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(folder / "big.png"), "--task", "od", "--tile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for box in json.loads((out / "big.json").read_text())["od"]["boxes"]:
        assert 0 <= box[0] <= box[2] <= 700 and 0 <= box[1] <= box[3] <= 400
    labels = tmp_path / "labels.json"
    result = CliRunner().invoke(app, ["label", str(folder), "--out", str(labels), "--tile", "--tile-size", "300"])
    assert result.exit_code == 0, result.output
    assert json.loads(labels.read_text())["images"][0]["width"] == 700
    bad = CliRunner().invoke(app, ["label", str(folder), "--task", "caption", "--tile", "--out", str(labels)])
    assert bad.exit_code == 2 and "cannot be tiled" in bad.output
    bad = CliRunner().invoke(app, ["predict", str(folder / "big.png"), "--tile", "--tile-overlap", "0.95"])
    assert bad.exit_code == 2 and "overlap" in bad.output


def test_tile_without_supervision_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from fiore.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "supervision" else real(name, *a))
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    result = CliRunner().invoke(app, ["predict", str(image), "--task", "od", "--tile"])
    assert result.exit_code == 1 and "pip install 'fiore[tile]'" in result.output


def test_library_tile_option_tiles_only_the_tileable_tasks():
    import fiore
    from fiore.data.synthetic import make_sample

    m = fiore.load()
    big = make_sample(778, 1).image.resize((640, 300))
    plain = m.run(big, ["od", "caption"])
    tiled = m.run(big, ["od", "caption"], tile=Tiling(size=256))
    assert tiled["caption"].text == plain["caption"].text  # the whole image's answer, as without tiling
    manual = predict_tiled(m.predictor(), big, [Request.make("od")], Tiling(size=256))[0]
    assert tiled["od"].boxes == manual.boxes and tiled["od"].labels == manual.labels
    assert m.predict(big, "od", tile=True).boxes == manual.boxes  # True: tiles at the model's input side (256)
    for box in tiled["od"].boxes:
        assert 0 <= box[0] <= box[2] <= 640 and 0 <= box[1] <= box[3] <= 300
