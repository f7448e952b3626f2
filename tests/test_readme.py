"""The README's command synopsis and the CLI's --help agree option by option."""

from __future__ import annotations

import re

import pytest
import typer
from conftest import REPO

from lrdeploy.cli import app

COMMANDS = ("compress", "eval", "export", "inspect", "bench")


def readme_synopsis() -> dict[str, set[str]]:
    """Options named in the README's fenced synopsis, per command (continuation lines are indented)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    options: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        m = re.match(r"lrdeploy (\w+)", line)
        if m:
            command = m.group(1)
        if command:
            options.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line))
    return options


def help_options(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    return opts - {"--help", "-h"}


@pytest.mark.parametrize("name", COMMANDS)
def test_readme_lists_every_option_of(name):
    synopsis = readme_synopsis()
    assert name in synopsis, f"the README's synopsis has no 'lrdeploy {name}'"
    assert synopsis[name] == help_options(name)
