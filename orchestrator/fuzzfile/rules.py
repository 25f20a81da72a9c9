"""Rules that a Fuzzfile must follow beyond its shape: references, the DAG, names, semantics.

Each rule is a function of the normalized `Workflow` that yields `Finding`s, registered with
`@rule(code)`. Findings carry the field path of the offending part (from the model's
`origin`s); the loader turns paths into file, line and column.
"""

from __future__ import annotations

import graphlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import model as m
from .annotations import KEYS, Place
from .annotations import problem as annotation_problem
from .diagnostics import FieldPath, Severity
from .endpoints import endpoint_url, env_suffix
from .limits import MAX_TASKS_PER_ARRAY, MAX_TASKS_PER_WORKFLOW
from .paths import container_path_problem, mount_path_problem, name_problem, volume_file_problem
from .variables import legacy_secret_references, secret_references, variables

__all__ = ["RULES", "Finding", "find_cycle", "run_rules"]

_READ_KEYS = {place: set(keys) for place, keys in KEYS.items()}
# The platform caps task-array concurrency at 200 (spec §4.6.6).
MAX_CONCURRENCY = 200
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
# What a node (substrate/transfers.py) can fetch (ingress) and write (egress): any other
# scheme would fail at STAGING or EGRESS, after the cluster is paid for.
_INGRESS_SCHEMES = ("s3://", "http://", "https://", "file://")
_EGRESS_SCHEMES = ("s3://", "file:///")
_SCHEME_HINTS = {
    "hf": "Squall does not download from Hugging Face by hf://: ingress each file by "
    "https://huggingface.co/ORG/REPO/resolve/REVISION/FILE, or download the model in a job",
    "ftp": "Squall does not fetch ftp://: ingress the file by https:// or s3://, or fetch it "
    "in a job",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule's verdict on one place of the workflow."""

    code: str
    severity: Severity
    path: FieldPath
    message: str
    hint: str | None = None


RuleFn = Callable[[m.Workflow], Iterator[Finding]]
RULES: dict[str, RuleFn] = {}


def rule(code: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule under `code` (the code findings carry unless they say otherwise)."""

    def register(fn: RuleFn) -> RuleFn:
        RULES[code] = fn
        return fn

    return register


def run_rules(wf: m.Workflow) -> list[Finding]:
    """Every finding of every rule, in rule order."""
    return [finding for fn in RULES.values() for finding in fn(wf)]


def _error(code: str, path: FieldPath, message: str, hint: str | None = None) -> Finding:
    return Finding(code, Severity.ERROR, path, message, hint)


def _warning(code: str, path: FieldPath, message: str, hint: str | None = None) -> Finding:
    return Finding(code, Severity.WARNING, path, message, hint)


def _nearest(name: str, choices: list[str]) -> str:
    """A hint: the closest of `choices`, or some of them. Bounded in cost and length however
    many there are (difflib compares with each: a few hundred are cheap)."""
    import difflib

    if len(choices) <= _COMPARED_CHOICES:
        close = difflib.get_close_matches(name, choices, n=1)
        if close:
            return f"did you mean {close[0]!r}?"
    if not choices:
        return "declared: none"
    shown = sorted(choices)[:_LISTED_CHOICES]
    more = f" and {len(choices) - len(shown):,} more" if len(choices) > len(shown) else ""
    return "declared: " + ", ".join(shown) + more


_COMPARED_CHOICES = 200
_LISTED_CHOICES = 20


# ---- the workflow as a whole -------------------------------------------------------------


@rule("empty-workflow")
def _has_work(wf: m.Workflow) -> Iterator[Finding]:
    if not wf.jobs and not wf.services:
        yield _error(
            "empty-workflow",
            (),
            "the workflow has no jobs and no services",
            "add a `jobs:` section with at least one job",
        )


@rule("duplicate-name")
def _unique_names(wf: m.Workflow) -> Iterator[Finding]:
    for name, svc in wf.services.items():
        if name in wf.jobs:
            yield _error(
                "duplicate-name",
                svc.origin,
                f"{name!r} is both a job and a service; they share one namespace",
                "rename the job or the service",
            )


@rule("name-format")
def _dns_names(wf: m.Workflow) -> Iterator[Finding]:
    for c in wf.containers.values():
        problem = name_problem(c.name)
        if problem is not None:
            yield _error(
                "name-format",
                c.origin,
                f"name {c.name!r} {problem}; names of jobs and services become directory "
                "and host names",
                "use lowercase letters, digits and -",
            )
        elif len(c.name) > 63:
            yield _error(
                "name-format",
                c.origin,
                f"name {c.name!r} is {len(c.name)} characters long; the limit is 63",
                "use a shorter name",
            )
        elif not _DNS_LABEL.match(c.name):
            suggestion = re.sub(r"[^a-z0-9-]+", "-", c.name.lower()).strip("-") or "job"
            yield _warning(
                "name-format",
                c.origin,
                f"name {c.name!r} is not a DNS label (lowercase letters, digits and -)",
                f"names become host names; {suggestion!r} would work everywhere",
            )


# ---- dependencies and the graph ----------------------------------------------------------


@rule("dependency")
def _dependencies_exist(wf: m.Workflow) -> Iterator[Finding]:
    names = list(wf.containers)
    for c in wf.containers.values():
        for dep in c.depends_on:
            target = wf.node(dep.name)
            if target is None:
                yield _error(
                    "dangling-dependency",
                    (*dep.origin, "name") if dep.origin[-2] == "depends-on" else dep.origin,
                    f"{c.name!r} depends on {dep.name!r}, which is not a job or a service",
                    _nearest(dep.name, names),
                )
            elif dep.status is m.DependencyStatus.RUNNING and not isinstance(target, m.Service):
                yield _error(
                    "running-on-job",
                    (*dep.origin, "status"),
                    f"status RUNNING needs a service, but {dep.name!r} is a job",
                    "jobs can only be waited for until FINISHED",
                )
            elif (
                dep.status is m.DependencyStatus.RUNNING
                and isinstance(target, m.Service)
                and target.readiness_probe is None
            ):
                yield _warning(
                    "running-without-probe",
                    (*dep.origin, "status"),
                    f"service {dep.name!r} has no readiness-probe, so it counts as RUNNING as "
                    "soon as its container starts",
                    f"add a readiness-probe to services.{dep.name}",
                )


@rule("requires")
def _requires(wf: m.Workflow) -> Iterator[Finding]:
    for c in wf.containers.values():
        if c.depends_on and c.depends_on[0].origin[-2:-1] == ("requires",):
            yield _warning(
                "deprecated-requires",
                c.depends_on[0].origin[:-1],
                "`requires` is deprecated",
                "write depends-on: [{name: ..., status: FINISHED}] "
                "(`squall workflow upgrade` does it)",
            )


def find_cycle(wf: m.Workflow) -> list[str] | None:
    """A dependency cycle as `[a, b, ..., a]` (each depends on the next), or None."""
    names = wf.containers
    graph = {n: [d.name for d in c.depends_on if d.name in names] for n, c in names.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        # graphlib lists each node before one that depends on it: reverse to read "depends on"
        cycle = list(reversed(exc.args[1]))[:-1]
        # start at the node written last, so the reported edge is the one that closes the loop
        order = {name: i for i, name in enumerate(names)}
        start = max(range(len(cycle)), key=lambda i: order[cycle[i]])
        cycle = cycle[start:] + cycle[:start]
        return [*cycle, cycle[0]]
    return None


@rule("cycle")
def _acyclic(wf: m.Workflow) -> Iterator[Finding]:
    cycle = find_cycle(wf)
    if cycle is None:
        return
    # `cycle` lists each node before a node it depends on: a depends on b, b on c, ...
    first = wf.containers[cycle[0]]
    dep = next(d for d in first.depends_on if d.name == cycle[1])
    yield _error(
        "cycle",
        dep.origin,
        "dependency cycle: " + " -> ".join(cycle) + " (each depends on the next)",
        "remove one of these dependencies; the jobs of a workflow form a DAG",
    )


# ---- volumes, mounts and files ------------------------------------------------------------


@rule("mounts")
def _mounts(wf: m.Workflow) -> Iterator[Finding]:
    volumes = list(wf.volumes)
    for c in wf.containers.values():
        for mount in c.mounts:
            if mount.volume not in wf.volumes:
                v4_long = mount.origin[-1] == mount.path and mount.origin[-1] != mount.volume
                yield _error(
                    "unknown-volume",
                    (*mount.origin, "volume") if v4_long else mount.origin,
                    f"mount refers to volume {mount.volume!r}, which is not declared",
                    _nearest(mount.volume, volumes) + " (volumes are declared under `volumes:`)",
                )
        seen: dict[str, m.Mount] = {}
        for mount in c.mounts:
            if mount.path in seen:
                yield _error(
                    "duplicate-mount",
                    mount.origin,
                    f"two volumes are mounted at {mount.path} "
                    f"({seen[mount.path].volume!r} and {mount.volume!r})",
                    "give each mount its own path",
                )
            seen[mount.path] = mount


@rule("container-paths")
def _container_paths(wf: m.Workflow) -> Iterator[Finding]:
    seen: set[FieldPath] = set()  # mounts from defaults.job are in every job: report them once
    for c in wf.containers.values():
        if c.cwd is not None and (problem := container_path_problem(c.cwd)):
            yield _error("container-path", (*c.origin, "cwd"), f"cwd {c.cwd!r} {problem}")
        for path in c.files:
            if problem := container_path_problem(path):
                where = (*c.origin, "files", path)
                yield _error("container-path", where, f"file path {path!r} {problem}")
        for mount in c.mounts:
            problem = mount_path_problem(mount.path)
            v1 = mount.origin[-1] != mount.path  # v1 mounts are keyed by volume: `location`
            where = (*mount.origin, "location") if v1 else mount.origin
            if problem is not None and where not in seen:
                seen.add(where)
                yield _error(
                    "mount-path",
                    where,
                    f"mount path {mount.path!r} {problem}",
                    "mount volumes on a directory of their own, such as /data or /scratch",
                )


@rule("files")
def _file_references(wf: m.Workflow) -> Iterator[Finding]:
    keys = list(wf.files)
    for c in wf.containers.values():
        for path, content in c.files.items():
            if content.startswith("file://"):
                ref = content.removeprefix("file://")
                if ref not in wf.files:
                    yield _error(
                        "unknown-file",
                        (*c.origin, "files", path),
                        f"{content!r} refers to a file that the top-level `files:` lacks",
                        _nearest(ref, keys),
                    )
    for vol in wf.volumes.values():
        for t in vol.ingress:
            src = t.source.uri
            if src.startswith("file://") and src.removeprefix("file://") not in wf.files:
                yield _error(
                    "unknown-file",
                    (*t.source.origin, "uri"),
                    f"ingress source {src!r} refers to a file that the top-level `files:` lacks",
                    _nearest(src.removeprefix("file://"), keys),
                )


@rule("transfers")
def _transfer_uris(wf: m.Workflow) -> Iterator[Finding]:
    for vol in wf.volumes.values():
        for t in vol.ingress:
            if not t.source.uri.startswith(_INGRESS_SCHEMES):
                yield _error(
                    "transfer-uri",
                    (*t.source.origin, "uri"),
                    f"ingress source {t.source.uri!r} has a scheme Squall cannot fetch",
                    _scheme_hint(
                        t.source.uri, "use s3://, https://, http:// or file://NAME from `files:`"
                    ),
                )
            yield from _needless_secret(t.destination, "ingress destination")
            if not t.destination.uri.startswith("file://"):
                yield _error(
                    "transfer-uri",
                    (*t.destination.origin, "uri"),
                    f"ingress destination {t.destination.uri!r} is not a path in the volume",
                    "write file://PATH/IN/VOLUME",
                )
            else:
                yield from _volume_file(t.destination, "ingress destination")
        for t in vol.egress:
            if not t.source.uri.startswith("file://"):
                yield _error(
                    "transfer-uri",
                    (*t.source.origin, "uri"),
                    f"egress source {t.source.uri!r} is not a path in the volume",
                    "write file://PATH/IN/VOLUME",
                )
            else:
                yield from _volume_file(t.source, "egress source")
            yield from _needless_secret(t.source, "egress source")
            dest = t.destination.uri
            if dest.startswith("file:///") and (
                problem := container_path_problem(dest.removeprefix("file://"))
            ):
                where = (*t.destination.origin, "uri")
                yield _error("transfer-path", where, f"egress destination {dest!r} {problem}")
            # file:///PATH is Squall's: a path on the orchestrator's machine
            if not dest.startswith(_EGRESS_SCHEMES):
                yield _error(
                    "transfer-uri",
                    (*t.destination.origin, "uri"),
                    f"egress destination {t.destination.uri!r} has a scheme Squall cannot write to",
                    _scheme_hint(
                        dest,
                        "use s3://BUCKET/KEY, or file:///ABSOLUTE/PATH on the "
                        "orchestrator's machine",
                    ),
                )


def _scheme_hint(uri: str, default: str) -> str:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return _SCHEME_HINTS.get(scheme, default)


def _needless_secret(location: m.Location, what: str) -> Iterator[Finding]:
    """A secret on the volume's side of a transfer would be read by nothing."""
    if location.secret is not None:
        yield _error(
            "transfer-secret",
            (*location.origin, "secret"),
            f"the {what} is a path in the volume, which needs no secret",
            "put the secret on the other side of the transfer (the s3:// or https:// one)",
        )


def _volume_file(location: m.Location, what: str) -> Iterator[Finding]:
    problem = volume_file_problem(location.uri.removeprefix("file://"))
    if problem is not None:
        yield _error(
            "transfer-path",
            (*location.origin, "uri"),
            f"{what} {location.uri!r} {problem}",
            "write file://PATH/IN/VOLUME, such as file://inputs/data.tar.gz",
        )


@rule("volumes")
def _volume_fields(wf: m.Workflow) -> Iterator[Finding]:
    for vol in wf.volumes.values():
        if problem := name_problem(vol.name):
            yield _error(
                "volume-name",
                vol.origin,
                f"volume name {vol.name!r} {problem}; volume names become directory names",
                "use letters, digits, -, _ and .",
            )
        if vol.persistent_name is not None and (problem := name_problem(vol.persistent_name)):
            yield _error(  # v4 `name:` (a v1 reference's name is checked by the schema)
                "volume-name",
                (*vol.origin, "name"),
                f"persistent volume name {vol.persistent_name!r} {problem}",
                "name an existing persistent volume: letters, digits, -, _ and ., no '/'",
            )


# ---- jobs and services ---------------------------------------------------------------------


@rule("command")
def _command_or_script(wf: m.Workflow) -> Iterator[Finding]:
    for c in wf.containers.values():
        if c.command is not None and c.script is not None:
            yield _error(
                "command-and-script",
                (*c.origin, "script"),
                "a container has either `command` or `script`, not both",
                "keep `script` (with a #! line) or `command`, and remove the other",
            )
        if c.image.legacy_secrets is not None:
            yield _warning(
                "deprecated-image-secrets",
                (*c.image.origin, "secrets"),
                "the `secrets:` map on an image is deprecated",
                "store the credentials as a secret and write image.secret: secret://user/NAME",
            )
            if c.image.secret is not None:
                yield _error(
                    "image-secret-twice",
                    (*c.image.origin, "secrets"),
                    "an image has either `secret` or the legacy `secrets:` map, not both",
                    "keep `secret: secret://user/NAME` and remove `secrets:`",
                )


# Variables Squall sets in every container, or in tasks of an array; FB_ENDPOINT_* come from
# the services a job depends on and are not judged here.
_FB_ALWAYS = frozenset({"FB_WORKFLOW_ID"})


@rule("variables")
def _variables(wf: m.Workflow) -> Iterator[Finding]:
    """`$NAME` in command and args: warn where it will stay as written (see variables.py)."""
    for c in wf.containers.values():
        if any(legacy_secret_references(v) for v in c.env.values()):
            yield _warning(
                "deprecated-secret-placeholder",
                (*c.origin, "env"),
                'the `${{ secret "NAME" }}` placeholder is deprecated',
                "write NAME=secret://user/NAME",
            )
        secret = {k for k, v in c.env.items() if secret_references(v)}
        defined = set(c.env) | _FB_ALWAYS
        if isinstance(c, m.Job) and c.task_array is not None:
            defined.add("FB_TASK_ID")
        for field in ("command", "args"):
            for i, item in enumerate(getattr(c, field) or ()):
                for name in dict.fromkeys(variables(item)):
                    if name in secret:
                        yield _warning(
                            "variable-secret",
                            (*c.origin, field, i),
                            f"${name} holds a secret, and secrets are never put on a command "
                            "line: it is passed as written",
                            f"let the program read {name} from its environment, or a shell "
                            "(`script:`, or `sh -c`) expand it",
                        )
                    elif _never_set(name, defined):
                        yield _warning(
                            "variable-undefined",
                            (*c.origin, field, i),
                            f"${name} is never set here, so it is passed as written",
                            "FB_TASK_ID is set only in the tasks of a task array; "
                            "FB_WORKFLOW_ID in every container (write $$ for a literal $)",
                        )


def _never_set(name: str, defined: set[str]) -> bool:
    """A variable of Squall's (FB_*) that a container will not have."""
    fb = name.startswith("FB_") and not name.startswith("FB_ENDPOINT_")
    return fb and name not in defined


@rule("task-array")
def _task_arrays(wf: m.Workflow) -> Iterator[Finding]:
    for job in wf.jobs.values():
        ta = job.task_array
        if ta is None:
            continue
        if ta.start > ta.end:
            yield _error(
                "task-array-bounds",
                (*ta.origin, "end"),
                f"task-array ends ({ta.end}) before it starts ({ta.start})",
                "make `end` greater than or equal to `start`",
            )
        elif ta.size > MAX_TASKS_PER_ARRAY:
            yield _error(
                "too-many-tasks",
                (*ta.origin, "end"),
                f"task-array has {ta.size:,} tasks; a task array may have at most "
                f"{MAX_TASKS_PER_ARRAY:,}",
                "split the work into fewer, larger tasks (each task can loop over several "
                "items using FB_TASK_ID)",
            )
        if ta.concurrency is not None and ta.concurrency > MAX_CONCURRENCY:
            yield _error(
                "task-array-concurrency",
                (*ta.origin, "concurrency"),
                f"concurrency {ta.concurrency} is above the limit of {MAX_CONCURRENCY}",
                f"use at most {MAX_CONCURRENCY}",
            )
        if job.multinode is not None:
            yield _warning(
                "task-array-multinode",
                ta.origin,
                "a job with both task-array and multinode runs a multi-node gang per task",
                "check that this is what you want",
            )


@rule("task-count")
def _task_count(wf: m.Workflow) -> Iterator[Finding]:
    total = len(wf.services)
    for job in wf.jobs.values():
        ta = job.task_array
        total += 1 if ta is None else min(max(ta.size, 0), MAX_TASKS_PER_ARRAY)
        if total > MAX_TASKS_PER_WORKFLOW:
            yield _error(
                "too-many-tasks",
                ta.origin if ta is not None else job.origin,
                f"with job {job.name!r} the workflow has more than {MAX_TASKS_PER_WORKFLOW:,} "
                f"tasks (jobs, task-array tasks and services), the most a workflow may have",
                "split the work into fewer, larger tasks, or into several workflows",
            )
            return


@rule("multinode")
def _multinode(wf: m.Workflow) -> Iterator[Finding]:
    for c in wf.containers.values():
        mn = c.multinode
        if mn and mn.procs_per_node and mn.procs_per_node > c.resource.cores:
            yield _warning(
                "oversubscribed",
                (*c.origin, "multinode", "procs-per-node"),
                f"{mn.procs_per_node} processes per node on {c.resource.cores} cores "
                "oversubscribes the node",
                "raise resource.cpu.cores or lower procs-per-node",
            )


@rule("services")
def _services(wf: m.Workflow) -> Iterator[Finding]:
    needed = {d.name for c in wf.containers.values() for d in c.depends_on}
    for name, svc in wf.services.items():
        ports = [p.name for p in svc.ports]
        declared: set[str] = set()
        for i, port in enumerate(svc.ports):
            if port.name in declared:
                yield _error(
                    "duplicate-port",
                    (*svc.origin, "network", "ports", i, "name"),
                    f"port name {port.name!r} is declared twice",
                    "give each port its own name",
                )
            declared.add(port.name)
        for ep in svc.endpoints:
            if ep.port_name not in declared:
                yield _error(
                    "unknown-port",
                    (*ep.origin, "port-name"),
                    f"endpoint {ep.name!r} refers to port {ep.port_name!r}, which "
                    "network.ports does not declare",
                    _nearest(ep.port_name, ports),
                )
        if not svc.persist and name not in needed:
            yield _warning(
                "idle-service",
                svc.origin,
                f"service {name!r} has persist: false and nothing depends on it, so it never "
                "starts",
                "set persist: true, or make a job depend on it",
            )


@rule("endpoints")
def _endpoints(wf: m.Workflow) -> Iterator[Finding]:
    """Endpoints become FB_ENDPOINT_* variables (endpoints.py): one name, one endpoint."""
    owners: dict[str, tuple[str, str]] = {}  # variable suffix -> service, endpoint
    for svc in wf.services.values():
        declared = {p.name for p in svc.ports}
        for ep in svc.endpoints:
            suffix = env_suffix(ep.name)
            if suffix in owners:
                other_service, other = owners[suffix]
                yield _error(
                    "duplicate-endpoint",
                    (*ep.origin, "name"),
                    f"endpoint {ep.name!r} of service {svc.name!r} and endpoint {other!r} of "
                    f"{other_service!r} would both set FB_ENDPOINT_URL_{suffix}",
                    "give each endpoint of the workflow its own name",
                )
            owners.setdefault(suffix, (svc.name, ep.name))
            if ep.scope == "public" and ep.port_name in declared:
                yield _warning(
                    "endpoint-not-public",
                    (*ep.origin, "scope"),
                    f"Squall publishes no endpoint to the internet: {ep.name!r} is reached at "
                    f"{endpoint_url(svc, ep)} from the run's containers, and from outside only "
                    "by whoever may reach the run",
                    f"reach it with `squall workflow port-forward RUN {svc.name} LOCAL:PORT`",
                )


@rule("annotations")
def _annotations(wf: m.Workflow) -> Iterator[Finding]:
    """squall.io/* annotations are Squall's: known at their place, with values that parse."""
    found: dict[FieldPath, tuple[Place, str, str]] = {}  # path -> place, key, value
    for key, value in wf.annotations.items():
        found[("annotations", key)] = (Place.WORKFLOW, key, value)
    for c in wf.containers.values():
        place = Place.JOB if isinstance(c, m.Job) else Place.SERVICE
        for key, value in c.resource.annotations.items():
            at = c.resource.annotation_origins.get(key, (*c.origin, "resource", "annotations"))
            found.setdefault(at, (place, key, value))  # defaults.job's: once, not per job
        for ep in c.endpoints if isinstance(c, m.Service) else ():
            for key, value in ep.annotations.items():
                found[(*ep.origin, "annotations", key)] = (Place.ENDPOINT, key, value)
    for vol in wf.volumes.values():
        for key, value in vol.annotations.items():
            found[(*vol.origin, "annotations", key)] = (Place.VOLUME, key, value)
    for at, (place, key, value) in found.items():
        wrong = annotation_problem(place, key, value)
        if wrong is not None:
            code = "bad-annotation" if key in _READ_KEYS.get(place, ()) else "unknown-annotation"
            yield _error(code, at, wrong[0], wrong[1])
