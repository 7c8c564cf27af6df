"""The `fiore` command line: a thin shell over library functions (typer + rich). Each command imports what it needs."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="fiore: one vision model for many tasks.")


@app.callback()
def main() -> None:
    """fiore: one vision model for many tasks."""


if __name__ == "__main__":
    app()
