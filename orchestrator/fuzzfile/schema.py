"""The shape of a Fuzzfile as written, per syntax version (v1 and v4), as pydantic models.

These models check shape, types, enums and units, and reject unknown keys. They mirror the
YAML: kebab-case aliases, both mount shapes, deprecated fields. Cross-references and graph
rules live in `rules.py`; the version-independent model that the rest of Squall uses is in
`model.py`, built from these by `normalize.py`.

Field facts come from the Fuzzfile reference (docs/fuzzfile-spec.md in the shared docs):
section numbers are cited where a choice was made.
"""

# No `from __future__ import annotations` here: pydantic would then evaluate every field's
# annotation from its text when each model class is made, about 2 ms of the CLI's start-up
# (bench/cli_startup.py); written as values, Python evaluates them with the class body.
import re
import typing
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .diagnostics import FieldPath
from .units import UnitError, parse_duration, parse_size
from .variables import legacy_secret_references

__all__ = ["DOCUMENT_MODELS", "DocumentV1", "DocumentV4", "allowed_keys", "model_fields_by_alias"]


def _size(value: object) -> int:
    try:
        return parse_size(value)
    except UnitError as exc:
        raise PydanticCustomError("size", str(exc)) from None


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise PydanticCustomError("duration", str(exc)) from None


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _port_number(value: int) -> int:
    if not 1 <= value <= 65535:
        raise PydanticCustomError("port", "port {port} is outside 1-65535", {"port": value})
    return value


_SECRET_RE = re.compile(r"^secret://(user|group|account|organization|cluster)/[A-Za-z0-9_.\-]+$")
_VOLUME_RE = re.compile(r"^volume://(user|group|account)/[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise PydanticCustomError(
            "absolute_path",
            "{quoted} is not an absolute path; write /{path}",
            {"quoted": repr(value), "path": value},
        )
    return value


_URL_PATH = re.compile(r"^/[^\s#\\]*$")  # a path and query: no spaces, fragment or backslash


def _probe_path(value: str) -> str:
    """An HTTP probe's path: it follows `host:port` in the URL the orchestrator fetches, so
    it must begin with `/` (`@other-host/` would make it another host's)."""
    if not _URL_PATH.match(value):
        raise PydanticCustomError(
            "probe_path",
            "{quoted} is not a URL path; write it from its first /, such as /healthz",
            {"quoted": repr(value)},
        )
    return value


def _image_uri(value: str) -> str:
    if not value.startswith(("docker://", "oras://")):
        scheme = value.split("://", 1)[0] + "://" if "://" in value else "no scheme"
        raise PydanticCustomError(
            "image_uri",
            "image {uri} has {scheme}; images are docker://[REGISTRY/]REPO[:TAG|@DIGEST] "
            "or oras://REGISTRY/REPO[:TAG]",
            {"uri": repr(value), "scheme": scheme},
        )
    return value


def _secret_ref(value: str) -> str:
    if not _SECRET_RE.match(value) or _dot_segment(value):
        raise PydanticCustomError(
            "secret_ref",
            "{ref} is not a secret reference; write secret://SCOPE/NAME with SCOPE one of "
            "user, group, organization (NAME: letters, digits, -, _ and ., but not . or ..)",
            {"ref": repr(value)},
        )
    return value


def _dot_segment(value: str) -> bool:
    """Whether a reference has a `.` or `..` segment, which would name a directory."""
    return any(part in (".", "..") for part in value.split("://", 1)[-1].split("/"))


def _volume_ref(value: str) -> str:
    if not _VOLUME_RE.match(value) or _dot_segment(value):
        raise PydanticCustomError(
            "volume_ref",
            "{ref} is not a volume reference; write volume://user/ephemeral, "
            "volume://user/persistent/NAME or volume://SCOPE/CLASS[/NAME] (SCOPE: user or group; "
            "CLASS and NAME: letters, digits, -, _ and ., but not . or ..)",
            {"ref": repr(value)},
        )
    return value


_STORAGE_CLASSES = ("ephemeral", "persistent")


def _no_provisioner(name: str, hint: str) -> PydanticCustomError:
    return PydanticCustomError(
        "refused",
        "{message}",
        {
            "message": f"Squall has no provisioner or storage class {name!r}: each site keeps "
            "volumes in one storage of its own, ephemeral or persistent",
            "hint": hint,
            "code": "provisioner",
        },
    )


def _volume_class(value: str) -> str:
    klass = value.removeprefix("volume://").split("/")[1]
    if klass not in _STORAGE_CLASSES:
        raise _no_provisioner(
            klass, "write volume://user/ephemeral or volume://user/persistent/NAME"
        )
    return value


def _volume_use(value: str) -> str:
    if value not in _STORAGE_CLASSES:
        raise _no_provisioner(
            value,
            "write use: ephemeral, or name: NAME (with use: persistent) for a persistent volume",
        )
    return value


def _env_entry(value: str) -> str:
    key, sep, rest = value.partition("=")
    if not sep or not _ENV_KEY_RE.match(key):
        raise PydanticCustomError(
            "env_entry",
            "{entry} is not an environment entry; write KEY=VALUE with KEY made of letters, "
            "digits and _",
            {"entry": repr(value)},
        )
    if rest.startswith("secret://") and not rest.startswith("secret://user/"):
        raise PydanticCustomError(
            "env_secret_scope",
            "environment secrets must be user-scoped: write secret://user/NAME, not {ref}",
            {"ref": repr(rest)},
        )
    if rest.startswith("secret://"):
        _secret_ref(rest)
    _legacy_placeholders(rest, env=True)
    return value


def _legacy_placeholders(value: str, *, env: bool) -> None:
    """The `${{ secret "NAME" }}` placeholders of `value` name valid secrets (§6.3)."""
    for ref in legacy_secret_references(value):
        _secret_ref(ref)
        if env and not ref.startswith("secret://user/"):
            raise PydanticCustomError(
                "env_secret_scope",
                "environment secrets must be user-scoped: write secret://user/NAME, not {ref}",
                {"ref": repr(ref)},
            )


def _image_secrets(value: dict[str, str]) -> dict[str, str]:
    """The legacy `secrets:` map of an image (§6.3): a username and a password, the password
    a placeholder, since the Fuzzfile is kept with the run."""
    if sorted(value) != ["password", "username"]:
        raise PydanticCustomError(
            "image_secrets",
            "an image's `secrets:` map holds `username` and `password` (found: {keys}); "
            "better, store both as one secret and write image.secret: secret://user/NAME",
            {"keys": ", ".join(sorted(value)) or "none"},
        )
    if not legacy_secret_references(value["password"]):
        raise PydanticCustomError(
            "image_secrets",
            "the image's password is written in the Fuzzfile, which is kept with the run; "
            "store it with `squall secret set secret://user/NAME` and write password: "
            '${{ secret "NAME" }}',
        )
    for text in value.values():
        _legacy_placeholders(text, env=False)
    return value


def _transfer_secrets(value: dict[str, str]) -> dict[str, str]:
    raise PydanticCustomError(
        "transfer_secrets",
        "a `secrets:` map on a transfer is not supported; store the credentials as one secret "
        "(`squall secret set secret://user/NAME`) and write secret: secret://user/NAME",
    )


def _refused(code: str, message: str, hint: str, *, allow: Any = None) -> AfterValidator:
    """A field Squall refuses with its reason (only the value `allow` passes): it stays in
    the schema, so that it is reported where it is written, with the reason and a hint
    (see `tests/fuzzfile/test_reference_coverage.py`)."""

    def check(value: Any) -> Any:
        if value is None or value == allow:
            return value
        raise PydanticCustomError(
            "refused", "{message}", {"message": message, "hint": hint, "code": code}
        )

    return AfterValidator(check)


# Device kinds the agents lease (substrate/leases.py): any other would never be granted.
DEVICE_KINDS = ("nvidia.com/gpu", "amd.com/gpu")


def _device_kind(value: str) -> str:
    if value not in DEVICE_KINDS:
        raise PydanticCustomError(
            "refused",
            "{message}",
            {
                "message": f"Squall's nodes offer no {value!r} devices",
                "hint": "the devices a job can lease are " + " and ".join(DEVICE_KINDS),
                "code": "device-kind",
            },
        )
    return value


# Whole numbers are 64-bit, as the platform (Go) reads them: a larger one is refused here
# rather than met downstream (a sleep, a range, a row in the store).
INT64_MAX = 2**63 - 1
NonNegativeInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PositiveInt = Annotated[int, Field(gt=0, le=INT64_MAX)]
# Probe timings are 32-bit, as in Kubernetes (the waits they become cannot be longer).
INT32_MAX = 2**31 - 1
ProbeCount = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveProbeCount = Annotated[int, Field(gt=0, le=INT32_MAX)]
AbsPath = Annotated[str, AfterValidator(_absolute)]
ImageRef = Annotated[str, AfterValidator(_image_uri)]
SecretRef = Annotated[str, AfterValidator(_secret_ref)]
VolumeRef = Annotated[str, AfterValidator(_volume_ref), AfterValidator(_volume_class)]
EnvEntry = Annotated[str, AfterValidator(_env_entry)]
_PORT_NAME_RE = re.compile(r"^[a-z]([a-z0-9-]{0,13}[a-z0-9])?$")  # a Kubernetes port name


def _port_or_name(value: object) -> object:
    """A probe port: a number in 1-65535, or the name of a declared port."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _port_number(value)
    if not isinstance(value, str) or not _PORT_NAME_RE.match(value):
        raise PydanticCustomError(
            "port", "{port} is neither a port number nor a port name", {"port": repr(value)}
        )
    return value


Size = Annotated[int, BeforeValidator(_size)]
Duration = Annotated[float, BeforeValidator(_duration)]
Port = Annotated[int, AfterValidator(_port_number)]
PortOrName = Annotated[int | str, BeforeValidator(_port_or_name)]
StrMap = dict[str, str]


class _Model(BaseModel):
    """Strict about keys (Fuzzball >= 3.3 rejects unknown fields), lenient about number text."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        coerce_numbers_to_str=True,  # `command: [blastp, -num_threads, 8]` is in the corpus
        populate_by_name=False,
        str_strip_whitespace=False,
        # Validators are built when a document is first validated, one per document model
        # (its nested models inline), not one per model as each class is defined: `squall
        # workflow validate` starts faster and validates as fast (bench/cli_startup.py).
        defer_build=True,
    )


# ---- shared pieces -----------------------------------------------------------------------


class URI(_Model):
    """A URI object: transfer sources and destinations (§4.5)."""

    uri: str
    secret: SecretRef | None = None
    # legacy 2023 form, §6.3: refused on transfers, whose credentials it cannot say
    secrets: Annotated[StrMap, AfterValidator(_transfer_secrets)] | None = None
    decryption_secret: (
        Annotated[
            SecretRef,
            _refused(
                "decryption-secret",
                "a transfer has nothing to decrypt: `decryption-secret` belongs to encrypted "
                "SIF images",
                "remove decryption-secret; credentials go in secret: secret://user/NAME",
            ),
        ]
        | None
    ) = Field(None, alias="decryption-secret")


class ImageURI(URI):
    """The image of a job or service (§4.6.1): `docker://` or `oras://`."""

    uri: ImageRef
    secrets: Annotated[StrMap, AfterValidator(_image_secrets)] | None = None  # deprecated
    decryption_secret: (
        Annotated[
            SecretRef,
            _refused(
                "decryption-secret",
                "encrypted SIF images are not supported: Squall cannot decrypt them",
                "use an image that is not encrypted",
            ),
        ]
        | None
    ) = Field(None, alias="decryption-secret")


class Timeout(_Model):
    execute: Duration | None = None


class Retry(_Model):
    attempts: NonNegativeInt | None = None


class Policy(_Model):
    """`policy` on jobs and transfers (§4.6.4)."""

    timeout: Timeout | None = None
    retry: Retry | None = None


class ServicePolicy(_Model):
    """`policy` on a service: its time limit holds; it is never restarted."""

    timeout: Timeout | None = None
    retry: (
        Annotated[
            Retry,
            _refused(
                "service-retry",
                "Squall does not restart a service that ended: the jobs that use it would "
                "still hold its old address",
                "remove retry; let the service's own script restart its server, or retry the "
                "jobs that use it",
            ),
        ]
        | None
    ) = None


class Transfer(_Model):
    """One ingress or egress item of a volume (§4.5)."""

    source: URI
    destination: URI
    policy: Policy | None = None


class Cpu(_Model):
    cores: PositiveInt | None = None
    affinity: Annotated[Literal["NUMA", "SOCKET", "CORE"], BeforeValidator(_upper)] | None = None
    # the reference gives `sockets` no meaning (all cores on N sockets? spread evenly over N?)
    sockets: (
        Annotated[
            PositiveInt,
            _refused(
                "sockets",
                "Squall does not place cores by a count of sockets: the Fuzzfile reference "
                "does not say what `sockets` asks for (the cores on at most N sockets, or "
                "spread evenly over N), and Squall will not guess",
                "remove sockets; affinity: SOCKET keeps a job's cores on as few sockets as "
                "possible, affinity: NUMA on as few NUMA nodes",
            ),
        ]
        | None
    ) = None
    threads: bool | None = None


class Memory(_Model):
    size: Size | None = None
    by_core: bool | None = Field(None, alias="by-core")


class Resource(_Model):
    """Per-node resources of a job or service (§4.6.3)."""

    cpu: Cpu | None = None
    memory: Memory | None = None
    devices: dict[Annotated[str, AfterValidator(_device_kind)], NonNegativeInt] | None = None
    exclusive: bool | None = None
    annotations: StrMap | None = None


class Multinode(_Model):
    """Multi-node (MPI, PGAS, generic) jobs (§4.6.5)."""

    nodes: PositiveInt
    implementation: Annotated[
        Literal["openmpi", "ompi", "mpich", "gasnet", "generic"], BeforeValidator(_lower)
    ]
    procs_per_node: PositiveInt | None = Field(None, alias="procs-per-node")


class TaskArray(_Model):
    """Task arrays (§4.6.6): tasks `start..end` inclusive, `concurrency` at a time."""

    start: NonNegativeInt
    end: NonNegativeInt
    concurrency: PositiveInt | None = None


_EXPOSE = (
    "expose",
    "Squall publishes no job ports: every job has a network namespace of its own, and since "
    "nothing can wait for a job's port to open, other jobs reach servers as services",
    "remove it: a port of a running job is reached with `squall workflow port-forward RUN JOB "
    "LOCAL:PORT` without being declared; a server that other jobs use is a service with "
    "network.ports, reached at SERVICE.svc:PORT",
)


class JobNetwork(_Model):
    """v1 job networking (§4.6.7)."""

    isolated: bool | None = None
    expose_tcp: Annotated[list[Port], _refused(*_EXPOSE, allow=[])] | None = Field(
        None, alias="expose-tcp"
    )
    expose_udp: Annotated[list[Port], _refused(*_EXPOSE, allow=[])] | None = Field(
        None, alias="expose-udp"
    )


class Dependency(_Model):
    """One `depends-on` entry (§4.6.8); status is case-insensitive and FINISHED by default."""

    name: str
    status: Annotated[Literal["FINISHED", "RUNNING"], BeforeValidator(_upper)] = "FINISHED"
    description: str | None = None


# ---- services ----------------------------------------------------------------------------


class ServicePort(_Model):
    name: str
    port: Port
    protocol: Annotated[Literal["tcp", "udp"], BeforeValidator(_lower)] = "tcp"


class ServiceEndpoint(_Model):
    name: str
    port_name: str = Field(alias="port-name")
    protocol: Annotated[
        Literal["http", "https", "grpc", "grpcs", "tcp", "tls"], BeforeValidator(_lower)
    ] = "http"
    type: Annotated[Literal["subdomain", "path"], BeforeValidator(_lower)] = "subdomain"
    scope: Annotated[
        Literal["user", "group", "organization", "public"], BeforeValidator(_lower)
    ] = "group"
    per_replica: (
        Annotated[
            bool,
            _refused(
                "per-replica",
                "Squall runs one replica of a service, so there is no replica to give an "
                "endpoint of its own",
                "remove per-replica",
                allow=False,
            ),
        ]
        | None
    ) = Field(None, alias="per-replica")  # newer catalogs, §9
    annotations: StrMap | None = None


class ServiceNetwork(_Model):
    host: bool | None = None
    ports: list[ServicePort] | None = None
    endpoints: list[ServiceEndpoint] | None = None


class HttpHeader(_Model):
    name: str
    value: str


class ExecAction(_Model):
    command: list[str]


# The orchestrator runs http-get, tcp-socket and grpc probes itself: a `host` would make it
# connect wherever a Fuzzfile says (its own network, a cloud's metadata service).
_PROBE_HOST = (
    "probe-host",
    "Squall probes a service at its own address only: a probe `host` would make the "
    "orchestrator connect wherever the workflow says, outside the run",
    "remove host; the probe reaches the service's port on the service itself",
)


class HttpGetAction(_Model):
    path: Annotated[str, AfterValidator(_probe_path)] = "/"
    port: PortOrName
    host: Annotated[str, _refused(*_PROBE_HOST)] | None = None
    scheme: Annotated[Literal["HTTP", "HTTPS"], BeforeValidator(_upper)] = "HTTP"
    http_headers: list[HttpHeader] | None = Field(None, alias="http-headers")


class TcpSocketAction(_Model):
    port: PortOrName
    host: Annotated[str, _refused(*_PROBE_HOST)] | None = None


class GrpcAction(_Model):
    port: Port
    service: str | None = None


class Probe(_Model):
    """Kubernetes-style readiness probe of a service (§4.7)."""

    exec: ExecAction | None = None
    http_get: HttpGetAction | None = Field(None, alias="http-get")
    tcp_socket: TcpSocketAction | None = Field(None, alias="tcp-socket")
    grpc: GrpcAction | None = None
    initial_delay_seconds: ProbeCount | None = Field(None, alias="initial-delay-seconds")
    period_seconds: PositiveProbeCount | None = Field(None, alias="period-seconds")
    timeout_seconds: PositiveProbeCount | None = Field(None, alias="timeout-seconds")
    success_threshold: PositiveProbeCount | None = Field(None, alias="success-threshold")
    failure_threshold: PositiveProbeCount | None = Field(None, alias="failure-threshold")

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        actions = [a for a in ("exec", "http_get", "tcp_socket", "grpc") if getattr(self, a)]
        if len(actions) != 1:
            found = ", ".join(a.replace("_", "-") for a in actions) or "none"
            raise PydanticCustomError(
                "probe_action",
                "a readiness probe needs exactly one of exec, http-get, tcp-socket, grpc "
                "(found: {found})",
                {"found": found},
            )
        return self


class Replicas(_Model):
    min: NonNegativeInt
    max: PositiveInt


class Metrics(_Model):
    enabled: bool | None = None
    path: str | None = None
    port: Port | None = None
    interval: str | None = None


class ScaleTrigger(_Model):
    metrics_query: str = Field(alias="metrics-query")
    cooldown_period: str | None = Field(None, alias="cooldown-period")
    services: list[str] | None = None


class ScaleUp(_Model):
    triggers: list[ScaleTrigger]


class ScaleDown(_Model):
    metrics_query: str = Field(alias="metrics-query")
    cooldown_period: str | None = Field(None, alias="cooldown-period")
    drain_period: str | None = Field(None, alias="drain-period")


class Autoscaler(_Model):
    """Service autoscaling, seen only in newer catalog revisions (§9)."""

    replicas: Replicas
    metrics: Metrics | None = None
    scale_up: ScaleUp | None = Field(None, alias="scale-up")
    scale_down: ScaleDown | None = Field(None, alias="scale-down")


class DynamicConfig(_Model):
    """A file re-rendered as peer service replicas come and go (§9)."""

    path: str
    services: list[str] | None = None
    script: str


# ---- mounts: the v1/v4 difference (§4.6.2) -------------------------------------------------


class MountV1(_Model):
    """v1: keyed by volume name, the value holds the container path."""

    location: AbsPath


class MountV4(_Model):
    """v4: keyed by container path, the value names the volume (or is the name: short form)."""

    volume: str


def _short_mount(value: object) -> object:
    return {"volume": value} if isinstance(value, str) else value


MountsV1 = dict[str, MountV1]
MountsV4 = dict[AbsPath, Annotated[MountV4, BeforeValidator(_short_mount)]]


# ---- jobs and services ---------------------------------------------------------------------


class _Container(_Model):
    """Fields that jobs and services share (§4.6, §4.7)."""

    name: str | None = None  # accepted and ignored: the map key wins
    image: ImageURI
    command: list[str] | None = None
    script: str | None = None
    args: list[str] | None = None
    env: list[EnvEntry] | None = None
    cwd: AbsPath | None = None
    files: dict[AbsPath, str] | None = None
    resource: Resource | None = None
    multinode: Multinode | None = None
    depends_on: list[Dependency] | None = Field(None, alias="depends-on")
    requires: list[str] | None = None  # deprecated: FINISHED dependencies


class _Job(_Container):
    policy: Policy | None = None
    task_array: TaskArray | None = Field(None, alias="task-array")
    network: JobNetwork | None = None


class _Service(_Container):
    persist: bool | None = None
    network: ServiceNetwork | None = None
    readiness_probe: Probe | None = Field(None, alias="readiness-probe")
    policy: ServicePolicy | None = None  # unverified on services (§4.7); the time limit holds
    autoscaler: (
        Annotated[
            Autoscaler,
            _refused(
                "autoscaler",
                "Squall runs one replica of each service and scales none",
                "remove autoscaler: the service runs as one replica",
            ),
        ]
        | None
    ) = None
    dynamic_config: (
        Annotated[
            DynamicConfig,
            _refused(
                "dynamic-config",
                "dynamic-config follows the replicas of an autoscaled service, and Squall runs "
                "one replica of each service",
                "remove dynamic-config",
            ),
        ]
        | None
    ) = Field(None, alias="dynamic-config")


class JobV1(_Job):
    mounts: MountsV1 | None = None


class JobV4(_Job):
    mounts: MountsV4 | None = None


class ServiceV1(_Service):
    mounts: MountsV1 | None = None


class ServiceV4(_Service):
    mounts: MountsV4 | None = None


class JobDefaultsV1(_Model):
    env: list[EnvEntry] | None = None
    mounts: MountsV1 | None = None
    policy: Policy | None = None
    resource: Resource | None = None


class JobDefaultsV4(_Model):
    env: list[EnvEntry] | None = None
    mounts: MountsV4 | None = None
    policy: Policy | None = None
    resource: Resource | None = None


class DefaultsV1(_Model):
    job: JobDefaultsV1 | None = None


class DefaultsV4(_Model):
    job: JobDefaultsV4 | None = None


# ---- volumes (§4.5) --------------------------------------------------------------------


_HOST = (
    "host-volume",
    "HOST volumes (`type: HOST` with `path`) are not supported: a job sees no directory of "
    "its node but its volumes",
    "use a persistent volume: reference: volume://user/persistent/NAME",
)


class VolumeV1(_Model):
    reference: VolumeRef | None = None
    name: str | None = None  # informational in v1
    type: (
        Annotated[
            Literal["EPHEMERAL", "HOST"],
            BeforeValidator(_upper),
            _refused(*_HOST, allow="EPHEMERAL"),
        ]
        | None
    ) = None
    path: Annotated[str, _refused(*_HOST)] | None = None  # deprecated, HOST volumes
    ingress: list[Transfer] | None = None
    egress: list[Transfer] | None = None


class VolumeV4(_Model):
    use: Annotated[str, AfterValidator(_volume_use)] | None = None
    name: str | None = None  # an existing persistent volume
    size: Size | None = None
    annotations: StrMap | None = None
    reference: VolumeRef | None = None  # still accepted (catalog templates use it)
    ingress: list[Transfer] | None = None
    egress: list[Transfer] | None = None


def _empty_volume(value: object) -> object:
    return {} if value is None else value  # `db:` with no body is an ephemeral volume (§4.5)


# ---- documents ---------------------------------------------------------------------------


class DocumentV1(_Model):
    version: Literal["v1"]
    files: StrMap | None = None
    defaults: DefaultsV1 | None = None
    annotations: StrMap | None = None
    volumes: dict[str, VolumeV1] | None = None
    jobs: dict[str, JobV1] | None = None
    services: dict[str, ServiceV1] | None = None


class DocumentV4(_Model):
    version: Literal["v4"]
    files: StrMap | None = None
    defaults: DefaultsV4 | None = None
    annotations: StrMap | None = None
    volumes: dict[str, Annotated[VolumeV4, BeforeValidator(_empty_volume)]] | None = None
    jobs: dict[str, JobV4] | None = None
    services: dict[str, ServiceV4] | None = None


DOCUMENT_MODELS: dict[str, type[DocumentV1] | type[DocumentV4]] = {
    "v1": DocumentV1,
    "v4": DocumentV4,
}

# Keys that older platforms accepted, with what to write instead (spec §4.7, §13).
LEGACY_KEYS: dict[str, str] = {
    "export": "service `export` was removed in platform 3.1; declare network.endpoints instead",
    "proxy": "service `proxy` was removed in platform 3.1; declare network.endpoints instead",
    "taskArray": "write `task-array` (kebab-case) since platform 3.3",
    "dependsOn": "write `depends-on` (kebab-case) since platform 3.3",
    "byCore": "write `by-core` (kebab-case)",
    "procsPerNode": "write `procs-per-node` (kebab-case)",
    "readinessProbe": "write `readiness-probe` (kebab-case)",
    "exposeTcp": "write `expose-tcp` (kebab-case)",
    "exposeUdp": "write `expose-udp` (kebab-case)",
    "decryptionSecret": "write `decryption-secret` (kebab-case)",
}


def model_fields_by_alias(model: type[BaseModel]) -> dict[str, Any]:
    """The YAML keys a model accepts, mapped to their field info."""
    return {(info.alias or name): info for name, info in model.model_fields.items()}


def allowed_keys(schema: type[BaseModel], path: FieldPath) -> set[str]:
    """The keys the schema accepts at `path` (a mapping inside the document)."""
    annotation: Any = schema
    for part in path:
        model = _model_in(annotation)
        if model is not None:
            info = model_fields_by_alias(model).get(str(part))
            if info is None:
                return set()
            annotation = info.annotation
        else:
            annotation = _container_item(annotation)
            if annotation is None:
                return set()
    model = _model_in(annotation)
    return set(model_fields_by_alias(model)) if model else set()


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in _flatten(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _container_item(annotation: Any) -> Any:
    """The value type of a dict or list annotation (through Optional and Annotated)."""
    for candidate in _flatten(annotation):
        origin = getattr(candidate, "__origin__", None)
        if origin in (dict, list):
            return candidate.__args__[-1]
    return None


def _flatten(annotation: Any) -> list[Any]:
    if annotation is None:
        return []
    if typing.get_origin(annotation) is typing.Annotated:
        return _flatten(typing.get_args(annotation)[0])
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return [x for a in args for x in _flatten(a)]
    return [annotation]
