"""Load a Fuzzfile: YAML with positions -> version schema -> `Workflow` -> rules.

`load_text`/`load_bytes`/`load_file` never raise for a bad document, however hostile: every
problem becomes a `Diagnostic` with file, line, column and field path, and all of them are
reported together; the cost is bounded by `limits`. Only the stages that can run do: rules
need a document that passed the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import InvalidInput
from .diagnostics import Diagnostic, FieldPath, Severity, format_path
from .limits import MAX_FUZZFILE_BYTES
from .model import Workflow
from .normalize import normalize
from .rules import run_rules
from .schema import DOCUMENT_MODELS, LEGACY_KEYS, allowed_keys
from .source import SourceDocument, SourceError, check_size, decode, parse_yaml

__all__ = ["FuzzfileError", "LoadResult", "load_bytes", "load_file", "load_text", "read_source"]

# A message quotes values from the file; past this many characters its middle is cut.
MAX_MESSAGE = 1000


class FuzzfileError(InvalidInput):
    """A Fuzzfile that cannot be used; `diagnostics` says everything that is wrong with it."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        errors = [d for d in diagnostics if d.severity is Severity.ERROR]
        super().__init__("\n".join(d.render() for d in errors) or "invalid Fuzzfile")
        self.diagnostics = diagnostics


@dataclass(slots=True)
class LoadResult:
    """What loading one file gave: the workflow (when valid) and every finding."""

    file: str
    version: str | None = None
    workflow: Workflow | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    source: SourceDocument | None = None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.WARNING]

    @property
    def ok(self) -> bool:
        return self.workflow is not None and not self.errors

    def unwrap(self) -> Workflow:
        """The workflow, or `FuzzfileError` with every diagnostic."""
        if not self.ok or self.workflow is None:
            raise FuzzfileError(self.diagnostics)
        return self.workflow


def read_source(path: str | Path) -> str:
    """The text of the Fuzzfile at `path`, read no further than the size limit; raises
    `FuzzfileError` when it cannot be read, is too large or is not UTF-8."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FUZZFILE_BYTES + 1)
            size = os.fstat(f.fileno()).st_size  # 0 for a pipe or a device: unknown
            if len(data) > MAX_FUZZFILE_BYTES:
                check_size(max(size, len(data)), name, at_least=size < len(data))
        return decode(data, name)
    except SourceError as exc:
        raise FuzzfileError(exc.diagnostics) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        diagnostic = Diagnostic(Severity.ERROR, f"cannot read file: {reason}", (), name, code="io")
        raise FuzzfileError([diagnostic]) from None


def load_file(path: str | Path) -> LoadResult:
    """Load and validate the Fuzzfile at `path`."""
    try:
        text = read_source(path)
    except FuzzfileError as exc:
        return LoadResult(str(path), diagnostics=exc.diagnostics)
    return load_text(text, str(path))


def load_bytes(data: bytes, file: str = "<bytes>") -> LoadResult:
    """Load and validate a Fuzzfile's bytes (UTF-8), as received from a client."""
    try:
        text = decode(data, file)
    except SourceError as exc:
        return LoadResult(file, diagnostics=exc.diagnostics)
    return load_text(text, file)


def load_text(text: str, file: str = "<string>") -> LoadResult:
    """Load and validate Fuzzfile text; `file` names it in diagnostics."""
    try:
        result = _load(text, file)
    except Exception as exc:  # a defect of the loader: still a diagnostic, never a crash
        import logging  # here, not at import: `squall workflow validate` starts without it

        logging.getLogger("squall.fuzzfile").exception("validating %s failed", file)
        message = f"internal error while validating: {type(exc).__name__}: {exc}"
        diagnostic = Diagnostic(Severity.ERROR, message, (), file, code="internal")
        result = LoadResult(file, diagnostics=[diagnostic])
    result.diagnostics = [_clipped(d) for d in result.diagnostics]
    return result


def _clipped(d: Diagnostic) -> Diagnostic:
    """`d` with its message and hint cut in the middle where they quote too much."""
    message, hint = _clip(d.message), _clip(d.hint) if d.hint else d.hint
    if message is d.message and hint is d.hint:
        return d
    return dataclasses.replace(d, message=message, hint=hint)


def _clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE:
        return text
    keep = MAX_MESSAGE // 2
    return f"{text[:keep]} [... {len(text) - 2 * keep:,} characters ...] {text[-keep:]}"


def _load(text: str, file: str) -> LoadResult:
    result = LoadResult(file)
    try:
        source = parse_yaml(text, file)
    except SourceError as exc:
        result.diagnostics = exc.diagnostics
        return result
    result.source = source
    version_error = _check_version(source)
    if version_error is not None:
        result.diagnostics = [version_error]
        return result
    result.version = source.data["version"]
    schema = DOCUMENT_MODELS[source.data["version"]]
    try:
        document = schema.model_validate(source.data)
    except ValidationError as exc:
        result.diagnostics = _schema_diagnostics(exc, source, schema)
        return result
    workflow = normalize(document)
    for finding in run_rules(workflow):
        pos = source.locate(finding.path)
        result.diagnostics.append(
            Diagnostic(
                finding.severity,
                finding.message,
                finding.path,
                file,
                pos.line if pos else None,
                pos.column if pos else None,
                finding.hint,
                finding.code,
            )
        )
    result.workflow = workflow
    return result


def _check_version(source: SourceDocument) -> Diagnostic | None:
    data = source.data
    hint = "start the file with `version: v4` (or `version: v1` for the legacy syntax)"
    root = source.locate(())
    line, column = (root.line, root.column) if root else (1, 1)
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        return Diagnostic(
            Severity.ERROR,
            f"a Fuzzfile is a mapping, but this file holds {kind}",
            (),
            source.file,
            line,
            column,
            hint,
            "not-a-mapping",
        )
    if "version" not in data:
        return Diagnostic(
            Severity.ERROR,
            "missing `version`",
            ("version",),
            source.file,
            line,
            column,
            hint,
            "missing-version",
        )
    version = data["version"]
    if not isinstance(version, str) or version not in DOCUMENT_MODELS:
        pos = source.locate(("version",))
        return Diagnostic(
            Severity.ERROR,
            f"unsupported version {version!r}; Fuzzfiles are version v1 or v4",
            ("version",),
            source.file,
            pos.line if pos else None,
            pos.column if pos else None,
            "write `version: v4` (v2 and v3 never existed: they were platform releases)",
            "bad-version",
        )
    return None


# ---- pydantic errors into diagnostics ----------------------------------------------------------


def _schema_diagnostics(
    exc: ValidationError, source: SourceDocument, schema: type[BaseModel]
) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: set[tuple[FieldPath, str]] = set()
    for err in exc.errors(include_url=False):
        path, is_key = _clean_loc(err["loc"], source.data)
        message, hint, code = _explain(err, path, schema, source.data["version"])
        if (path, message) in seen:
            continue
        seen.add((path, message))
        pos = source.locate(path, key=is_key or code == "unknown-key")
        out.append(
            Diagnostic(
                Severity.ERROR,
                message,
                path,
                source.file,
                pos.line if pos else None,
                pos.column if pos else None,
                hint,
                code,
            )
        )
    return out


def _clean_loc(loc: tuple[int | str, ...], data: Any) -> tuple[FieldPath, bool]:
    """The document path of an error location, and whether it points at a key.

    Pydantic adds markers to locations: `[key]` for dict keys, and union members or
    validator names (`int`, `function-after[...]`). A part is kept when it names a key or
    index of the data at that point, or is the last part (a missing field).
    """
    path: list[str | int] = []
    node = data
    is_key = False
    for i, part in enumerate(loc):
        if part == "[key]":
            is_key = True
        elif _has_child(node, part):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and i == len(loc) - 1:
            path.append(part)  # a required field the mapping lacks
    return tuple(path), is_key


def _has_child(node: Any, part: int | str) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


# What a required field looks like, for the hint of a "missing" error.
_EXAMPLES = {
    "image": ", e.g. image: {uri: docker://alpine:3.20}",
    "uri": ", e.g. uri: docker://alpine:3.20",
    "source": ", e.g. source: {uri: https://example.org/data.tar.gz}",
    "destination": ", e.g. destination: {uri: file://data.tar.gz}",
    "version": ": v4",
}

_TYPE_NAMES = {
    "int": "a whole number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping (key: value lines)",
    "list": "a list (lines starting with -)",
    "model": "a mapping (key: value lines)",
    "float": "a number",
}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    text = repr(value)
    if len(text) > _QUOTED:
        return f"{text[: _QUOTED - 20]}... ({len(text):,} characters)"
    return text


_QUOTED = 80  # characters of a value quoted in a message


def _explain(
    err: Any, path: FieldPath, schema: type[BaseModel], version: str
) -> tuple[str, str | None, str]:
    kind: str = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        key = str(path[-1])
        allowed = sorted(allowed_keys(schema, path[:-1]))
        hint = LEGACY_KEYS.get(key)
        if hint is None and key in _OTHER_VERSION_KEYS.get(version, {}):
            hint = _OTHER_VERSION_KEYS[version][key]
        if hint is None:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            hint += "allowed here: " + ", ".join(allowed)
        return f"unknown key {key!r}", hint, "unknown-key"
    if kind == "missing":
        where = format_path(path[:-1])
        hint = f"add `{path[-1]}:` to {where}" + _EXAMPLES.get(str(path[-1]), "")
        return f"required field {path[-1]!r} is missing", hint, "missing-field"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{_describe(value)} is not allowed here", f"use one of {expected}", "bad-value"
    if kind == "int_parsing_size":
        return f"{_describe(value)} is too large for a whole number", None, "bad-value"
    if kind == "int_from_float":
        return f"expected a whole number, got {_describe(value)}", None, "bad-type"
    for suffix in ("_type", "_parsing"):
        if kind.endswith(suffix) and kind.removesuffix(suffix) in _TYPE_NAMES:
            wanted = _TYPE_NAMES[kind.removesuffix(suffix)]
            return f"expected {wanted}, got {_describe(value)}", None, "bad-type"
    if kind == "less_than_equal":
        bound = err.get("ctx", {}).get("le")
        return f"{_describe(value)} is too large; it must be at most {bound}", None, "bad-value"
    if kind in ("greater_than", "greater_than_equal"):
        bound = err.get("ctx", {})
        rule = f"greater than {bound['gt']}" if "gt" in bound else f"at least {bound.get('ge')}"
        return f"{_describe(value)} is too small; it must be {rule}", None, "bad-value"
    if kind in ("size", "duration"):
        return err["msg"], None, f"bad-{kind}"
    if kind == "refused":  # a field Squall refuses, with its reason (schema._refused)
        ctx = err["ctx"]
        return str(ctx["message"]), str(ctx["hint"]), str(ctx["code"])
    if kind in (
        "absolute_path",
        "image_uri",
        "secret_ref",
        "volume_ref",
        "env_entry",
        "port",
        "env_secret_scope",
        "probe_action",
        "image_secrets",
        "transfer_secrets",
    ):
        return err["msg"], None, kind.replace("_", "-")
    return err["msg"], None, "invalid"


_OTHER_VERSION_KEYS = {
    "v1": {
        "use": "`use` is a v4 volume field; write `reference: volume://user/ephemeral` in v1, "
        "or set `version: v4`",
        "size": "volume `size` is a v4 field; set `version: v4`",
        "annotations": "volume `annotations` is a v4 field; set `version: v4`",
        "volume": "v1 mounts are keyed by volume name: `NAME: {location: /path}`",
    },
    "v4": {
        "location": "v4 mounts are keyed by path: `/path: {volume: NAME}` "
        "(`squall workflow upgrade` rewrites v1 mounts)",
        "type": "volume `type` is v1-only and deprecated; write `use: ephemeral`",
        "path": "HOST volumes are v1-only; use a persistent volume",
    },
}
