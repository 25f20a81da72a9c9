"""The one workflow model that v1 and v4 Fuzzfiles both load into.

Nothing downstream of the loader knows which syntax version it read: mounts are keyed by
container path, `requires` is folded into `depends_on`, `defaults.job` is merged into every
job, sizes are bytes and durations are seconds.

Each object remembers where in the source it came from (`origin`, a field path). Origins are
left out of equality, so a v1 file and its upgraded v4 form load to equal models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .diagnostics import FieldPath

__all__ = [
    "Affinity",
    "Container",
    "Dependency",
    "DependencyStatus",
    "Endpoint",
    "Image",
    "Job",
    "Location",
    "Mount",
    "Multinode",
    "Policy",
    "Probe",
    "Resource",
    "Service",
    "ServicePort",
    "TaskArray",
    "Transfer",
    "Volume",
    "Workflow",
]


class Affinity(StrEnum):
    """How a job's cores are placed: on the fewest NUMA nodes, sockets, or any cores."""

    NUMA = "NUMA"
    SOCKET = "SOCKET"
    CORE = "CORE"


class DependencyStatus(StrEnum):
    """The state a dependency must reach: FINISHED (jobs, services) or RUNNING (services)."""

    FINISHED = "FINISHED"
    RUNNING = "RUNNING"


@dataclass(frozen=True, slots=True, kw_only=True)
class Location:
    """A URI with the credentials to reach it (`secret://...`)."""

    uri: str
    secret: str | None = None
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Time limit (seconds) and retries of a job or a transfer; None means Squall's default."""

    timeout: float | None = None
    retries: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """One ingress (into a volume, before jobs) or egress (out of it, after jobs) copy."""

    source: Location
    destination: Location
    policy: Policy = Policy()
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Volume:
    """Storage for a run: ephemeral (lives for one run) or persistent (named, survives runs).

    `scope` is `user` or `group` (v1 `account` is read as `group`). `size` (bytes) must be
    free where the volume is made.
    """

    name: str
    persistent: bool = False
    persistent_name: str | None = None
    scope: str = "user"
    size: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    ingress: tuple[Transfer, ...] = ()
    egress: tuple[Transfer, ...] = ()
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """A volume mounted at an absolute path inside the container."""

    volume: str
    path: str
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """The container image: `docker://` or `oras://`, with optional registry credentials."""

    uri: str
    secret: str | None = None
    legacy_secrets: Mapping[str, str] | None = None
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """Resources of one node of a job or service. `memory` is bytes (per core if by_core)."""

    cores: int = 1
    affinity: Affinity = Affinity.CORE
    threads: bool = False
    memory: int | None = None
    memory_by_core: bool = False
    devices: Mapping[str, int] = field(default_factory=dict)
    exclusive: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)
    # where each annotation was written: the job's own section, or defaults.job's
    annotation_origins: Mapping[str, FieldPath] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def memory_per_node(self) -> int | None:
        """Bytes of memory one node needs, with `by-core` applied."""
        if self.memory is None:
            return None
        return self.memory * self.cores if self.memory_by_core else self.memory


@dataclass(frozen=True, slots=True, kw_only=True)
class Multinode:
    """A gang of `nodes` containers wired up by `implementation` (`ompi` reads as `openmpi`)."""

    nodes: int
    implementation: str
    procs_per_node: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskArray:
    """Tasks `start..end` (inclusive), at most `concurrency` at a time (None: no limit)."""

    start: int
    end: int
    concurrency: int | None = None
    origin: FieldPath = field(default=(), compare=False, repr=False)

    @property
    def size(self) -> int:
        """How many tasks the array has."""
        return self.end - self.start + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Dependency:
    """Start only once `name` (a job or a service) has reached `status`."""

    name: str
    status: DependencyStatus = DependencyStatus.FINISHED
    description: str | None = None
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    name: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A service port published to users (`type`: subdomain or path; `scope`: who may use it)."""

    name: str
    port_name: str
    protocol: str = "http"
    type: str = "subdomain"
    scope: str = "group"
    annotations: Mapping[str, str] = field(default_factory=dict)
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """A readiness probe: one action (`exec`, `http-get`, `tcp-socket` or `grpc`) and timings."""

    action: str
    command: tuple[str, ...] = ()
    port: int | str | None = None
    path: str | None = None
    scheme: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    grpc_service: str | None = None
    initial_delay: int = 0
    period: int = 10
    timeout: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    """What jobs and services share: the image, what to run, where, and with what."""

    name: str
    image: Image
    command: tuple[str, ...] | None = None
    script: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    mounts: tuple[Mount, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    resource: Resource = Resource()
    multinode: Multinode | None = None
    depends_on: tuple[Dependency, ...] = ()
    origin: FieldPath = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Job(Container):
    """A run-to-completion container in the DAG."""

    policy: Policy = Policy()
    task_array: TaskArray | None = None
    isolated_network: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Service(Container):
    """A long-running container; `persist` keeps it up until the run ends. `host_network`
    (`network.host`) asks that jobs reach it at NAME.svc, which every service is."""

    persist: bool = False
    host_network: bool = False
    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    readiness_probe: Probe | None = None
    policy: Policy = Policy()  # its time limit; services are never retried


@dataclass(frozen=True, slots=True, kw_only=True)
class Workflow:
    """A whole Fuzzfile: inline files, annotations, volumes, jobs and services."""

    files: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    volumes: Mapping[str, Volume] = field(default_factory=dict)
    jobs: Mapping[str, Job] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)

    def node(self, name: str) -> Job | Service | None:
        """The job or service called `name` (they share one namespace)."""
        return self.jobs.get(name) or self.services.get(name)

    @property
    def containers(self) -> dict[str, Job | Service]:
        """Jobs and services by name, jobs first."""
        return {**self.jobs, **self.services}
