"""The access policy: which verbs each user and group may use, on which workflows and sites.

A policy is YAML (`squall server --access-policy FILE`); without one, `DEFAULT` holds:

    grants:
      - to: ["*"]                    # "*" every user, user:NAME, group:NAME
        verbs: [start, status, log, cancel, exec, port-forward, egress, schedule, secret]
        runs: own                    # own (the default): the caller's runs and schedules;
                                     # any: everyone's
      - to: [group:chem]
        verbs: [status, log]
        workflows: ["chem/*"]        # run and schedule names (shell patterns); default "*"
        runs: any
      - to: [user:carol]
        verbs: [start]
        workflows: ["carol/*"]
        sites: [local, aws]          # where the runs it starts may go: local and on-prem
                                     # sites by name, aws/gcp/azure for a whole cloud

Verbs: `start` (a workflow; and its schedules' firings), `status` (see a run: get, list,
watch), `log`, `cancel`, `exec`, `port-forward`, `egress` (start a workflow that writes results
out: volumes with egress), `schedule` (create, see, pause, delete schedules), `secret` (set,
list, delete one's own secrets, and those of one's groups), `admin` (users, tokens, the
audit log, the secrets key, organization secrets, everything of everyone).

A user flagged admin (`squall admin user add --admin`) holds every verb on everything. Grants
add up: a call is allowed when one grant allows it, and a denial names the verb and the
target that no grant covers. `start` on a new run and `schedule` on a new schedule check the
name only (the caller will own it); `runs` does not apply to `secret` and `admin`, and
`workflows` neither.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidInput, PermissionDenied
from ..fuzzfile.diagnostics import format_path
from ..fuzzfile.source import SourceDocument, SourceError, parse_yaml
from ..identity import Principal, check_name

__all__ = [
    "CLOUDS",
    "DEFAULT",
    "RUN_VERBS",
    "VERBS",
    "AccessPolicy",
    "Grant",
    "load_access_policy",
    "parse_access_policy",
    "placement_text",
    "secret_holder",
]

VERBS = (
    "start",
    "status",
    "log",
    "cancel",
    "exec",
    "port-forward",
    "egress",
    "schedule",
    "secret",
    "admin",
)
RUN_VERBS = frozenset(VERBS) - {"secret", "admin"}  # they act on runs or schedules by name
CLOUDS = frozenset({"aws", "gcp", "azure"})
_KEYS = {"to", "verbs", "workflows", "runs", "sites"}


@dataclass(frozen=True, slots=True)
class Grant:
    to: frozenset[str]  # "*", user:NAME, group:NAME
    verbs: frozenset[str]
    workflows: tuple[str, ...] = ("*",)
    any_owner: bool = False  # runs: any
    sites: frozenset[str] | None = None  # None: any site

    def covers(self, who: Principal) -> bool:
        return (
            "*" in self.to
            or f"user:{who.name}" in self.to
            or any(f"group:{g}" in self.to for g in who.groups)
        )

    def allows(self, who: Principal, verb: str, name: str, owner: str | None) -> bool:
        if verb not in self.verbs or not self.covers(who):
            return False
        if verb not in RUN_VERBS or not name:  # no name: a list, filtered by name afterwards
            return True
        if not any(fnmatch.fnmatchcase(name, p) for p in self.workflows):
            return False
        return self.any_owner or owner is None or owner == who.name


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    grants: tuple[Grant, ...]
    source: str = "the default policy"

    def allows(self, who: Principal, verb: str, name: str = "", owner: str | None = None) -> bool:
        """Whether `who` may use `verb` on `name` (a run or schedule; `owner`: whose it is, None
        for a new one the caller would own)."""
        if who.admin:
            return True
        return any(g.allows(who, verb, name, owner) for g in self.grants)

    def check(self, who: Principal, verb: str, name: str = "", owner: str | None = None) -> None:
        """Raise PermissionDenied, naming the missing permission, unless `allows`."""
        if self.allows(who, verb, name, owner):
            return
        if verb not in RUN_VERBS:
            target = f" ({name})" if name else ""
        elif owner is not None and owner != who.name:
            target = f" on {name} (not {who.name}'s)"
        else:
            target = f" on {name}" if name else ""
        raise PermissionDenied(
            f"{who.name} may not {verb}{target}: no grant of {self.source} gives `{verb}`"
            + (" on it" if target and verb in RUN_VERBS else "")
        )

    def unknown_sites(self, known: frozenset[str]) -> list[str]:
        """What the grants' `sites` name that is neither a cloud nor one of `known`: a
        misspelt site allows nothing there."""
        named = {site for g in self.grants for site in (g.sites or ())}
        return sorted(named - CLOUDS - known)

    def sites(self, who: Principal, name: str) -> frozenset[str] | None:
        """Where runs that `who` starts as `name` may go: None for anywhere, else the union of
        the sites its `start` grants on `name` list (a grant without `sites`: anywhere)."""
        if who.admin:
            return None
        found: set[str] = set()
        for grant in self.grants:
            if grant.allows(who, "start", name, None):
                if grant.sites is None:
                    return None
                found |= grant.sites
        return frozenset(found)


DEFAULT = AccessPolicy(
    (Grant(frozenset({"*"}), frozenset(VERBS) - {"admin"}),),
    "the default policy",
)


class _Reader:
    """Errors that name the policy file, the line and the field (`grants[2].verbs`)."""

    def __init__(self, doc: SourceDocument, source: str) -> None:
        self.doc = doc
        self.source = source

    def error(self, path: tuple[str | int, ...], message: str) -> InvalidInput:
        at = self.doc.locate(path)
        line = f":{at.line}" if at is not None else ""
        field = f" {format_path(path)}:" if path else ""
        return InvalidInput(f"{self.source}{line}:{field} {message}")

    def names(
        self, value: Any, path: tuple[str | int, ...], known: Sequence[str] | None = None
    ) -> frozenset[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error(path, "expected a non-empty list of names")
        if not all(v.strip() for v in value):
            raise self.error(path, "a name cannot be empty")
        if known is not None:
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise self.error(path, f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
        return frozenset(value)


def parse_access_policy(text: str, source: str) -> AccessPolicy:
    """An access policy from its YAML `text`; errors name `source`, the line, the grant and
    the key (a key written twice is one of them)."""
    if not text.strip():
        raise InvalidInput(f"{source}: the access policy is empty: it needs a list of `grants`")
    try:
        doc = parse_yaml(text, source)
    except SourceError as exc:
        raise InvalidInput("\n".join(d.render() for d in exc.diagnostics)) from None
    read = _Reader(doc, source)
    data = doc.data
    grants_list = data.get("grants") if isinstance(data, dict) else None
    if not isinstance(data, dict) or set(data) != {"grants"} or not isinstance(grants_list, list):
        raise read.error((), "an access policy is a mapping with one key, `grants`, a list")
    grants = []
    for i, entry in enumerate(grants_list):
        at: tuple[str | int, ...] = ("grants", i)
        if not isinstance(entry, dict):
            raise read.error(at, f"a grant is a mapping of {', '.join(sorted(_KEYS))}")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise read.error((*at, unknown[0]), f"unknown key; known: {', '.join(sorted(_KEYS))}")
        for key in ("to", "verbs"):
            if key not in entry:
                raise read.error(at, f"`{key}` is required")
        to = read.names(entry["to"], (*at, "to"))
        for subject in to:
            kind, _, who = subject.partition(":")
            if subject != "*" and (kind not in ("user", "group") or not who):
                raise read.error((*at, "to"), f'{subject!r} is not "*", user:NAME or group:NAME')
            if subject != "*":
                try:
                    check_name(who, kind)
                except InvalidInput as exc:
                    raise read.error((*at, "to"), str(exc)) from None
        runs = entry.get("runs", "own")
        if runs not in ("own", "any"):
            raise read.error((*at, "runs"), f"`own` or `any`, not {runs!r}")
        sites = entry.get("sites")
        workflows = read.names(entry.get("workflows", ["*"]), (*at, "workflows"))
        verbs = read.names(entry["verbs"], (*at, "verbs"), VERBS)
        for key in ("workflows", "runs"):
            if key in entry and "admin" in verbs:  # it would read as a narrower admin
                raise read.error(
                    (*at, key),
                    f"`{key}` does not narrow `admin` (every user, token and run): grant "
                    "`admin` on its own, without it",
                )
        if sites is not None and "start" not in verbs:
            raise read.error((*at, "sites"), "`sites` says where runs may start: add `start`")
        grants.append(
            Grant(
                to=to,
                verbs=verbs,
                workflows=tuple(sorted(workflows)),
                any_owner=runs == "any",
                sites=None if sites is None else read.names(sites, (*at, "sites")),
            )
        )
    return AccessPolicy(tuple(grants), source)


def load_access_policy(path: Path) -> AccessPolicy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read the access policy {path}: {exc.strerror}") from None
    return parse_access_policy(text, str(path))


def placement_text(sites: frozenset[str]) -> str:
    """A placement policy (`federate.policy`) that keeps runs on `sites` only: the clouds
    named in it, and the other sites by name (an empty list there is none: `[""]`)."""
    clouds = sorted(sites & CLOUDS)
    others = sorted(sites - CLOUDS)
    return yaml.safe_dump(
        {"allowed-clouds": clouds or [""], "allowed-sites": others or [""], "spot": True}
    )


def secret_holder(scope: str, who: Principal, group: str = "") -> tuple[str, str]:
    """Whose secret of `scope` `who` sets, lists or deletes, and what takes `admin` ("" when
    nothing does): a user secret is the caller's own; a group secret belongs to `group`, or
    to the caller's only group (another group than the caller's takes admin); an
    organization or cluster secret is everyone's, and takes admin."""
    if scope == "user":
        return who.name, ""
    if scope == "group":
        if not group:
            if len(who.groups) != 1:
                groups = ", ".join(who.groups) or "no group"
                raise InvalidInput(
                    f"say which group the secret belongs to with --group ({who.name} is in "
                    f"{groups})"
                )
            return who.groups[0], ""
        return group, "" if group in who.groups else f"group {group}"
    return "", f"{scope} secrets"
