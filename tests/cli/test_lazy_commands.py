"""The CLI builds its commands lazily (cli/lazy.py) and must look and behave exactly as the
same commands registered with Typer the usual way (`add_typer`, `command`), which builds them
all up front: every help page, the order commands are listed in, and the usage errors."""

from __future__ import annotations

import copy
from importlib import import_module

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from cli.lazy import LazyCommands
from cli.main import COMMANDS, app


def eager_app() -> typer.Typer:
    """The top-level app with every command in COMMANDS registered up front."""
    eager = copy.copy(app)
    eager.info = copy.copy(app.info)
    eager.info.cls = None  # a plain TyperGroup
    eager.registered_commands = list(app.registered_commands)
    eager.registered_groups = list(app.registered_groups)
    for name, target in COMMANDS.items():
        module, _, attribute = target.partition(":")
        found = getattr(import_module(module), attribute)
        if isinstance(found, typer.Typer):
            eager.add_typer(found, name=name)
        else:
            eager.command(name=name)(found)
    return eager


def every_command_path() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [()]

    def walk(command: object, path: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append((*path, name))
            walk(sub, (*path, name))

    walk(typer.main.get_command(eager_app()), ())
    return paths


PATHS = every_command_path()


def invoke(cli: typer.Typer, args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "100", "FORCE_COLOR": "1"})
    return result.exit_code, result.output


def test_every_command_is_listed() -> None:
    assert len(PATHS) > 30  # the root, 11 top-level commands and the groups' commands
    assert {path[0] for path in PATHS if path} == set(COMMANDS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "squall")
def test_help_is_typers(path: tuple[str, ...]) -> None:
    args = [*path, "--help"]
    assert invoke(app, args) == invoke(eager_app(), args)


@pytest.mark.parametrize(
    "args",
    [
        [],  # no command: the help
        ["wrkflow"],  # "Did you mean 'workflow'?"
        ["workflow"],
        ["workflow", "valdate"],
        ["workflow", "validate"],  # a missing argument
        ["workflow", "validate", "--output", "xml", "x.yaml"],
        ["catalog", "show", "--bogus"],
        ["run", "--bogus"],
    ],
)
def test_usage_errors_are_typers(args: list[str]) -> None:
    assert invoke(app, args) == invoke(eager_app(), args)


def test_names_are_known_without_building() -> None:
    built: list[str] = []

    def builder(name: str) -> typer.core.TyperCommand:
        built.append(name)
        return typer.core.TyperCommand(name=name)

    commands = LazyCommands()
    for name in ("one", "two", "three"):
        commands.add(name, lambda name=name: builder(name))
    assert list(commands) == ["one", "two", "three"]
    assert "two" in commands
    assert "four" not in commands
    assert len(commands) == 3
    assert commands.get("four") is None
    assert built == []
    assert commands["two"] is commands["two"]
    assert built == ["two"]  # built once, when first read
