"""Auto-labelling a folder of images into COCO JSON, resumable after a kill.

Each finished batch is appended to a journal (`OUT.journal.jsonl`, one JSON line per image) and fsynced, so a
killed run loses at most the batch in flight; a rerun with the same output path reads the journal, skips the
images already there and labels the rest. The COCO file is assembled from the journal only at the end and
written atomically (temporary file + `os.replace`), so it is never half-written; then the journal is removed.

Sharded (`shard=(rank, world)`, `fiore label --shard 0/2` or under torchrun): each process labels every world-th
image (sorted names, from its rank) into its own journal `OUT.journal-RANK-of-WORLD.jsonl`, resumable as above, and
marks it complete at the end. The process that finds every shard complete assembles the one COCO file from all of
them (records keyed by file name: an image is never counted twice) and removes the journals. Merging reads only
complete journals and writes atomically, so two shards finishing at once write the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from fiore.files import honour_umask

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[str]:
    """Image files under `folder` (recursive), as sorted POSIX paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


SHARD_COMPLETE = {"fiore_label_shard_complete": True}


def journal_path(out: str | Path, shard: tuple[int, int] | None = None) -> Path:
    out = Path(out)
    if shard is None:
        return out.with_name(out.name + ".journal.jsonl")
    rank, world = shard
    return out.with_name(f"{out.name}.journal-{rank}-of-{world}.jsonl")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """ "RANK/WORLD" (e.g. "0/2") -> (0, 2); None or "" -> None. Refuses anything else with the rule."""
    if not value:
        return None
    try:
        rank, world = (int(v) for v in value.split("/"))
    except ValueError:
        raise ValueError(f"a shard is RANK/WORLD such as 0/2, got {value!r}") from None
    check_shard((rank, world))
    return rank, world


def check_shard(shard: tuple[int, int]) -> None:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: the rank must be in 0..{world - 1} and the world size >= 1")


def torchrun_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) from torchrun's environment, or None when not launched by it (or alone)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    shard = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    check_shard(shard)
    return shard if shard[1] > 1 else None


def read_journal(path: Path, header: dict) -> dict[str, dict]:
    """Records by file name. A torn last line (killed mid-write) is cut off so appends start on a clean line."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                rec = json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n"):
                break
            if i == 0:
                if rec != header:
                    raise ValueError(
                        f"{path} was written by a run with {rec}, not {header}; use the same options or delete it"
                    )
            elif rec != SHARD_COMPLETE:
                done[rec["file_name"]] = rec
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON so that readers see either the old file or the whole new one, never a prefix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def assemble_coco(records: list[dict], task: str, threshold: float = 0.0) -> dict:
    """COCO JSON from journal records: images sorted by file name (ids from 1), categories sorted by name,
    annotations in image order; detections whose score is below `threshold` dropped (unscored ones kept)."""
    records = sorted((r for r in records if "error" not in r), key=lambda r: r["file_name"])
    names = sorted({a["category_name"] for r in records for a in r["annotations"] if "category_name" in a})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]})
        for a in rec["annotations"]:
            if "caption" in a:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": a["caption"]})
                continue
            if a.get("score") is not None and a["score"] < threshold:
                continue
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[a["category_name"]]}
            ann.update({k: v for k, v in a.items() if k not in ("image_id", "category_id", "category_name")})
            ann["iscrowd"] = 0
            annotations.append(ann)
    return {
        "info": {"description": f"fiore auto-labels, task {task}", "task": task, "score_threshold": threshold},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n} for n in names],
    }


def label_folder(
    florence,
    folder: str | Path,
    out: str | Path,
    task: str = "od",
    *,
    text: str | None = None,
    batch_size: int = 8,
    threshold: float = 0.0,
    on_progress: Callable[[int, int], None] | None = None,
    max_new_tokens: int | None = None,
    max_pixels: int | None = None,
    shard: tuple[int, int] | None = None,
    coords: str = "bin",
    tiling=None,
) -> dict | None:
    """Label every image under `folder` with `task`, write COCO JSON to `out` and return it.

    With `shard=(rank, world)`, label this rank's share only; return the merged COCO when this call completed the
    last shard, else None (the last shard to finish writes `out`).

    Resumes from `out`'s journal when one exists. `on_progress(done, total)` is called after each batch;
    `max_new_tokens` caps generation per image (None: the task's own budget); `max_pixels` refuses larger images
    (None: fiore.processor.DEFAULT_MAX_PIXELS); `coords`: "bin" or "expected" (sub-bin), as `Predictor`'s;
    `tiling`: a `fiore.tiling.Tiling` to label large images tile by tile (a tileable task), None for whole images.
    """
    from fiore.draw import to_coco
    from fiore.processor import DEFAULT_MAX_PIXELS, load_image
    from fiore.request import Request
    from fiore.tiling import check_tileable, predict_tiled

    request = Request.make(task, text, None, max_new_tokens)  # a bad task or text fails before any image is read
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder, out = Path(folder), Path(out)
    all_files = list_images(folder)
    if not all_files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    if shard is not None:
        check_shard(shard)
    files = all_files if shard is None else all_files[shard[0] :: shard[1]]
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = journal_path(out, shard)
    # A journal only resumes a run of the same task, text, model and shard.
    source = getattr(florence, "source", None)
    model = None if source is None else str(source)
    header = {"fiore_label_journal": 1, "task": request.task.name, "text": text, "model": model}
    if coords != "bin":
        header["coords"] = coords
    if tiling is not None:
        check_tileable(request.task)
        header["tiling"] = dataclasses.asdict(tiling)
    if shard is not None:
        header["shard"] = list(shard)
    done = read_journal(journal, header)
    if not journal.exists() or journal.stat().st_size == 0:
        _append(journal, [header])
    pending = [f for f in files if f not in done]
    if on_progress:
        on_progress(len(files) - len(pending), len(files))
    predictor = florence.predictor(coords=coords)
    for start in range(0, len(pending), batch_size):
        names = pending[start : start + batch_size]
        images, records, ok = [], [], []
        for name in names:
            try:
                images.append(load_image(folder / name, max_pixels=max_pixels))
                ok.append(name)
            except Exception as e:  # a broken file must not stop a thousand-image run
                warnings.warn(f"skipping {name}: {e}", stacklevel=2)
                records.append({"file_name": name, "error": str(e)})
        results = []
        if images and tiling is not None:  # an image and its tiles at a time
            results = [predict_tiled(predictor, image, [request], tiling)[0] for image in images]
        elif images:
            predictor.set_images(images)
            results = [answers[0] for answers in predictor.predict([[request]] * len(images))]
        for name, image, result in zip(ok, images, results, strict=True):
            anns = [{k: v for k, v in a.items() if k != "image_id"} for a in to_coco(result, 0)]
            records.append({"file_name": name, "width": image.width, "height": image.height, "annotations": anns})
        _append(journal, records)
        done.update({r["file_name"]: r for r in records})
        if on_progress:
            on_progress(len(files) - len(pending) + start + len(names), len(files))
    if shard is not None:
        if _finished_records(journal) is None:
            _append(journal, [SHARD_COMPLETE])
        return merge_shards(out, shard[1], all_files, task, threshold)
    coco = assemble_coco([done[f] for f in files if f in done], task, threshold)
    write_json_atomic(out, coco)
    journal.unlink()
    return coco


def _finished_records(journal: Path) -> dict[str, dict] | None:
    """A shard journal's records by file name once it ends with the completion mark; None before (or missing)."""
    try:
        lines = journal.read_bytes().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 2 or json.loads(lines[-1]) != SHARD_COMPLETE:
        return None
    return {rec["file_name"]: rec for rec in map(json.loads, lines[1:-1])}  # after the header, before the mark


def merge_shards(out: str | Path, world: int, files: list[str], task: str, threshold: float = 0.0) -> dict | None:
    """The COCO file of `world` complete shard journals of `out`, written to `out` (journals then removed); None
    while a shard is incomplete or missing (another process may have merged them meanwhile: it wrote the same file)."""
    out = Path(out)
    journals = [journal_path(out, (rank, world)) for rank in range(world)]
    shards = [_finished_records(j) for j in journals]
    if any(records is None for records in shards):
        return None
    records = {name: rec for shard in shards for name, rec in shard.items()}
    coco = assemble_coco([records[f] for f in files if f in records], task, threshold)
    write_json_atomic(out, coco)
    for j in journals:
        j.unlink(missing_ok=True)
    return coco
