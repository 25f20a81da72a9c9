"""Contexts: named servers the CLI can talk to, kept in $XDG_CONFIG_HOME/squall/contexts.yaml
(0600: it holds tokens). `--context NAME` or $SQUALL_CONTEXT picks one for a command; without
either, the current one; with none set, commands work on this machine's store (local mode)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import NotFound, UsageError

__all__ = ["LOCAL", "Context", "ContextFile"]

LOCAL = "local"  # the built-in context: this machine's store, no server


@dataclass(frozen=True, slots=True)
class Context:
    name: str
    server: str  # host:port
    token: str
    ca_file: str = ""  # PEM of the CA that signed the server's certificate; empty: plaintext


def _path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "squall" / "contexts.yaml"


class ContextFile:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or _path()
        data: dict[str, Any] = {}
        if self.path.exists():
            data = yaml.safe_load(self.path.read_text()) or {}
        self.current: str = data.get("current", LOCAL)
        self.contexts = {
            name: Context(name=name, **fields) for name, fields in data.get("contexts", {}).items()
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {
            "current": self.current,
            "contexts": {
                n: {k: v for k, v in asdict(c).items() if k != "name"}
                for n, c in sorted(self.contexts.items())
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, self.path)

    def add(self, context: Context) -> None:
        if context.name == LOCAL:
            raise UsageError(f"{LOCAL!r} is the built-in context for this machine; pick another")
        self.contexts[context.name] = context

    def use(self, name: str) -> None:
        if name != LOCAL and name not in self.contexts:
            raise NotFound(f"no context {name!r}; `squall context list` shows them")
        self.current = name

    def selected(self, name: str | None = None) -> Context | None:
        """The context a command uses (None: local mode)."""
        chosen = name or os.environ.get("SQUALL_CONTEXT") or self.current
        if chosen == LOCAL:
            return None
        if chosen not in self.contexts:
            raise NotFound(f"no context {chosen!r}; `squall context list` shows them")
        return self.contexts[chosen]
