"""Command groups that import and build each command the first time it is looked up.

Typer builds every command of an app before it runs one (it reads each function's signature
and type hints), and registering the commands would import every command module. A
`LazyGroup` names its commands up front and builds one when Click looks it up:
`squall workflow validate` imports `cli.workflow_cmd` alone and builds only `validate`;
`squall --help` imports the command modules for their help text but builds no group's
commands. Commands are built by Typer's own functions, with the settings `app.add_typer` and
`app.command` would give them, so their help and behaviour are Typer's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from functools import partial
from importlib import import_module
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import typer
from typer.core import MarkupMode, TyperGroup
from typer.main import (
    get_command_from_info,
    get_command_name,
    get_group_from_info,
    solve_typer_info_defaults,
)
from typer.models import CommandInfo, TyperInfo

if TYPE_CHECKING:
    from typer._click import Command

__all__ = ["LazyCommands", "LazyGroup"]


class LazyCommands(MutableMapping[str, "Command"]):
    """A group's commands by name, in the order added; each is built when first read.

    Names are known without building (`in`, `keys()`, iteration): Click's "Did you mean"
    suggestions and dispatch look at names, and only the command that runs is built."""

    def __init__(self) -> None:
        self._builders: dict[str, Callable[[], Command]] = {}
        self._built: dict[str, Command] = {}

    def add(self, name: str, builder: Callable[[], Command]) -> None:
        """Name a command that `builder` makes when it is first read."""
        self._builders[name] = builder
        self._built.pop(name, None)

    def __getitem__(self, name: str) -> Command:
        command = self._built.get(name)
        if command is None:
            command = self._built[name] = self._builders[name]()
        return command

    def __setitem__(self, name: str, command: Command) -> None:
        self._builders[name] = partial(_same, command)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._builders[name]
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def _same(command: Command) -> Command:
    return command


class _Settings(NamedTuple):
    """What Typer hands from the top-level app down to every command it builds."""

    pretty_exceptions_short: bool
    rich_markup_mode: MarkupMode
    suggest_commands: bool


class LazyGroup(TyperGroup):
    """A Typer group (pass it as `typer.Typer(cls=...)`) that adds the commands in `lazy`,
    after any registered with Typer, and builds each the first time it is looked up.

    `lazy` maps a command's name to `"module:attribute"`: a Typer app, added as
    `app.add_typer(sub, name=NAME)` would add it (its own commands are lazy too), or a
    function, added as `app.command(name=NAME)` would add it."""

    lazy: ClassVar[Mapping[str, str]] = {}
    # Typer's default; it hands the top-level app's value to each command (a traceback hint)
    pretty_exceptions_short: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        settings = _Settings(
            self.pretty_exceptions_short, self.rich_markup_mode, self.suggest_commands
        )
        commands = LazyCommands()
        for name, command in self.commands.items():
            commands[name] = command
        for name, target in self.lazy.items():
            commands.add(name, partial(_import_and_build, name, target, settings))
        self.commands = commands


def _import_and_build(name: str, target: str, settings: _Settings) -> Command:
    module, _, attribute = target.partition(":")
    found = getattr(import_module(module), attribute)
    if isinstance(found, typer.Typer):
        return _group(TyperInfo(found, name=name), settings)
    return _command(CommandInfo(name=name, callback=found), settings)


def _command(info: CommandInfo, settings: _Settings) -> Command:
    return get_command_from_info(
        info,
        pretty_exceptions_short=settings.pretty_exceptions_short,
        rich_markup_mode=settings.rich_markup_mode,
    )


def _group(info: TyperInfo, settings: _Settings) -> TyperGroup:
    """The group `info` describes (its help, callback and options) with its commands lazy."""
    sub = info.typer_instance
    assert isinstance(sub, typer.Typer)
    shell = copy.copy(sub)  # the same app without its commands, for Typer to build the group
    shell.registered_commands = []
    shell.registered_groups = []
    shell_info = copy.copy(info)
    shell_info.typer_instance = shell
    group = get_group_from_info(
        shell_info,
        pretty_exceptions_short=settings.pretty_exceptions_short,
        rich_markup_mode=settings.rich_markup_mode,
        suggest_commands=settings.suggest_commands,
    )
    commands = LazyCommands()
    for command in sub.registered_commands:  # Typer's order: commands, then groups
        assert command.callback is not None
        name = command.name or get_command_name(command.callback.__name__)
        commands.add(name, partial(_command, command, settings))
    for child in sub.registered_groups:
        child_name = solve_typer_info_defaults(child).name
        if not child_name:
            raise ValueError(f"{group.name}: a group added without a name cannot be lazy")
        commands.add(child_name, partial(_group, child, settings))
    group.commands = commands
    return group
