"""Auto-labelling: COCO output, threshold, batching, and resumption after a kill (journal + atomic write)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_florence import FakeFlorence
from PIL import Image

from fiore.label import journal_path, label_folder

TESTS = Path(__file__).parent


def make_folder(root: Path, n: int) -> Path:
    folder = root / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        sub = "sub/" if i % 3 == 0 else ""
        Image.new("RGB", (40 + i, 30 + 2 * i), (i * 20 % 256, 100, 255 - i * 20 % 256)).save(
            folder / f"{sub}{i:03d}.png"
        )
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_label_folder_coco_threshold_batches(tmp_path):
    folder = make_folder(tmp_path, 5)
    fake = FakeFlorence()
    out = tmp_path / "labels.json"
    progress = []
    coco = label_folder(
        fake, folder, out, "od", batch_size=2, threshold=0.4, on_progress=lambda d, t: progress.append(d)
    )
    assert json.loads(out.read_text()) == coco
    assert not journal_path(out).exists()
    names = [im["file_name"] for im in coco["images"]]
    assert names == sorted(names) and len(names) == 5 and "sub/000.png" in names
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 4, 5]
    assert coco["images"][0]["width"] == 41  # 001.png: sizes come from the files
    assert [n for _, n in fake.calls] == [2, 2, 1]
    assert progress == [0, 2, 4, 5]
    # the fake gives each image a box scoring >= 0.5 and a "dot" at half that: the threshold keeps the first only
    assert all(a["score"] >= 0.4 for a in coco["annotations"])
    assert len(coco["annotations"]) == 5
    cat_names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(cat_names.values()) == [c["name"] for c in coco["categories"]]
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["iscrowd"] == 0 and a["category_id"] in cat_names
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    everything = label_folder(FakeFlorence(), folder, tmp_path / "all.json", "od", threshold=0.0)
    assert len(everything["annotations"]) == 10


def test_text_task_and_bad_inputs(tmp_path):
    folder = make_folder(tmp_path, 2)
    coco = label_folder(FakeFlorence(), folder, tmp_path / "caps.json", "caption")
    assert [a["image_id"] for a in coco["annotations"]] == [1, 2] and "caption" in coco["annotations"][0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        label_folder(FakeFlorence(), empty, tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        label_folder(FakeFlorence(), tmp_path / "missing", tmp_path / "x.json")
    with pytest.raises(ValueError, match="batch_size"):
        label_folder(FakeFlorence(), folder, tmp_path / "x.json", batch_size=0)


def test_broken_image_is_skipped_with_warning(tmp_path):
    folder = make_folder(tmp_path, 3)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="broken.png"):
        coco = label_folder(FakeFlorence(), folder, tmp_path / "l.json", "od")
    assert len(coco["images"]) == 3


def test_torn_journal_line_and_option_mismatch(tmp_path):
    folder = make_folder(tmp_path, 4)
    reference = label_folder(FakeFlorence(), folder, tmp_path / "ref.json", "od", batch_size=1)
    out = tmp_path / "l.json"
    # a run killed while writing its second record: header, one whole record, half a line
    full = FakeFlorence()
    journal = journal_path(out)
    header = {"fiore_label_journal": 1, "task": "od", "text": None, "model": None}
    from fiore.draw import to_coco
    from fiore.processor import load_image
    from fiore.request import Request

    first = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))[0]
    image = load_image(folder / first)
    anns = [{k: v for k, v in a.items() if k != "image_id"} for a in to_coco(full.answer(image, Request.make("od")), 0)]
    rec = {"file_name": first, "width": image.width, "height": image.height, "annotations": anns}
    journal.write_text(json.dumps(header) + "\n" + json.dumps(rec) + "\n" + '{"file_name": "sub/0')
    fake = FakeFlorence()
    resumed = label_folder(fake, folder, out, "od", batch_size=1)
    assert resumed == reference
    assert sum(n for _, n in fake.calls) == 3  # the journalled image was not labelled again
    journal.write_text(json.dumps({**header, "task": "caption"}) + "\n")
    with pytest.raises(ValueError, match="same options"):
        label_folder(FakeFlorence(), folder, out, "od")


SCRIPT = """
import sys
from fake_florence import FakeFlorence
from fiore.label import label_folder
label_folder(FakeFlorence(delay=0.15), sys.argv[1], sys.argv[2], "od", batch_size=2)
"""


def kill_after(script: str, folder: Path, out: Path, journal: Path, lines: int) -> int:
    """Run `script` (labelling `folder` into `out`) in its own process, SIGKILL it once `journal` has `lines`
    lines, and return how many image records the journal then holds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(out)], env=env)
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.read_text().count("\n") >= lines):
        assert proc.poll() is None, "labelling finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    return journal.read_text().count("\n") - 1


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    folder = make_folder(tmp_path, 12)
    reference = label_folder(FakeFlorence(), folder, tmp_path / "ref.json", "od", batch_size=5)
    out = tmp_path / "labels.json"
    journal = journal_path(out)
    done = kill_after(SCRIPT, folder, out, journal, lines=5)  # header + 2 batches
    assert not out.exists()  # no half-written output
    assert 4 <= done < 12
    fake = FakeFlorence()
    resumed = label_folder(fake, folder, out, "od", batch_size=2)
    assert sum(n for _, n in fake.calls) == 12 - done  # only the rest was labelled
    assert resumed == reference == json.loads(out.read_text())
    names = [im["file_name"] for im in resumed["images"]]
    assert len(names) == len(set(names)) == 12


SHARD_SCRIPT = """
import sys
from fake_florence import FakeFlorence
from fiore.label import label_folder
label_folder(FakeFlorence(delay=0.15), sys.argv[1], sys.argv[2], "od", batch_size=2, shard=(0, 2))
"""


def test_sharded_labelling_killed_and_rerun_loses_and_doubles_nothing(tmp_path):
    folder = make_folder(tmp_path, 13)
    reference = label_folder(FakeFlorence(), folder, tmp_path / "ref.json", "od", batch_size=5)
    out = tmp_path / "labels.json"
    # shard 1 of 2 finishes first: it cannot merge while shard 0 is incomplete
    one = FakeFlorence()
    assert label_folder(one, folder, out, "od", batch_size=2, shard=(1, 2)) is None
    assert sum(n for _, n in one.calls) == 6 and not out.exists()
    # shard 0 is killed mid-run, in its own process
    journal = journal_path(out, (0, 2))
    done = kill_after(SHARD_SCRIPT, folder, out, journal, lines=3)  # header + 1 batch
    assert not out.exists()
    assert 2 <= done < 7
    # rerun of shard 0: labels only the rest of its share, then merges both shards
    zero = FakeFlorence()
    merged = label_folder(zero, folder, out, "od", batch_size=2, shard=(0, 2))
    assert sum(n for _, n in zero.calls) == 7 - done
    assert merged == reference == json.loads(out.read_text())
    names = [im["file_name"] for im in merged["images"]]
    assert len(names) == len(set(names)) == 13
    assert not journal.exists() and not journal_path(out, (1, 2)).exists()


def test_shard_options_are_checked(tmp_path):
    from fiore.label import parse_shard

    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    folder = make_folder(tmp_path, 2)
    with pytest.raises(ValueError, match="rank must be"):
        label_folder(FakeFlorence(), folder, tmp_path / "x.json", "od", shard=(2, 2))


def test_torchrun_environment_gives_the_shard(monkeypatch):
    from fiore.label import torchrun_shard

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_shard() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert torchrun_shard() == (1, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert torchrun_shard() is None  # alone: no shard files


def test_cli_shards_and_merges(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fiore.cli

    folder = make_folder(tmp_path, 5)
    monkeypatch.setattr(fiore.cli, "_load_florence", lambda model, device, *options: FakeFlorence())
    out = tmp_path / "l.json"
    first = CliRunner().invoke(fiore.cli.app, ["label", str(folder), "--out", str(out), "--shard", "0/2"])
    assert first.exit_code == 0, first.output
    assert "shard 0/2 done" in first.output and not out.exists()
    second = CliRunner().invoke(fiore.cli.app, ["label", str(folder), "--out", str(out), "--shard", "1/2"])
    assert second.exit_code == 0, second.output
    assert len(json.loads(out.read_text())["images"]) == 5
    bad = CliRunner().invoke(fiore.cli.app, ["label", str(folder), "--out", str(out), "--shard", "2/2"])
    assert bad.exit_code == 2 and "rank must be" in bad.output
