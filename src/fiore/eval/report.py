"""The evaluation report: per-task metrics and counts, written as JSON, Markdown, a rich table, and the raw
predictions (predictions.jsonl) from which any metric can be recomputed with the reference libraries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_ERROR_MESSAGES = 5


@dataclass
class TaskReport:
    """One task's outcome. `samples`: samples that gave it at least one example; `examples`: examples scored;
    `no_examples`: samples without ground truth for this task (not errors); `errors`: bad samples or examples
    (image load, example construction, model output or metric failures), with the first few `error_messages`;
    `truncated`: predictions that hit max_new_tokens; `parse_warnings`: predictions the parser only partly read."""

    task: str
    metrics: dict[str, float | str] = field(default_factory=dict)
    headline: tuple[str, ...] = ()
    samples: int = 0
    examples: int = 0
    no_examples: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    truncated: int = 0
    parse_warnings: int = 0

    def add_error(self, message: str, count: int = 1) -> None:
        """Count `count` lost examples (or one failed step) under one message."""
        self.errors += count
        if len(self.error_messages) < MAX_ERROR_MESSAGES:
            self.error_messages.append(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metrics": {k: _json_number(v) for k, v in self.metrics.items()},
            "headline": list(self.headline),
            "samples": self.samples,
            "examples": self.examples,
            "no_examples": self.no_examples,
            "errors": self.errors,
            "error_messages": list(self.error_messages),
            "truncated": self.truncated,
            "parse_warnings": self.parse_warnings,
        }


@dataclass
class Report:
    tasks: dict[str, TaskReport]
    meta: dict[str, Any] = field(default_factory=dict)  # model, data, n_samples, seconds, batch_size
    predictions: list[dict[str, Any]] = field(default_factory=list)  # one record per (sample, task)

    def headline(self) -> dict[str, float]:
        """Flat {"task/metric": value} of each task's headline metrics (for logs and the training loop); tasks
        with no scored example are left out, undefined values are NaN."""
        out: dict[str, float] = {}
        for name, t in self.tasks.items():
            if t.examples == 0:
                continue
            for key in t.headline:
                value = t.metrics.get(key)
                if isinstance(value, (int, float)):
                    out[f"{name}/{key}"] = float(value)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "tasks": {k: v.to_json() for k, v in self.tasks.items()}}

    def to_markdown(self) -> str:
        lines = ["# fiore evaluation", ""]
        for key in ("model", "data", "n_samples", "seconds"):
            if key in self.meta:
                lines.append(f"- {key}: {self.meta[key]}")
        lines += ["", "| task | headline | examples | errors | truncated |", "|---|---|---:|---:|---:|"]
        for name, t in self.tasks.items():
            head = ", ".join(f"{k} {format_value(t.metrics.get(k))}" for k in t.headline) or "-"
            lines.append(f"| {name} | {head} | {t.examples} | {t.errors} | {t.truncated} |")
        for name, t in self.tasks.items():
            lines += ["", f"## {name}", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {format_value(v)} |" for k, v in t.metrics.items()]
            lines += [
                "",
                f"samples {t.samples}, examples {t.examples}, without ground truth {t.no_examples}, "
                f"errors {t.errors}, truncated {t.truncated}, parse warnings {t.parse_warnings}",
            ]
            lines += [f"- error: {m}" for m in t.error_messages]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> dict[str, Path]:
        """Write `path` (JSON), the same name with .md, and predictions.jsonl beside them; returns the paths."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        md = path.with_suffix(".md")
        preds = path.parent / "predictions.jsonl"
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        md.write_text(self.to_markdown())
        with preds.open("w") as f:
            for record in self.predictions:
                f.write(json.dumps(_sanitize(record), allow_nan=False) + "\n")
        return {"json": path, "markdown": md, "predictions": preds}

    def print(self, console=None) -> None:
        """One rich table per task."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console()
        for name, t in self.tasks.items():
            table = Table(title=f"{name}  ({t.examples} examples, {t.errors} errors, {t.truncated} truncated)")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for k, v in t.metrics.items():
                table.add_row(f"[bold]{k}[/bold]" if k in t.headline else k, format_value(v))
            console.print(table)
            for m in t.error_messages:
                console.print(f"  [red]error[/red] {escape(str(m))}")


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _sanitize(x: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, recursively, so the JSON is strict."""
    if isinstance(x, float):
        return _json_number(x)
    if isinstance(x, dict):
        return {str(k): _sanitize(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_sanitize(v) for v in x]
    return x
