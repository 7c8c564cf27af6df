"""From user input to engine calls, shared by `fiore predict`, `fiore label` and the server.

A job is a (task name, text, region) triple: each task gets only the input it takes, so one request can mix
`od`, `caption_to_phrase_grounding` (text) and `region_to_category` (region).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Job = tuple[str, "str | None", "tuple[float, float, float, float] | None"]


class InputError(ValueError):
    """Bad user input (unknown task, missing or malformed text/region); the message says what to fix."""


def open_image(src: str | Path | bytes, max_pixels: int | None = None):
    """RGB PIL image from a path or bytes, via `fiore.processor.load_image` (EXIF applied, clear errors);
    `max_pixels` default: fiore.processor.DEFAULT_MAX_PIXELS."""
    from fiore.processor import DEFAULT_MAX_PIXELS, load_image

    return load_image(src, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)


def parse_region(value) -> tuple[float, float, float, float] | None:
    """ "x1,y1,x2,y2" or a 4-sequence of pixels -> tuple, or None when empty."""
    import math

    if value is None or value == "" or value == []:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        region = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise InputError(f"region must be four numbers x1,y1,x2,y2; got {value!r}") from None
    if len(region) != 4 or not all(math.isfinite(v) for v in region):
        raise InputError(f"region must be four finite numbers x1,y1,x2,y2; got {value!r}")
    x1, y1, x2, y2 = region
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"region must have x1 < x2 and y1 < y2; got {value!r}")
    return region


def expand_tasks(names: Sequence[str]) -> list:
    """Task objects for names (or tokens); "all" = every task that needs no input. Duplicates dropped."""
    from fiore import tasks as registry

    out, seen = [], set()
    for name in names:
        if name == "all":
            found = [t for t in registry.all() if t.inputs == "none"]
        else:
            try:
                found = [registry.get(name)]
            except (KeyError, ValueError):
                raise InputError(f"unknown task {name!r}; known tasks: all, {', '.join(registry.names())}") from None
        for t in found:
            if t.name not in seen:
                seen.add(t.name)
                out.append(t)
    return out


def make_jobs(task_names: Sequence[str], text: str | None, region, image_size: tuple[int, int]) -> list[Job]:
    """Validated jobs for one image of `image_size` (width, height)."""
    if not task_names:
        raise InputError("give at least one task (see `fiore tasks` or GET /v1/tasks)")
    text = (text.strip() or None) if text is not None else None
    region = parse_region(region)
    W, H = image_size
    # The API's rule (Task.region_tokens): a region must overlap the image; a part beyond an edge is clamped there
    # by quantization, as official checkpoints' processor does (a detector's box often overshoots by a pixel).
    if region is not None and (region[2] < 0 or region[3] < 0 or region[0] > W or region[1] > H):
        raise InputError(f"region {list(region)} lies outside the {W}x{H} image")
    jobs = []
    for t in expand_tasks(task_names):
        if t.inputs == "text" and text is None:
            raise InputError(f"task {t.name} needs text ({t.description})")
        if t.inputs == "region" and region is None:
            raise InputError(f"task {t.name} needs a region x1,y1,x2,y2 in pixels ({t.description})")
        t_text = text if t.inputs == "text" else None
        t_region = region if t.inputs == "region" else None
        try:
            t.prompt(text=t_text, region=list(t_region) if t_region else None, image_size=image_size)
        except (ValueError, TypeError) as e:
            raise InputError(f"task {t.name}: {e}") from None
        jobs.append((t.name, t_text, t_region))
    return jobs


def predict_batch(
    florence, images: Sequence, task: str, text: str | None = None, region=None, max_new_tokens: int | None = None
) -> list:
    """`florence.predict` over a list of images, always returning a list of Results (one per image).
    `max_new_tokens` caps generation (None: each task's own budget)."""
    kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if text is not None:
        kwargs["text"] = text
    if region is not None:
        kwargs["region"] = list(region)
    out = florence.predict(list(images), task, **kwargs)
    out = out if isinstance(out, list) else [out]
    if len(out) != len(images):
        raise RuntimeError(f"predict returned {len(out)} results for {len(images)} images")
    return out


def run_batch(florence, images: Sequence, jobs: Sequence[Job], max_new_tokens: int | None = None) -> list[dict]:
    """The same jobs on every image -> one {task name: Result} per image, in one `florence.run` call: each image is
    encoded once and all its tasks are decoded together. `max_new_tokens` caps every task's generation."""
    spec = {}
    for name, text, region in jobs:
        inputs = {}
        if text is not None:
            inputs["text"] = text
        if region is not None:
            inputs["region"] = list(region)
        spec[name] = inputs
    kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    out = florence.run(list(images), spec, **kwargs)
    if len(out) != len(images):
        raise RuntimeError(f"run returned {len(out)} answers for {len(images)} images")
    return [{name: answer[name] for name in spec} for answer in out]


def run_jobs(florence, image, jobs: Sequence[Job], max_new_tokens: int | None = None) -> dict:
    """Every job on one image -> {task name: Result}, the image encoded once."""
    return run_batch(florence, [image], jobs, max_new_tokens)[0]
