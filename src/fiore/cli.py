"""The `fiore` command line: a thin shell over library functions (typer + rich). Each command imports what it needs."""

from __future__ import annotations

from typing import Annotated

import typer

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
) -> None:
    """Train a model from a preset or fine-tune a checkpoint (torchrun for several processes / machines)."""
    from fiore.train.config import ConfigError, load_config, parse_override
    from fiore.train.loop import train as run

    try:
        cfg = load_config(config, dict(parse_override(s) for s in set_ or []))
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="CONFIG / --set") from None
    final = run(cfg, resume=resume)
    typer.echo(f"final model: {final}")


if __name__ == "__main__":
    app()
