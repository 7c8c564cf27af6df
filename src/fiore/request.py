"""What a user asks of an image: one `Request` type, validated by its `Task`, for every way in (library, CLI,
server, label, eval).

    Request.make("caption_to_phrase_grounding", text="a red ball")  -> Request (inputs checked by the Task)
    requests_for(["od", "region_to_category"], region=(10, 10, 50, 60))  -> one Request per task, each with only
                                                                          the input its task takes

The rules live in `Task.check_inputs` (the request alone) and `Task.region_tokens` (the region against the image,
checked by `Request.prompt` when the image is known), so every caller refuses the same inputs with the same message.
Errors are `fiore.tasks.TaskInputError` (a ValueError).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fiore import tasks as registry
from fiore.tasks import Task, TaskInputError


@dataclass(frozen=True)
class Request:
    """One task with its inputs. `region`: (x1, y1, x2, y2) pixels of the image, or a string of 4 loc tokens;
    `max_new_tokens`: the generation budget (None: the task's own)."""

    task: Task
    text: str | None = None
    region: tuple[float, float, float, float] | str | None = None
    max_new_tokens: int | None = None

    @classmethod
    def make(cls, task: str | Task, text: str | None = None, region=None, max_new_tokens: int | None = None) -> Request:
        """A validated request: the task known, its inputs present and well formed, nothing it does not take."""
        task = get_task(task)
        text, region = task.check_inputs(text, region)
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise TaskInputError(
                    f"max_new_tokens for {task.name} must be a positive integer, got {max_new_tokens!r}"
                )
        return cls(task, text, region, max_new_tokens)

    def parts(self) -> list[Request]:
        """The rows this request is decoded as: one per class for a task that takes a class list ("red star; blue
        circle", duplicates and empty entries dropped), else itself. The rows share the image's encoding and their
        results are merged back into one (`fiore.results.Mixed.merge`)."""
        if not self.task.class_list or self.text is None or ";" not in self.text:
            return [self]
        classes = list(dict.fromkeys(c.strip() for c in self.text.split(";") if c.strip()))
        if not classes:
            raise TaskInputError(f"task {self.task.name}: no class names in {self.text!r}")
        return [dataclasses.replace(self, text=c) for c in classes]

    def prompt(self, image_size: tuple[int, int]) -> str:
        """The prompt for an image of `image_size` (width, height); TaskInputError when the region misses it."""
        return self.task.prompt(text=self.text, region=self.region, image_size=image_size)


def get_task(task: str | Task) -> Task:
    """The Task for a name or token; an unknown one is a TaskInputError listing the known names."""
    if isinstance(task, Task):
        return task
    try:
        return registry.get(task)
    except (KeyError, ValueError, TypeError):
        raise TaskInputError(f"unknown task {task!r}; known tasks: {', '.join(registry.names())}") from None


def parse_region(value) -> tuple[float, float, float, float] | None:
    """A region as a user types it ("x1,y1,x2,y2", or 4 numbers) -> 4 floats; None when empty. Only the form is
    checked here; `Task.check_inputs` holds the rules."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        region = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise TaskInputError(f"region must be four numbers x1,y1,x2,y2; got {value!r}") from None
    if len(region) != 4 or not all(math.isfinite(v) for v in region):
        raise TaskInputError(f"region must be four finite numbers x1,y1,x2,y2; got {value!r}")
    return region


def requests_for(
    task_names: Sequence[str], text: str | None = None, region=None, max_new_tokens: int | None = None
) -> list[Request]:
    """One request per named task ("all" = every task that takes no input; duplicates dropped), sharing one text
    and one region: each task gets only the input it takes, and one that needs an input nobody gave is refused."""
    if not task_names:
        raise TaskInputError("give at least one task (see `fiore tasks` or GET /v1/tasks)")
    text = (text.strip() or None) if isinstance(text, str) else text
    region = parse_region(region)
    chosen: dict[str, Task] = {}
    for name in task_names:
        if name == "all":
            found = [t for t in registry.all() if t.inputs == "none"]
        else:
            try:
                found = [get_task(name)]
            except TaskInputError as e:
                raise TaskInputError(f"{e} (or all: every task that takes no input)") from None
        chosen.update((t.name, t) for t in found if t.name not in chosen)
    return [
        Request.make(
            task,
            text if task.inputs == "text" else None,
            region if task.inputs == "region" else None,
            max_new_tokens,
        )
        for task in chosen.values()
    ]
