"""Dataset writers and readers: synthetic round trip, plain COCO directories, RLE masks, bad input, `fiore synth`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fiore.cli import app
from fiore.data.readers import DatasetError, read_coco, read_dataset
from fiore.data.sample import Object, Sample
from fiore.data.synthetic import SyntheticDataset, write_dataset
from fiore.data.writers import write_samples


def _strip(s: Sample) -> dict:
    d = dataclasses.asdict(s)
    d.pop("image"), d.pop("image_path"), d.pop("origin")  # where a sample was read differs by design
    for o in d["objects"]:
        o.pop("origin")
    return d


def _assert_close(a, b, path="sample"):
    """Structural equality with floats compared to 1e-2 (files keep hundredths of a pixel)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-2), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_synthetic_round_trip(tmp_path):
    n = 12
    write_dataset(tmp_path, n, seed=4)
    back = read_dataset(tmp_path)
    original = list(SyntheticDataset(4, n))
    assert [s.image_id for s in back] == list(range(n))
    for a, b in zip(original, back, strict=True):
        _assert_close(_strip(a), _strip(b))
        with Image.open(b.image_path) as im:  # PNG: lossless
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(a.image))
    # Something of every kind survived the trip.
    assert any(s.refs for s in back) and any(s.texts for s in back) and all(s.qas for s in back)


def test_synthetic_files_are_standard_coco(tmp_path):
    pytest.importorskip("pycocotools", reason="pycocotools (eval extra) reads the COCO files")
    from pycocotools.coco import COCO

    write_dataset(tmp_path, 4, seed=9)
    coco = COCO(str(tmp_path / "instances.json"))
    assert len(coco.getImgIds()) == 4
    ann = coco.loadAnns(coco.getAnnIds())[0]
    mask = coco.annToMask(ann)
    assert mask.sum() == pytest.approx(ann["area"], rel=0.15)
    caps = COCO(str(tmp_path / "captions.json"))
    assert len(caps.getAnnIds()) == 4
    refs = json.loads((tmp_path / "refs.json").read_text())
    ann_ids = set(coco.getAnnIds())
    assert refs and all(r["ann_id"] in ann_ids and r["sentences"][0]["sent"] for r in refs)
    # Different seeds never share an image file name, so sets can be merged.
    write_dataset(tmp_path / "other", 4, seed=10)
    assert not {p.name for p in (tmp_path / "images").iterdir()} & {
        p.name for p in (tmp_path / "other" / "images").iterdir()
    }


def _plain_coco(root, rle: bool):
    """A two-image COCO directory in the official layout: annotations/*.json and a val2017/ image folder."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for name, size in (("a.jpg", (40, 30)), ("b.jpg", (20, 20))):
        Image.new("RGB", size, (120, 10, 10)).save(root / "val2017" / name)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 10:30] = 1
    segmentation = [[10, 5, 30, 5, 30, 15, 10, 15]]
    if rle:
        from pycocotools import mask as mask_utils

        enc = mask_utils.encode(np.asfortranarray(mask))
        segmentation = {"size": enc["size"], "counts": enc["counts"].decode("ascii")}
    instances = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 8, "file_name": "b.jpg", "width": 20, "height": 20}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200,
                         "iscrowd": int(rle), "segmentation": segmentation}],
        "categories": [{"id": 3, "name": "dog"}],
    }  # fmt: skip
    captions = {
        "images": instances["images"],
        "annotations": [{"id": i, "image_id": 7, "caption": f"a dog {i}"} for i in range(5)]
        + [{"id": 9, "image_id": 8, "caption": "nothing"}],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))


def test_plain_coco_directory(tmp_path):
    _plain_coco(tmp_path, rle=False)
    a, b = read_dataset(tmp_path)
    assert (a.image_id, a.size, b.size) == (7, (40, 30), (20, 20))
    assert a.image_path == str(tmp_path / "val2017" / "a.jpg")
    (obj,) = a.objects
    assert (
        obj.box == (10.0, 5.0, 30.0, 15.0) and obj.label == "dog" and obj.polygons == [[10, 5, 30, 5, 30, 15, 10, 15]]
    )
    assert a.captions == {"caption": "a dog 0"} and a.reference_captions == [f"a dog {i}" for i in range(5)]
    assert b.captions == {"caption": "nothing"} and b.reference_captions == []
    assert not b.objects and not a.refs and not a.texts
    same = read_coco(tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")
    assert [s.objects for s in same] == [a.objects, b.objects]


def test_rle_segmentations_become_polygons_and_survive_a_rewrite(tmp_path):
    pytest.importorskip("pycocotools", reason="RLE needs pycocotools (eval extra)")
    _plain_coco(tmp_path / "coco", rle=True)
    a, _ = read_dataset(tmp_path / "coco")
    (obj,) = a.objects
    assert obj.rle["size"] == [30, 40] and isinstance(obj.rle["counts"], str)
    assert obj.attributes == {"iscrowd": 1}
    (ring,) = obj.polygons
    xs, ys = ring[::2], ring[1::2]
    assert (min(xs), min(ys), max(xs), max(ys)) == (10, 5, 30, 15)  # the mask's exact outline
    write_samples(tmp_path / "copy", read_dataset(tmp_path / "coco"))
    again, _ = read_dataset(tmp_path / "copy")
    assert again.objects == a.objects and again.reference_captions == a.reference_captions


def test_jsonl_only_dataset_reads_image_sizes_from_files(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (33, 21)).save(tmp_path / "images" / "x.png")
    line = {"image_id": "x", "file_name": "x.png", "texts": [{"text": "hi", "quad": [0, 0, 9, 0, 9, 5, 0, 5],
            "box": [0, 0, 9, 5]}], "qas": [{"question": "q?", "answer": "a"}], "label": "cat"}  # fmt: skip
    (tmp_path / "fiore.jsonl").write_text(json.dumps(line) + "\n\n")
    (s,) = read_dataset(tmp_path)
    assert s.size == (33, 21) and s.texts[0].text == "hi" and s.qas[0].answer == "a" and s.label == "cat"
    assert s.qas[0].answers == [] and s.qas[0].kind is None


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "no dataset files"),
        ({"instances.json": "{not json"}, "not valid JSON"),
        ({"instances.json": json.dumps({"images": []})}, "no 'annotations'"),
        ({"refs.json": "[]"}, "need the instances file"),
        ({"fiore.jsonl": json.dumps({"file_name": "a.png"})}, "no image_id"),
        (
            {
                "instances.json": json.dumps(
                    {
                        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                        "categories": [{"id": 1, "name": "x"}],
                    }
                )
            },  # fmt: skip
            "unknown image_id 2",
        ),
        (
            {
                "instances.json": json.dumps(
                    {
                        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1]}],
                        "categories": [{"id": 1, "name": "x"}],
                    }
                )
            },  # fmt: skip
            "negative size",
        ),
    ],
)
def test_bad_datasets_name_the_problem(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


def test_missing_directory_and_missing_images(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "instances.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "gone.png", "width": 4, "height": 4}], "annotations": []})
    )
    with pytest.raises(DatasetError, match="gone.png"):
        read_dataset(tmp_path)


def test_writer_rejects_duplicate_ids_and_imageless_samples(tmp_path):
    s = Sample(image_id=1, width=4, height=4, image=Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="duplicate image_id"):
        write_samples(tmp_path, [s, s])
    with pytest.raises(ValueError, match="neither an image nor an image_path"):
        write_samples(tmp_path, [Sample(image_id=2, width=4, height=4, objects=[Object((0, 0, 1, 1), "x")])])


def test_cli_synth_writes_what_read_dataset_reads(tmp_path):
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d"), "--n", "3", "--seed", "7"])
    assert result.exit_code == 0, result.output
    samples = read_dataset(tmp_path / "d")
    assert len(samples) == 3 and all(s.captions["caption"] for s in samples)
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "e"), "--n", "0"])
    assert bad.exit_code != 0
