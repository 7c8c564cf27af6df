"""What a training run reports as it goes: OUT/metrics.jsonl (one JSON record per line) and the progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Logger:
    """metrics.jsonl (rank 0) plus a rich progress bar on a terminal, or plain lines every log_every steps."""

    def __init__(self, path: Path, total: int, start: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 - closed in close()
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def step(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def write(self, record: dict, echo: bool = False) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if echo and self.bar is None:
            print(json.dumps(record), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.file is not None:
            self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume drop records past the checkpoint step: those steps run again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
