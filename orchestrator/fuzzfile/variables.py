"""References inside a Fuzzfile's strings: variables in `command` and `args`, and the legacy
secret placeholder in `env` values and an image's `secrets:` map.

Variables: `$NAME` and `${NAME}` in a `command` or `args` item are replaced by the value of
NAME in the job's environment (its `env`, then FB_WORKFLOW_ID, FB_TASK_ID and the other FB_*
variables Squall sets) when the task starts. `$$` is one literal `$`. A name the environment
does not define, and a name whose value is a secret (secrets never go on a command line), is
left as written, so that a shell (`sh -c '... $HOME'`) still expands it from the container's
environment. Anything else after a `$` (`$(cmd)`, `${NAME:-x}`, `$1`) is left as written.
`script:` is run by a shell, which expands it; Squall does not touch it.

Legacy secrets (2023 Fuzzfiles): `${{ secret "NAME" }}` stands for the value of the secret
`secret://user/NAME` (or of NAME itself when it is a `secret://` reference).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

__all__ = [
    "LEGACY_SECRET",
    "expand",
    "fill_legacy_secrets",
    "legacy_secret_references",
    "secret_references",
    "variables",
]

_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
LEGACY_SECRET = re.compile(r'\$\{\{\s*secret\s+"([^"]*)"\s*\}\}')


def expand(text: str, env: Mapping[str, str]) -> str:
    """`text` with each `$NAME`/`${NAME}` that `env` defines replaced, and `$$` made `$`."""

    def value(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))

    return _VARIABLE.sub(value, text)


def variables(text: str) -> Iterator[str]:
    """The names `text` refers to (not those escaped with `$$`), in order."""
    for m in _VARIABLE.finditer(text):
        name = m.group(1) or m.group(2)
        if name:
            yield name


def legacy_secret_references(text: str) -> list[str]:
    """The secrets the `${{ secret "NAME" }}` placeholders of `text` stand for."""
    return [_reference(name) for name in LEGACY_SECRET.findall(text)]


def secret_references(value: str) -> list[str]:
    """The secrets an env value uses: itself when it is `secret://...`, else its placeholders."""
    if value.startswith("secret://"):
        return [value]
    return legacy_secret_references(value)


def fill_legacy_secrets(text: str, read: Callable[[str], str]) -> str:
    """`text` with every placeholder replaced by the secret's value, as `read(ref)` gives it."""
    return LEGACY_SECRET.sub(lambda m: read(_reference(m.group(1))), text)


def _reference(name: str) -> str:
    return name if name.startswith("secret://") else f"secret://user/{name}"
