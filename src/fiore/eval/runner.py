"""Task-aware evaluation: samples -> examples (`Task.examples`) -> predictions through the generation engine ->
per-task metrics (`fiore.eval.scorers`) -> `Report`.

Engine use: every chunk of `batch_size` images goes through one `Predictor` pass (`florence.predictor()`): each
image is encoded once, and its requests (every input-less task, plus one per distinct input of the tasks that take
one) are decoded together. A failing pass is retried image by image, then request by request; what still fails is
counted as an error of its task (with its message) and never silently dropped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fiore.eval.report import Report, TaskReport
from fiore.eval.scorers import Scorer


def resolve_tasks(tasks: Iterable[Any] | str | None) -> list[Any]:
    """Task objects from names ("od,caption" / ["od", ...]) or Task objects; None = the whole catalogue."""
    import fiore.tasks

    if tasks is None:
        return list(fiore.tasks.all())
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out = [fiore.tasks.get(t.strip()) if isinstance(t, str) else t for t in tasks]
    if not out:
        raise ValueError("no tasks given to evaluate")
    return out


def _to_json(x: Any) -> Any:
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if hasattr(x, "to_json"):
        return x.to_json()
    if dataclasses.is_dataclass(x):
        return {"type": type(x).__name__, **dataclasses.asdict(x)}
    return repr(x)


def _message(where: str, sample, e: BaseException) -> str:
    return f"image {sample.image_id!r}: {where}: {type(e).__name__}: {e}"


class _TaskRun:
    """State of one task during an evaluation: its scorer, report counters and prediction records."""

    def __init__(self, task, java: bool):
        self.task = task
        self.report = TaskReport(task=task.name)
        self.scorer: Scorer | None = None
        self.java = java

    def scorer_for(self) -> Scorer:
        if self.scorer is None:
            if self.task.scorer is None:
                raise ValueError(f"task {self.task.name!r} names no scorer (Task.scorer): it cannot be evaluated")
            self.scorer = self.task.scorer(java=self.java)
            self.report.headline = self.scorer.headline
        return self.scorer

    def finish(self) -> TaskReport:
        if self.scorer is not None and self.scorer.n:
            try:
                self.report.metrics = self.scorer.compute()
            except Exception as e:  # a metric failure must show in the report, not abort the others
                self.report.add_error(f"metric computation: {type(e).__name__}: {e}")
        return self.report


def _input_key(example) -> tuple:
    region = getattr(example, "region", None)
    return (getattr(example, "text", None), None if region is None else tuple(float(v) for v in region))


def evaluate(
    florence,
    samples: Sequence[Any],
    tasks: Iterable[Any] | str | None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    java: bool = False,
    meta: dict[str, Any] | None = None,
    max_new_tokens: int | Mapping[str, int] | None = None,
    score_mode: str | None = None,
) -> Report:
    """Evaluate `florence` on `samples` (fiore.data.Sample) for `tasks` (names, Task objects, or None = all).

    `limit` caps the number of samples; `batch_size` is the number of images per predictor pass; `java` enables
    METEOR; `max_new_tokens` caps generation for every task, or per task name as a dict (default: each task's own
    budget); `score_mode` picks the per-instance confidence formula ("loc" or "label_loc", see
    `fiore.tasks.parsers`; default: the engine's). `meta` is copied into the report. Returns the Report
    (`.save(path)` writes it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task_list = resolve_tasks(tasks)
    samples = list(samples)[:limit] if limit is not None else list(samples)
    runs = {t.name: _TaskRun(t, java) for t in task_list}
    if max_new_tokens is None:
        options = {}
    elif isinstance(max_new_tokens, Mapping):
        options = {"max_new_tokens": {name: int(n) for name, n in max_new_tokens.items()}}
    else:
        options = {"max_new_tokens": int(max_new_tokens)}
    if score_mode is not None:
        options["score_mode"] = score_mode
    predictor = florence.predictor(**({"score_mode": score_mode} if score_mode is not None else {}))
    records: list[dict[str, Any]] = []
    start = time.perf_counter()

    bar = _progress(progress)
    with bar:
        job = bar.add_task("evaluating", total=len(samples))
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            records += _evaluate_chunk(predictor, chunk, task_list, runs, options.get("max_new_tokens"))
            bar.advance(job, len(chunk))

    info = {"n_samples": len(samples), "tasks": [t.name for t in task_list], "batch_size": batch_size, **options}
    info["seconds"] = round(time.perf_counter() - start, 3)
    return Report({n: r.finish() for n, r in runs.items()}, {**(meta or {}), **info}, records)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def _budget(max_new_tokens, task) -> int | None:
    return max_new_tokens.get(task.name) if isinstance(max_new_tokens, Mapping) else max_new_tokens


def _evaluate_chunk(predictor, chunk: list, task_list: list, runs: dict[str, _TaskRun], max_new_tokens) -> list:
    """Predict and score every task on a chunk of samples; returns its prediction records."""
    from fiore.request import Request

    images: dict[int, Any] = {}
    preloaded = {k for k, s in enumerate(chunk) if getattr(s, "image", None) is not None}
    work: dict[tuple[int, str], dict[tuple, list]] = {}  # (sample index, task) -> input key -> examples
    for k, sample in enumerate(chunk):
        for task in task_list:
            report = runs[task.name].report
            try:
                examples = list(task.examples(sample))
            except Exception as e:
                report.add_error(_message("ground truth could not be turned into examples", sample, e))
                continue
            if not examples:
                report.no_examples += 1
                continue
            report.samples += 1
            groups: dict[tuple, list] = {}
            for ex in examples:
                groups.setdefault(_input_key(ex), []).append(ex)
            work[(k, task.name)] = groups
        if not any((k, t.name) in work for t in task_list):
            continue
        try:
            images[k] = sample.load_image()
        except Exception as e:
            msg = _message("image could not be loaded", sample, e)
            for t in task_list:
                groups = work.pop((k, t.name), None)
                if groups:
                    runs[t.name].report.add_error(msg, count=sum(len(g) for g in groups.values()))

    predictions: dict[tuple[int, str, tuple], Any] = {}
    failed: dict[tuple[int, str, tuple], str] = {}
    # One request per (image, task, distinct input); a request that does not fit its image fails alone, up front.
    asked: dict[int, list[tuple[tuple, Any]]] = {k: [] for k in images}
    for (k, name), groups in work.items():
        task = runs[name].task
        for key in groups:
            try:
                request = Request.make(task, key[0], key[1], _budget(max_new_tokens, task))
                request.prompt(chunk[k].size)
            except Exception as e:
                failed[(k, name, key)] = _message(f"input {key!r} cannot be asked", chunk[k], e)
                continue
            asked[k].append(((k, name, key), request))
    wanted = [k for k in images if asked[k]]

    def run(batch: list[tuple[int, list]]) -> None:  # [(image k, [(prediction key, request), ...]), ...]
        predictor.set_images([images[k] for k, _ in batch])
        answers = predictor.predict([[r for _, r in items] for _, items in batch])
        for (_, items), results in zip(batch, answers, strict=True):
            for (pkey, _), result in zip(items, results, strict=True):
                predictions[pkey] = result

    def isolate(batch: list[tuple[int, list]]) -> None:
        """`run(batch)`; if it fails, each image alone, then each request alone; what still fails is recorded."""
        try:
            run(batch)
            return
        except Exception as e:
            error = e
        k, items = batch[0]
        if len(batch) > 1:
            parts = [[part] for part in batch]
        elif len(items) > 1:
            parts = [[(k, [item])] for item in items]
        else:
            failed[items[0][0]] = _message(f"model failed on input {items[0][0][2]!r}", chunk[k], error)
            return
        for part in parts:
            isolate(part)

    if wanted:
        isolate([(k, asked[k]) for k in wanted])

    records = _score(chunk, work, predictions, failed, runs)
    for k, sample in enumerate(chunk):
        if k in images and k not in preloaded and getattr(sample, "image_path", None):
            sample.image = None  # loaded for this chunk only: a large dataset must not stay in memory
    return records


def _score(chunk, work, predictions, failed, runs) -> list[dict[str, Any]]:
    records = []
    for (k, name), groups in work.items():
        run, sample = runs[name], chunk[k]
        record = {"image_id": sample.image_id, "task": name, "width": sample.width, "height": sample.height}
        items = []
        for key, examples in groups.items():
            pkey = (k, name, key)
            if pkey in failed:
                run.report.add_error(failed[pkey], count=len(examples))
                items += [
                    {"text": key[0], "region": key[1], "target": _to_json(ex.target), "error": failed[pkey]}
                    for ex in examples
                ]
                continue
            pred = predictions[pkey]
            run.report.truncated += bool(getattr(pred, "truncated", False))
            run.report.parse_warnings += bool(getattr(pred, "warnings", None))
            for ex in examples:
                item = {"text": key[0], "region": key[1], "prediction": _to_json(pred), "target": _to_json(ex.target)}
                try:
                    run.scorer_for().add(sample, ex, pred)
                    run.report.examples += 1
                except Exception as e:
                    msg = _message("prediction could not be scored", sample, e)
                    run.report.add_error(msg)
                    item["error"] = msg
                items.append(item)
        record["items"] = items
        records.append(record)
    return records


def headline_metrics(
    florence,
    samples: Sequence[Any],
    tasks: Iterable[Any] | str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Held-out evaluation for the training loop: a flat {"task/metric": value} dict of headline metrics plus
    "task/errors" counts. The model is put in eval mode for the call and restored afterwards."""
    model = getattr(florence, "model", None)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        import torch

        with torch.no_grad():
            report = evaluate(florence, samples, tasks, limit=limit, batch_size=batch_size, progress=False)
    finally:
        if was_training:
            model.train()
    out = report.headline()
    out.update({f"{n}/errors": float(t.errors) for n, t in report.tasks.items() if t.errors})
    return out


def swap_images(samples: Sequence[Any]) -> list[Any]:
    """Copies of `samples` where sample i shows the image of sample i+1 (the last, the first's) and keeps its own
    ground truth: a model that uses the image falls to chance on them, a blind one does not notice."""
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError("swapping images needs at least 2 samples")
    out = []
    for i, sample in enumerate(samples):
        donor = samples[(i + 1) % len(samples)]
        out.append(dataclasses.replace(sample, image=donor.image, image_path=donor.image_path))
    return out


def evaluate_zero_shot(florence, samples: Sequence[Any], labels: Sequence[str] | None = None, batch_size: int = 16):
    """Zero-shot classification of each sample's `label` with the image-text heads -> TaskReport "zero_shot"
    (top-1 accuracy over the candidate `labels`, default: every label in `samples`)."""
    from fiore.embeddings import embed_images, embed_texts

    report = TaskReport(task="zero_shot", headline=("top1",))
    labelled = [s for s in samples if getattr(s, "label", None)]
    report.no_examples = len(samples) - len(labelled)
    labels = sorted({s.label for s in labelled}) if labels is None else list(labels)
    if not labelled or not labels:
        return report
    template = florence.config.contrastive_template
    texts = embed_texts(florence, [template.format(label) for label in labels])
    correct = 0
    for i in range(0, len(labelled), batch_size):
        chunk = labelled[i : i + batch_size]
        try:
            images = embed_images(florence, [s.load_image() for s in chunk])
        except Exception as e:  # isolate: count the chunk as errors, keep going
            report.add_error(f"images {[s.image_id for s in chunk]}: {type(e).__name__}: {e}", count=len(chunk))
            continue
        best = (images @ texts.t()).argmax(1).tolist()
        correct += sum(labels[b] == s.label for b, s in zip(best, chunk, strict=True))
        report.examples += len(chunk)
        report.samples += len(chunk)
    if report.examples:
        report.metrics = {"top1": correct / report.examples, "candidates": float(len(labels))}
    return report
