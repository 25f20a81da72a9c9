"""What validation says about a Fuzzfile: errors and warnings that name file, line and field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Diagnostic", "FieldPath", "Severity", "format_path"]

# A path into the document: mapping keys (str) and sequence indexes (int).
FieldPath = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class Severity(StrEnum):
    """How much a finding matters: errors fail validation, warnings do not."""

    ERROR = "error"
    WARNING = "warning"


def format_path(path: FieldPath) -> str:
    """Render a field path as `jobs.run-lammps.resource.memory.size`.

    Keys that are not plain words (`/scratch`, `nvidia.com/gpu`) are quoted in brackets and
    sequence indexes are bracketed, so that every rendered path points at one place.
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out or "<document>"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding: where it is (file, line, column, field path), what is wrong, how to fix it."""

    severity: Severity
    message: str
    path: FieldPath = ()
    file: str = "<string>"
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None
    code: str = "invalid"

    @property
    def field(self) -> str:
        """The field path, rendered."""
        return format_path(self.path)

    def render(self) -> str:
        """One line (two with a hint) in the `file:line:col: severity: field: message` style."""
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: {self.severity.value}: {self.field}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text

    def to_json(self) -> dict[str, object]:
        """A plain mapping for `-o json` reports."""
        return {
            "severity": self.severity.value,
            "code": self.code,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "path": list(self.path),
            "message": self.message,
            "hint": self.hint,
        }
