"""What federation prices: a workload described without any Fuzzfile, so that federate
depends on nothing else of Squall's. The orchestrator turns a workflow into one."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataMove", "JobNeeds", "Place", "Workload"]


@dataclass(frozen=True, slots=True)
class Place:
    """Where data lives: a cloud region, the internet, or a named site (on-prem, local)."""

    kind: str  # "cloud", "internet" or "site"
    cloud: str = ""
    region: str = ""
    site: str = ""
    tags: frozenset[str] = frozenset()  # residency tags, e.g. {"eu"}

    def __str__(self) -> str:
        if self.kind == "cloud":
            return f"{self.cloud}:{self.region}"
        return self.site or self.kind


@dataclass(frozen=True, slots=True)
class DataMove:
    """Bytes into the run's site (ingress) or out of it (egress), from or to `place`."""

    direction: str  # ingress or egress
    uri: str
    place: Place
    size_bytes: int | None  # None: unknown
    size_source: str  # "object metadata", "annotation", "unknown"


@dataclass(frozen=True, slots=True)
class JobNeeds:
    """One job's node group: per node cores, memory and GPUs, and how long it runs."""

    name: str
    cores: int
    memory_gib: float
    gpus: int = 0
    gpu_model: str = ""  # "" : any
    nodes: int = 1
    multinode: bool = False  # wants an HPC fabric
    tasks: int = 1
    concurrency: int | None = None
    runtime_hours: float | None = None  # per task
    runtime_source: str = "unknown"  # annotation, history, timeout (an upper bound), unknown
    depends_on: tuple[str, ...] = ()
    arch: str = "x86_64"  # the images' architecture


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    jobs: tuple[JobNeeds, ...]
    data: tuple[DataMove, ...] = ()
    tags: frozenset[str] = field(default_factory=frozenset)
    # what it uses that a site may not offer yet (`volumes`, `multinode`); see Site.cannot
    features: frozenset[str] = field(default_factory=frozenset)
    storage_gib: int = 0  # the sum of its volumes' sizes: what the cluster's storage holds
