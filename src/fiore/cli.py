"""The `fiore` command line: a thin shell over library functions (typer + rich). Each command imports what it needs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fiore.limits import DEFAULT_MAX_PIXELS

app = typer.Typer(no_args_is_help=True, add_completion=False, help="fiore: one vision model for many tasks.")


@app.callback()
def main() -> None:
    """fiore: one vision model for many tasks."""


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="training config (TOML), e.g. configs/default_model.toml")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT_DIR/checkpoints/latest")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a config value: section.key=value (repeatable)")
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="training source: dataset dir or Florence-2 JSONL (repeatable)"),
    ] = None,
    val: Annotated[list[str] | None, typer.Option("--val", help="validation source (repeatable)")] = None,
) -> None:
    """Train a model from a preset or fine-tune a checkpoint (torchrun for several processes / machines)."""
    from fiore.train.config import ConfigError, load_config, parse_override

    overrides = dict(parse_override(s) for s in set_ or [])
    if data:
        overrides["data.train"] = [{"path": p} for p in data]
    if val:
        overrides["data.val"] = [{"path": p} for p in val]
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="CONFIG / --set") from None
    from fiore.data.readers import DatasetError
    from fiore.extras import MissingExtra
    from fiore.train.loop import train as run

    try:
        final = run(cfg, resume=resume)
    except (DatasetError, MissingExtra) as e:  # bad training data or a missing extra: the message, no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"final model: {final}")


def _about(path, error: Exception) -> str:
    """An error message that names `path` once (image errors already start with it)."""
    message = str(error)
    return message if str(path) in message else f"{path}: {message}"


def _require(modules, what: str) -> None:
    """Stop before any work when an optional dependency is missing, with the pip line that installs it."""
    from fiore.extras import MissingExtra, require

    try:
        require(modules, what)
    except MissingExtra as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


QUANTIZE_HELP = "int8: every linear in int8 on the CPU (faster; docs/performance.md has speed and quality)"


COORDS_HELP = "bin: coordinates at bin centres (as official code); expected: sub-bin, from the model's distribution"


def _check_coords(coords: str) -> None:
    from fiore.predictor import COORDS

    if coords not in COORDS:
        raise typer.BadParameter(f"unknown coords {coords!r}; use {' or '.join(COORDS)}", param_hint="--coords")


TILE_HELP = "large images: also run the box, polygon and OCR-region tasks on native-resolution tiles, and merge"


def _tiling(tile: bool, size: int | None, overlap: float):
    """The `fiore.tiling.Tiling` the --tile options ask for (None without --tile); checked before any work."""
    if not tile:
        return None
    _require(["supervision"], "--tile")
    from fiore.tiling import Tiling

    try:
        return Tiling(size, overlap)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--tile-size/--tile-overlap") from None


DTYPE_HELP = "float32, or bfloat16 / float16 (half the weight memory; on a GPU, or a CPU with AMX bf16)"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip


def _load_florence(model: str | None, device: str, quantize: str | None = None, dtype: str = "float32"):
    """The model at `model` (a checkpoint directory), or the shipped default model; `quantize` and `dtype` (a name)
    as fiore.load's."""
    import torch

    import fiore
    from fiore.model.inference import check_quantize

    if dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16", param_hint="--dtype")
    torch_dtype = getattr(torch, DTYPES[dtype])
    try:
        check_quantize(quantize, device, torch_dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--quantize") from None
    try:
        return fiore.load(model, device=device, quantize=quantize, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="image files", exists=True, dir_okay=False, readable=True),
    task: list[str] = typer.Option(["all"], "--task", "-t", help="task name (repeatable); all = every input-free task"),
    text: str | None = typer.Option(None, "--text", help="text input for text tasks (caption, expression, classes)"),
    region: str | None = typer.Option(None, "--region", help="x1,y1,x2,y2 in pixels for region tasks"),
    model: str | None = typer.Option(None, "--model", "-m", help="checkpoint directory (default: the shipped model)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write annotated images and JSON here"),
    format: str = typer.Option("json", "--format", help="json (one file per image) or coco (one file)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps"),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="cap generation per task"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="refuse larger images"),
    coords: str = typer.Option("bin", "--coords", help=COORDS_HELP),
    tile: bool = typer.Option(False, "--tile", help=TILE_HELP),
    tile_size: int | None = typer.Option(None, "--tile-size", help="tile side in pixels (default: the model's input)"),
    tile_overlap: float = typer.Option(0.25, "--tile-overlap", help="fraction of a tile shared with its neighbour"),
) -> None:
    """Run tasks on images: a table on the terminal; annotated images and JSON in --out."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fiore.draw import plot, summary, to_coco
    from fiore.processor import load_image
    from fiore.request import requests_for
    from fiore.tasks import TaskInputError
    from fiore.tiling import predict_tiled

    if format not in ("json", "coco"):
        raise typer.BadParameter(f"unknown format {format!r}; use json or coco", param_hint="--format")
    _check_coords(coords)
    tiling = _tiling(tile, tile_size, tile_overlap)
    console = Console()
    try:
        requests = requests_for(task, text, region, max_new_tokens)
    except TaskInputError as e:
        raise typer.BadParameter(str(e), param_hint="--task/--text/--region") from None
    loaded = []
    for path in images:  # every image read and every request checked against it before the model loads
        try:
            image = load_image(path, max_pixels=max_pixels)
        except (OSError, ValueError) as e:
            raise typer.BadParameter(_about(path, e), param_hint="IMAGES") from None
        try:
            for r in requests:
                r.prompt(image.size)
        except TaskInputError as e:
            raise typer.BadParameter(f"{path}: {e}", param_hint="--region") from None
        loaded.append((path, image))
    florence = _load_florence(model, device, quantize, dtype)
    predictor = florence.predictor(coords=coords)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": []}
    categories: dict[str, int] = {}
    for image_id, (path, image) in enumerate(loaded, start=1):
        if tiling is None:
            predictor.set_images([image])
            answers = predictor.predict([requests])[0]
        else:
            answers = predict_tiled(predictor, image, requests, tiling)
        results = {r.task.name: result for r, result in zip(requests, answers, strict=True)}
        # file names and answers are data, not rich markup ("scene[red].png", an answer ending "[truncated]")
        table = Table(title=escape(f"{path} ({image.width}x{image.height})"))
        for column in ("task", "answer", "score"):
            table.add_column(column)
        for name, result in results.items():
            score = "" if result.score is None else f"{result.score:.3f}"
            table.add_row(name, escape(summary(result) + (" [truncated]" if result.truncated else "")), score)
        console.print(table)
        if out is None:
            continue
        for name, result in results.items():
            plot(result, image).save(out / f"{path.stem}.{name}.png")
        if format == "json":
            answer = {name: result.to_json() for name, result in results.items()}
            (out / f"{path.stem}.json").write_text(json.dumps(answer, indent=1, ensure_ascii=False) + "\n")
        else:
            info = {"id": image_id, "file_name": path.name, "width": image.width, "height": image.height}
            coco["images"].append(info)
            for name, result in results.items():
                for ann in to_coco(result, image_id, categories):
                    coco["annotations"].append({"id": len(coco["annotations"]) + 1, "task": name, **ann})
    if out is not None and format == "coco":
        coco["categories"] = [{"id": i, "name": n} for n, i in categories.items()]
        (out / "coco.json").write_text(json.dumps(coco, indent=1, ensure_ascii=False) + "\n")
    if out is not None:
        console.print(f"wrote {escape(str(out))}")


@app.command()
def label(
    folder: Path = typer.Argument(..., help="folder of images (searched recursively)", exists=True, file_okay=False),
    task: str = typer.Option("od", "--task", "-t", help="a detection-like task (od, dense_region_caption, ...)"),
    out: Path = typer.Option(Path("labels.json"), "--out", "-o", help="COCO JSON to write"),
    text: str | None = typer.Option(None, "--text", help="text input, e.g. classes for open_vocabulary_detection"),
    model: str | None = typer.Option(None, "--model", "-m", help="checkpoint directory (default: the shipped model)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    threshold: float = typer.Option(0.0, "--threshold", help="drop detections scoring below this"),
    device: str = typer.Option("cpu", "--device"),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="cap generation per image"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="skip larger images"),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="RANK/WORLD, e.g. 0/2: label every WORLD-th image from RANK (default under torchrun: RANK/WORLD_SIZE); "
        "the last shard to finish writes the merged file",
    ),
    coords: str = typer.Option("bin", "--coords", help=COORDS_HELP),
    tile: bool = typer.Option(False, "--tile", help=TILE_HELP),
    tile_size: int | None = typer.Option(None, "--tile-size", help="tile side in pixels (default: the model's input)"),
    tile_overlap: float = typer.Option(0.25, "--tile-overlap", help="fraction of a tile shared with its neighbour"),
) -> None:
    """Auto-label a folder into COCO JSON with scores; rerun after a kill to continue where it stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fiore.label import label_folder, list_images, parse_shard, torchrun_shard
    from fiore.request import get_task
    from fiore.tasks import TaskInputError
    from fiore.tiling import check_tileable

    _check_coords(coords)
    tiling = _tiling(tile, tile_size, tile_overlap)
    try:
        part = parse_shard(shard) if shard else torchrun_shard()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shard") from None

    try:
        t = get_task(task)
    except TaskInputError as e:
        raise typer.BadParameter(str(e), param_hint="--task") from None
    if t.inputs == "region":
        raise typer.BadParameter(
            f"task {t.name} needs a region per image; it cannot label a folder", param_hint="--task"
        )
    if t.inputs == "text" and not text:
        raise typer.BadParameter(f"task {t.name} needs --text", param_hint="--text")
    if tiling is not None:
        try:
            check_tileable(t)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--task") from None
    if not list_images(folder):
        raise typer.BadParameter(f"no images under {folder}", param_hint="FOLDER")
    florence = _load_florence(model, device, quantize, dtype)
    columns = (TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("label", total=None)
        try:
            coco = label_folder(
                florence,
                folder,
                out,
                t.name,
                text=text if t.inputs == "text" else None,
                batch_size=batch_size,
                threshold=threshold,
                on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
                max_new_tokens=max_new_tokens,
                max_pixels=max_pixels,
                shard=part,
                coords=coords,
                tiling=tiling,
            )
        except ValueError as e:  # e.g. a journal left by a run with other options
            progress.stop()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    if coco is None:
        typer.echo(f"shard {part[0]}/{part[1]} done; the last shard to finish writes {out}")
        return
    skipped = len(list_images(folder)) - len(coco["images"])  # unreadable images, each warned about above
    typer.echo(
        f"{out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations"
        + (f", {skipped} image(s) skipped (unreadable)" if skipped else "")
    )


@app.command()
def search(
    folder: Path = typer.Argument(..., help="folder of images (searched recursively)", exists=True, file_okay=False),
    query: str = typer.Option(..., "--text", "-q", help="what to look for, e.g. 'a red star on a striped background'"),
    top: int = typer.Option(10, "--top", "-k", min=1, help="how many images to list"),
    model: str | None = typer.Option(None, "--model", "-m", help="checkpoint directory (default: the shipped model)"),
    device: str = typer.Option("cpu", "--device"),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
) -> None:
    """Text-to-image search over a folder with the image-text heads: the closest images first."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fiore.label import list_images

    if not query.strip():
        raise typer.BadParameter("the query is empty", param_hint="--text")
    names = list_images(folder)
    if not names:
        raise typer.BadParameter(f"no images under {folder}", param_hint="FOLDER")
    florence = _load_florence(model, device, quantize, dtype)
    try:
        ranked = florence.search(query, [folder / n for n in names], top_k=top)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    table = Table("rank", "image", "similarity")
    for i, (path, similarity) in enumerate(ranked, 1):
        table.add_row(str(i), escape(str(Path(path).relative_to(folder))), f"{similarity:.3f}")
    Console().print(table)


@app.command("zero-shot")
def zero_shot(
    images: list[Path] = typer.Argument(..., help="image files", exists=True, dir_okay=False, readable=True),
    labels: str = typer.Option(..., "--labels", "-l", help="candidate classes, separated by ';' or ','"),
    template: str | None = typer.Option(None, "--template", help="label prompt with {} (default: the model's own)"),
    model: str | None = typer.Option(None, "--model", "-m", help="checkpoint directory (default: the shipped model)"),
    device: str = typer.Option("cpu", "--device"),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
) -> None:
    """Zero-shot classification from label prompts with the image-text heads."""
    import re

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    candidates = [x.strip() for x in re.split(r"[;,]", labels) if x.strip()]
    if not candidates:
        raise typer.BadParameter("no labels given", param_hint="--labels")
    florence = _load_florence(model, device, quantize, dtype)
    table = Table("image", "label", "probability", "runner-up")
    for path in images:
        try:
            result = florence.zero_shot(path, candidates, template=template)
        except ValueError as e:
            raise typer.BadParameter(_about(path, e), param_hint="IMAGES / --labels / --template") from None
        second = f"{result.ranking[1][0]} {result.ranking[1][1]:.3f}" if len(result.ranking) > 1 else ""
        table.add_row(escape(path.name), escape(result.label), f"{result.score:.3f}", escape(second))
    Console().print(table)


@app.command()
def serve(
    model: str | None = typer.Option(None, "--model", "-m", help="checkpoint directory (default: the shipped model)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="requests per engine pass"),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", min=0, help="wait for more requests to batch"),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="queued requests before answering 503"),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="refuse larger images (413)"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="FIORE_API_KEY", help="require X-API-Key"),
    device: str = typer.Option("cpu", "--device"),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="cap generation per task"),
) -> None:
    """HTTP server: POST /v1/predict, GET /v1/tasks, a web page at /, OpenAPI at /docs."""
    _require(["fastapi", "uvicorn", "multipart"], "fiore serve")
    from fiore.serve import ServeConfig
    from fiore.serve import serve as run

    config = ServeConfig(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        api_key=api_key,
        max_new_tokens=max_new_tokens,
    )
    run(_load_florence(model, device, quantize, dtype), host=host, port=port, config=config)


@app.command("eval")
def eval_(
    data: Path = typer.Option(
        ..., "--data", "-d", help="dataset directory (images/, instances.json, ...) or Florence-2 JSONL"
    ),
    tasks: str = typer.Option("all", "--tasks", "-t", help="comma-separated task names, or all"),
    model: str | None = typer.Option(None, "--model", "-m", help="checkpoint directory (default: the shipped model)"),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="evaluate the first N images only"),
    out: Path = typer.Option(Path("report.json"), "--out", "-o", help="report JSON; .md and predictions.jsonl beside"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    java: bool = typer.Option(False, "--java", help="also compute METEOR (needs Java)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="cap generation (all tasks)"),
    score_mode: str | None = typer.Option(None, "--score-mode", help="instance confidence: loc or label_loc"),
    swap: bool = typer.Option(
        False, "--swap-images", help="give each sample the next sample's image (ground truth kept): a blindness check"
    ),
    zero_shot: bool = typer.Option(
        False, "--zero-shot", help="also classify each image's label zero-shot with the image-text heads"
    ),
    device: str = typer.Option("cpu", "--device"),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
) -> None:
    """Evaluate a model on a dataset: a table per task, report JSON + Markdown and raw predictions."""
    from rich.console import Console

    from fiore.data.sources import SourceSpec, read_samples
    from fiore.eval.runner import evaluate, evaluate_zero_shot, resolve_tasks, swap_images

    try:
        samples = read_samples(SourceSpec(path=str(data)))  # a dataset directory or a Florence-2 JSONL
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{data}: {e}", param_hint="--data") from None
    try:
        task_list = resolve_tasks(None if tasks.strip() == "all" else tasks)
    except (KeyError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--tasks") from None
    from fiore.eval.scorers import required_modules

    _require(required_modules(task_list), "fiore eval of these tasks")
    samples = samples[:limit] if limit is not None else samples
    if swap:
        try:
            samples = swap_images(samples)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--swap-images") from None
    florence = _load_florence(model, device, quantize, dtype)
    if zero_shot and florence.model.contrastive is None:
        raise typer.BadParameter(f"{model or 'the default model'} has no image-text heads", param_hint="--zero-shot")
    meta = {"model": model or "default", "data": str(data), "score_mode": score_mode or "default", "swap_images": swap}
    report = evaluate(
        florence,
        samples,
        task_list,
        limit,
        batch_size,
        java=java,
        meta=meta,
        max_new_tokens=max_new_tokens,
        score_mode=score_mode,
    )
    if zero_shot:
        report.tasks["zero_shot"] = evaluate_zero_shot(florence, samples)
    report.print(Console())
    paths = report.save(out)
    typer.echo(f"wrote {paths['json']}, {paths['markdown']}, {paths['predictions']}")


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="dataset directory to write (created)", file_okay=False),
    n: int = typer.Option(1000, "--n", min=1, help="number of images"),
    seed: int = typer.Option(0, "--seed", min=0, help="stream seed; a seed never trained on is a held-out set"),
) -> None:
    """Generate a synthetic dataset: images plus COCO instances/captions, refs and fiore JSONL (docs/data.md)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fiore.data.synthetic import write_dataset

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("synth", total=n)
        write_dataset(out, n, seed, progress=lambda done: progress.update(bar, completed=done))
    typer.echo(f"{out}: {n} images (seed {seed})")


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets before training on them.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(
        ..., help="dataset directory, Florence-2 JSONL file, or a folder with annotations.jsonl"
    ),
    kind: str | None = typer.Option(None, "--kind", help="dataset or florence2 (default: from the path)"),
    images: bool = typer.Option(True, "--images/--no-images", help="decode every image (finds corrupt files)"),
) -> None:
    """Check a dataset as `fiore train` does before its first step: every problem with its file and line or
    annotation id. Exit status 1 when there is any."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fiore.data.check import check_samples
    from fiore.data.readers import DatasetError
    from fiore.data.sources import SourceSpec, read_source

    try:
        source = read_source(SourceSpec(path=str(path), kind=kind))
    except DatasetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    samples = source.samples
    with Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(), transient=True) as progress:
        bar = progress.add_task("check", total=len(samples))
        problems = check_samples(samples, images=images, progress=lambda done: progress.update(bar, completed=done))
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)
    for p in problems:
        console.print(f"{p.where}: {p.what}", markup=False, highlight=False)
    bad = len({p.sample for p in problems})
    pairs = sum(len(s.pairs) for s in samples)
    what = f"{len(samples)} images" + (f", {pairs} prompt/target pairs" if pairs else "")
    typer.echo(f"{source.name}: {what}; {len(problems)} problem(s) in {bad} image(s)")
    if problems:
        raise typer.Exit(1)


@app.command("tasks")
def tasks_() -> None:
    """List the tasks: name, token, input, prompt text and default output budget."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from fiore import tasks

    table = Table(title="fiore tasks")
    for column in ("name", "token", "input", "prompt", "max new tokens"):
        table.add_column(column)
    for t in tasks.all():
        table.add_row(t.name, t.token, t.inputs, t.template, str(t.max_new_tokens))
    # piped output (and tests) get a wide table rather than wrapped task tokens
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def convert(
    src: Path = typer.Argument(
        ..., help="checkpoint directory (native or original layout)", exists=True, file_okay=False
    ),
    dst: Path = typer.Argument(..., help="output directory (new or empty)"),
    to: str = typer.Option("native", "--to", help="native (transformers) or original (Microsoft remote code)"),
) -> None:
    """Convert a checkpoint between Microsoft's original layout and transformers' native one."""
    from fiore.convert import convert as run

    if to not in ("native", "original"):
        raise typer.BadParameter(f"unknown format {to!r}; use native or original", param_hint="--to")
    try:
        run(src, dst, to)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {to} checkpoint {dst}")


export_app = typer.Typer(no_args_is_help=True, help="Export a checkpoint for other runtimes.")
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx(
    checkpoint: str = typer.Argument(..., help="checkpoint directory or hub id; 'shipped' = the model inside fiore"),
    out: Path = typer.Argument(..., help="output folder (onnx/*.onnx beside config, tokenizer, preprocessor)"),
    check: bool = typer.Option(True, "--check/--no-check", help="compare the export with fiore in onnxruntime"),
) -> None:
    """Export to ONNX in the published Florence-2 layout (transformers.js, onnxruntime), then check it against
    fiore on one image: largest differences of vision features and logits, greedy tokens, seconds of each."""
    import time

    _require(["onnx", "onnxscript", "onnxruntime"], "fiore export onnx")
    from fiore.export import check_export
    from fiore.export import export_onnx as run

    source = None if checkpoint == "shipped" else checkpoint
    started = time.perf_counter()
    try:
        run(source, out)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out}/onnx (4 graphs) in {time.perf_counter() - started:.0f} s")
    if not check:
        return
    from fiore.data.synthetic import make_sample

    report = check_export(out, source, make_sample(12345, 0).read_image())
    typer.echo(
        f"check: vision max |diff| {report['vision_max_abs_diff']:.1e}, logits max |diff| "
        f"{report['logits_max_abs_diff']:.1e}, greedy tokens {'equal' if report['tokens_equal'] else 'DIFFER'} "
        f"({len(report['fiore_tokens'])} tokens); onnxruntime {report['ort_seconds']:.2f} s, "
        f"fiore {report['fiore_seconds']:.2f} s"
    )
    if not report["tokens_equal"] or report["logits_max_abs_diff"] > 1e-3:
        typer.echo("error: the export does not answer as fiore does", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
