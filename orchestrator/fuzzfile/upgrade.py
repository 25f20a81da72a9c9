"""Rewrite a v1 Fuzzfile as v4, keeping its comments, key order and quoting.

The mapping follows the catalog's own v1 -> v4 port (spec §8):
1. `version: v4`.
2. Mounts re-keyed by path: `VOLUME: {location: PATH}` -> `PATH: {volume: VOLUME}`
   (jobs, services and `defaults.job`).
3. `requires: [a]` -> `depends-on: [{name: a, status: FINISHED}]`; a `requires` beside a
   `depends-on` is dropped, since the platform ignores it there.
4. Volumes: the v1 `name:` echo is dropped (in v4 `name` means an existing persistent
   volume: keeping it would change the workflow); `volume://user/ephemeral` becomes
   `use: ephemeral`, `volume://user/persistent/NAME` becomes `use: persistent` + `name: NAME`,
   other references stay as `reference:` (v4 accepts them); `type: EPHEMERAL` becomes
   `use: ephemeral`. HOST volumes have no v4 form and are refused.

The caller checks that the result loads to the same `Workflow` as the input.
"""

from __future__ import annotations

import io
from typing import Any

from ..errors import InvalidInput

__all__ = ["UpgradeError", "upgrade_text"]


class UpgradeError(InvalidInput):
    """A v1 document that has no faithful v4 form."""


def _yaml() -> Any:
    from ruamel.yaml import YAML  # imported lazily: only `workflow upgrade` needs it

    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long commands
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def upgrade_text(text: str) -> str:
    """Return the v4 form of v1 Fuzzfile text (text that already validated as v1)."""
    yaml = _yaml()
    doc = yaml.load(text)
    if doc.get("version") != "v1":
        raise UpgradeError(f"expected a v1 document, found version {doc.get('version')!r}")
    doc["version"] = "v4"
    containers = [
        *((doc.get("jobs") or {}).values()),
        *((doc.get("services") or {}).values()),
    ]
    job_defaults = (doc.get("defaults") or {}).get("job")
    for holder in [job_defaults, *containers]:
        if holder and holder.get("mounts"):
            _rekey_mounts(holder)
    for container in containers:
        if "requires" in container:
            _requires_to_depends_on(container)
    for name, volume in (doc.get("volumes") or {}).items():
        if volume is not None:
            _upgrade_volume(name, volume)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def _replace_key(mapping: Any, old: str, new: str, value: Any) -> None:
    """Put `new: value` where `old` was (same position, same comment), removing `old`."""
    position = list(mapping.keys()).index(old)
    comment = mapping.ca.items.pop(old, None)
    del mapping[old]
    mapping.insert(position, new, value)
    if comment is not None:
        mapping.ca.items[new] = comment


def _rekey_mounts(holder: Any) -> None:
    from ruamel.yaml.comments import CommentedMap

    old = holder["mounts"]
    new = CommentedMap()
    for volume, spec in old.items():
        body = CommentedMap()
        body["volume"] = volume
        new[spec["location"]] = body
        if volume in old.ca.items:
            new.ca.items[spec["location"]] = old.ca.items[volume]
    holder["mounts"] = new


def _requires_to_depends_on(container: Any) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if "depends-on" in container:
        del container["requires"]
        return
    deps = CommentedSeq()
    for name in container["requires"] or []:
        entry = CommentedMap()
        entry["name"] = name
        entry["status"] = "FINISHED"
        deps.append(entry)
    _replace_key(container, "requires", "depends-on", deps)


def _upgrade_volume(name: str, volume: Any) -> None:
    volume.pop("name", None)
    kind = str(volume.get("type", "")).upper()
    if kind == "HOST" and "reference" not in volume:
        raise UpgradeError(
            f"volume {name!r} is a HOST volume (path {volume.get('path')!r}), which v4 cannot "
            "express; replace it with a persistent volume first"
        )
    if "type" in volume:
        if "reference" in volume:
            del volume["type"]
        else:
            _replace_key(volume, "type", "use", "ephemeral")
    volume.pop("path", None)
    ref = volume.get("reference")
    if not isinstance(ref, str):
        return
    parts = ref.removeprefix("volume://").split("/")
    if parts[:2] == ["user", "ephemeral"]:
        _replace_key(volume, "reference", "use", "ephemeral")
    elif parts[:2] == ["user", "persistent"] and len(parts) == 3:
        _replace_key(volume, "reference", "use", "persistent")
        position = list(volume.keys()).index("use") + 1
        volume.insert(position, "name", parts[2])
