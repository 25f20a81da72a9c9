"""Application templates: a Go-templated Fuzzfile and the `values.yaml` that feeds it.

`values.yaml` (spec §10) lists parameters, each with a `name` and exactly one of
`uint_value`, `string_value`, `bool_value`, `secret_value: {reference}` or
`volume_value: {reference}`. `render_app` renders the template with those values, overridden
by `KEY=VALUE` settings, and reports problems as `AppError` with the file and line.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidInput, UsageError
from .gotemplate import FailError, TemplateError, parse, render

__all__ = ["AppError", "AppValue", "load_values", "render_app"]

_KINDS = (
    "uint_value",
    "string_value",
    "bool_value",
    "secret_value",
    "volume_value",
    "int_value",
    "float_value",
)


class AppError(InvalidInput):
    """A template or its values that cannot be rendered; `str()` names file and line."""

    def __init__(
        self,
        message: str,
        file: str,
        line: int | None = None,
        column: int | None = None,
        *,
        refused: bool = False,
    ) -> None:
        self.message, self.file, self.line, self.column = message, file, line, column
        self.refused = refused  # the template's own `fail` refused the values
        where = file + (f":{line}" if line else "") + (f":{column}" if line and column else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class AppValue:
    """One template parameter: its name, kind (`uint_value`, ...) and value."""

    name: str
    kind: str
    value: Any
    display_name: str | None = None


def load_values(path: str | Path) -> dict[str, AppValue]:
    """Read a catalog `values.yaml` into parameters by name."""
    name = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AppError(f"cannot read values: {exc.strerror or exc}", name) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise AppError(
            f"values are not valid YAML: {getattr(exc, 'problem', exc)}",
            name,
            mark.line + 1 if mark else None,
        ) from None
    if raw is None:
        return {}
    entries = raw.get("values") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise AppError("values.yaml must hold `values:`, a list of parameters", name)
    out: dict[str, AppValue] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise AppError(f"values[{i}] needs a `name`", name)
        kinds = [k for k in _KINDS if k in entry]
        if len(kinds) != 1:
            raise AppError(
                f"value {entry['name']!r} needs exactly one of {', '.join(_KINDS[:5])}", name
            )
        kind = kinds[0]
        value = entry[kind]
        if kind in ("secret_value", "volume_value"):
            value = value.get("reference", "") if isinstance(value, dict) else value
        out[entry["name"]] = AppValue(entry["name"], kind, value, entry.get("display_name"))
    return out


def _override(current: AppValue | None, key: str, text: str) -> AppValue:
    kind = current.kind if current else "string_value"
    value: Any = text
    if kind in ("uint_value", "int_value"):
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"--set {key}={text}: {key} takes a whole number") from None
        if kind == "uint_value" and value < 0:
            raise UsageError(f"--set {key}={text}: {key} takes a number >= 0")
    elif kind == "float_value":
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--set {key}={text}: {key} takes a number") from None
    elif kind == "bool_value":
        if text.lower() not in ("true", "false"):
            raise UsageError(f"--set {key}={text}: {key} takes true or false")
        value = text.lower() == "true"
    return AppValue(key, kind, value, current.display_name if current else None)


def render_app(
    template: str | Path,
    values: str | Path | None = None,
    settings: Iterable[str] = (),
    *,
    seed: int | None = None,
) -> str:
    """Render `template` with `values` and `KEY=VALUE` settings into Fuzzfile text."""
    params = load_values(values) if values is not None else {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {setting!r}: write NAME=VALUE")
        params[key] = _override(params.get(key), key, text)
    name = str(template)
    try:
        source = Path(template).read_text(encoding="utf-8")
    except OSError as exc:
        raise AppError(f"cannot read template: {exc.strerror or exc}", name) from None
    data: Mapping[str, Any] = {k: v.value for k, v in params.items()}
    try:
        return render(parse(source), data, rng=random.Random(seed))
    except FailError as exc:
        raise AppError(
            f"the template refused its values: {exc.message}",
            name,
            exc.line,
            exc.column,
            refused=True,
        ) from None
    except TemplateError as exc:
        raise AppError(exc.message, name, exc.line, exc.column) from None
