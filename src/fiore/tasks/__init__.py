"""Tasks: one `Task` object per task (prompt, target serializer, output parser, examples from a Sample).

fiore.tasks.get("od")        # by name, or by token: get("<OD>")
fiore.tasks.names()          # ["caption", "detailed_caption", ...]
fiore.tasks.get("od").parse("</s><s>car<loc_54><loc_375><loc_906><loc_707></s>", image_size=(800, 600))
"""

from __future__ import annotations

from fiore.tasks.base import Example, Task, TaskInputError
from fiore.tasks.catalogue import TASKS

_BY_KEY = {t.name: t for t in TASKS} | {t.token: t for t in TASKS}


def get(name_or_token: str | Task) -> Task:
    """A task by name ("od"), token ("<OD>") or the Task itself; names are case-insensitive."""
    if isinstance(name_or_token, Task):
        return name_or_token
    key = str(name_or_token).strip()
    task = _BY_KEY.get(key) or _BY_KEY.get(key.lower()) or _BY_KEY.get(key.upper())
    if task is None:
        raise KeyError(f"unknown task {name_or_token!r}; known tasks: {', '.join(names())}")
    return task


def names() -> list[str]:
    return [t.name for t in TASKS]


def all() -> list[Task]:  # noqa: A001 - the contract's name
    return list(TASKS)


__all__ = ["Example", "Task", "TaskInputError", "all", "get", "names"]
