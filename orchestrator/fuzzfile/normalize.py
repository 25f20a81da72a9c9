"""Turn a validated v1 or v4 document into the version-independent `Workflow`.

The v1/v4 differences end here (spec §8): mounts are re-keyed by container path, volume
references and v4 `use`/`name` become one `Volume`, `requires` becomes FINISHED dependencies
(ignored when `depends-on` is present, as the platform does), and `defaults.job` is merged
into every job: job values win, field by field; `env` entries win by key; mounts by path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from . import model as m
from . import schema as s
from .diagnostics import FieldPath

__all__ = ["normalize", "parse_volume_reference"]

Document = s.DocumentV1 | s.DocumentV4


def normalize(doc: Document) -> m.Workflow:
    """Build the `Workflow` for a document that passed schema validation."""
    defaults = doc.defaults.job if doc.defaults and doc.defaults.job else None
    return m.Workflow(
        files=dict(doc.files or {}),
        annotations=dict(doc.annotations or {}),
        volumes={
            name: _volume(name, vol, ("volumes", name)) for name, vol in (doc.volumes or {}).items()
        },
        jobs={
            name: _job(name, job, defaults, ("jobs", name))
            for name, job in (doc.jobs or {}).items()
        },
        services={
            name: _service(name, svc, ("services", name))
            for name, svc in (doc.services or {}).items()
        },
    )


# ---- volumes ---------------------------------------------------------------------------


def parse_volume_reference(ref: str) -> tuple[str, str, str | None]:
    """Split `volume://SCOPE/CLASS[/NAME]` into scope (`account` read as `group`), class, name."""
    scope, klass, *rest = ref.removeprefix("volume://").split("/")
    return ("group" if scope == "account" else scope), klass, (rest[0] if rest else None)


def _volume(name: str, vol: s.VolumeV1 | s.VolumeV4, origin: FieldPath) -> m.Volume:
    common: dict[str, Any] = {
        "name": name,
        "ingress": _transfers(vol.ingress, (*origin, "ingress")),
        "egress": _transfers(vol.egress, (*origin, "egress")),
        "origin": origin,
    }
    if vol.reference is not None:
        scope, klass, custom = parse_volume_reference(vol.reference)
        common.update(_storage_class(klass, custom), scope=scope)
    if isinstance(vol, s.VolumeV1):
        return m.Volume(**common)
    if vol.reference is None:
        use = vol.use
        if vol.name is not None:
            common.update(persistent=True, persistent_name=vol.name)
        elif use == "persistent":
            common["persistent"] = True
    return m.Volume(**common, size=vol.size, annotations=dict(vol.annotations or {}))


def _storage_class(klass: str, custom: str | None) -> dict[str, Any]:
    """What a storage class name means; `ephemeral` ignores its custom name (§4.5). No other
    class gets here: the schema refuses provisioners, which Squall's sites do not have."""
    if klass == "ephemeral":
        return {}
    return {"persistent": True, "persistent_name": custom}


def _transfers(items: list[s.Transfer] | None, origin: FieldPath) -> tuple[m.Transfer, ...]:
    return tuple(
        m.Transfer(
            source=_location(t.source, (*origin, i, "source")),
            destination=_location(t.destination, (*origin, i, "destination")),
            policy=_policy(t.policy, None),
            origin=(*origin, i),
        )
        for i, t in enumerate(items or [])
    )


def _location(uri: s.URI, origin: FieldPath) -> m.Location:
    return m.Location(uri=uri.uri, secret=uri.secret, origin=origin)


# ---- jobs and services -------------------------------------------------------------------


def _job(name: str, job: s.JobV1 | s.JobV4, defaults: Any, origin: FieldPath) -> m.Job:
    network = job.network
    base = _container_fields(name, job, origin)
    if defaults is not None:
        base["env"] = {**_env(defaults.env), **base["env"]}
        mounts = {mt.path: mt for mt in _mounts(defaults.mounts, ("defaults", "job"))}
        mounts.update({mt.path: mt for mt in base["mounts"]})
        base["mounts"] = tuple(mounts.values())
        base["resource"] = _resource(
            job.resource, defaults.resource, (*origin, "resource"), ("defaults", "job", "resource")
        )
    ta = job.task_array
    return m.Job(
        **base,
        policy=_policy(job.policy, defaults.policy if defaults else None),
        task_array=(
            m.TaskArray(
                start=ta.start,
                end=ta.end,
                concurrency=ta.concurrency,
                origin=(*origin, "task-array"),
            )
            if ta
            else None
        ),
        isolated_network=bool(network and network.isolated),
    )


def _service(name: str, svc: s.ServiceV1 | s.ServiceV4, origin: FieldPath) -> m.Service:
    net = svc.network
    return m.Service(
        **_container_fields(name, svc, origin),
        persist=bool(svc.persist),
        host_network=bool(net and net.host),
        ports=tuple(
            m.ServicePort(name=p.name, port=p.port, protocol=p.protocol)
            for p in (net.ports or [] if net else [])
        ),
        endpoints=tuple(
            m.Endpoint(
                name=e.name,
                port_name=e.port_name,
                protocol=e.protocol,
                type=e.type,
                scope=e.scope,
                annotations=dict(e.annotations or {}),
                origin=(*origin, "network", "endpoints", i),
            )
            for i, e in enumerate(net.endpoints or [] if net else [])
        ),
        readiness_probe=_probe(svc.readiness_probe),
        policy=_policy(svc.policy, None),
    )


def _container_fields(name: str, c: Any, origin: FieldPath) -> dict[str, Any]:
    return {
        "name": name,
        "image": m.Image(
            uri=c.image.uri,
            secret=c.image.secret,
            legacy_secrets=dict(c.image.secrets) if c.image.secrets is not None else None,
            origin=(*origin, "image"),
        ),
        "command": tuple(c.command) if c.command is not None else None,
        "script": c.script,
        "args": tuple(c.args or ()),
        "env": _env(c.env),
        "cwd": c.cwd,
        "mounts": _mounts(c.mounts, origin),
        "files": dict(c.files or {}),
        "resource": _resource(c.resource, None, (*origin, "resource")),
        "multinode": (
            m.Multinode(
                nodes=c.multinode.nodes,
                implementation="openmpi"
                if c.multinode.implementation == "ompi"
                else c.multinode.implementation,
                procs_per_node=c.multinode.procs_per_node,
            )
            if c.multinode
            else None
        ),
        "depends_on": _dependencies(c, origin),
        "origin": origin,
    }


def _env(entries: Iterable[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries or ():
        key, _, value = entry.partition("=")
        env[key] = value
    return env


def _mounts(mounts: Mapping[str, Any] | None, origin: FieldPath) -> tuple[m.Mount, ...]:
    out = []
    for key, value in (mounts or {}).items():
        where = (*origin, "mounts", key)
        if isinstance(value, s.MountV1):
            out.append(m.Mount(volume=key, path=value.location, origin=where))
        else:
            out.append(m.Mount(volume=value.volume, path=key, origin=where))
    return tuple(out)


def _dependencies(c: Any, origin: FieldPath) -> tuple[m.Dependency, ...]:
    if c.depends_on is not None:
        return tuple(
            m.Dependency(
                name=d.name,
                status=m.DependencyStatus(d.status),
                description=d.description,
                origin=(*origin, "depends-on", i),
            )
            for i, d in enumerate(c.depends_on)
        )
    return tuple(
        m.Dependency(name=n, origin=(*origin, "requires", i))
        for i, n in enumerate(c.requires or [])
    )


def _policy(own: s.Policy | s.ServicePolicy | None, default: s.Policy | None) -> m.Policy:
    def pick(attr: str, sub: str) -> Any:
        for p in (own, default):
            section = getattr(p, attr, None) if p else None
            value = getattr(section, sub, None) if section else None
            if value is not None:
                return value
        return None

    return m.Policy(timeout=pick("timeout", "execute"), retries=pick("retry", "attempts"))


def _resource(
    own: s.Resource | None,
    default: s.Resource | None,
    own_at: FieldPath,
    default_at: FieldPath = (),
) -> m.Resource:
    """Merge a job's resource section (at `own_at`) over the defaults' one (at `default_at`),
    field by field."""

    def pick(*path: str) -> Any:
        for r in (own, default):
            value: Any = r
            for attr in path:
                value = getattr(value, attr, None) if value is not None else None
            if value is not None:
                return value
        return None

    result = m.Resource()
    values = {
        "cores": pick("cpu", "cores"),
        "affinity": pick("cpu", "affinity"),
        "threads": pick("cpu", "threads"),
        "memory": pick("memory", "size"),
        "memory_by_core": pick("memory", "by_core"),
        "devices": pick("devices"),
        "exclusive": pick("exclusive"),
    }
    defaults_of = default.annotations if default and default.annotations else {}
    own_of = own.annotations if own and own.annotations else {}
    annotations = {**defaults_of, **own_of}
    origins = {
        **{k: (*default_at, "annotations", k) for k in defaults_of},
        **{k: (*own_at, "annotations", k) for k in own_of},
    }
    result = replace(result, **{k: v for k, v in values.items() if v is not None})
    return replace(
        result,
        affinity=m.Affinity(result.affinity),
        devices=dict(result.devices),
        annotations=annotations,
        annotation_origins=origins,
    )


def _probe(p: s.Probe | None) -> m.Probe | None:
    if p is None:
        return None
    timing: dict[str, Any] = {
        k: v
        for k, v in {
            "initial_delay": p.initial_delay_seconds,
            "period": p.period_seconds,
            "timeout": p.timeout_seconds,
            "success_threshold": p.success_threshold,
            "failure_threshold": p.failure_threshold,
        }.items()
        if v is not None
    }
    if p.exec is not None:
        return m.Probe(action="exec", command=tuple(p.exec.command), **timing)
    if p.http_get is not None:
        h = p.http_get
        return m.Probe(
            action="http-get",
            port=h.port,
            path=h.path,
            scheme=h.scheme,
            headers={x.name: x.value for x in h.http_headers or []},
            **timing,
        )
    if p.tcp_socket is not None:
        return m.Probe(action="tcp-socket", port=p.tcp_socket.port, **timing)
    assert p.grpc is not None  # the schema admits exactly one action
    return m.Probe(action="grpc", port=p.grpc.port, grpc_service=p.grpc.service, **timing)
