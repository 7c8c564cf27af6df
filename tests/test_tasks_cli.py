"""`fiore tasks` lists every task with its token, input kind and prompt."""

from typer.testing import CliRunner

from fiore import tasks
from fiore.cli import app


def test_fiore_tasks_command():
    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    for t in tasks.all():
        assert t.name in result.output and t.token in result.output
    assert "Locate the objects with category name in the image." in result.output
    assert "region" in result.output and "text" in result.output
