"""What every provisioner takes and gives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..errors import Category, SquallError

__all__ = ["AgentEndpoint", "Cluster", "NodeSlice", "ProvisionError", "Provisioner"]


class ProvisionError(SquallError):
    """A cluster could not be brought up (nothing of it is left running) or taken down."""

    category = Category.PROVISION


@dataclass(frozen=True, slots=True)
class NodeSlice:
    """One node of a cluster: the CPUs, memory and GPUs its agent may lease."""

    cpus: tuple[int, ...]
    memory_bytes: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentEndpoint:
    """How to reach one node's agent."""

    name: str
    address: str  # host:port of its gRPC API
    token: str
    pid: int = 0  # on the local site, the agent's process (for the run's records)


@dataclass(frozen=True, slots=True)
class Cluster:
    run_id: str
    site: str
    agents: tuple[AgentEndpoint, ...]


class Provisioner(Protocol):
    """Brings a cluster up for a run and always takes it down again. `cannot` declares what
    its sites cannot run yet (a workflow feature -> why); federation reads it, so such a site
    is an infeasible candidate with its reason, never a refusal after PLACING."""

    site: str
    cannot: Mapping[str, str]

    def up(self, run_id: str, nodes: list[NodeSlice]) -> Cluster:
        """Start one agent per node; on failure, stop what started and raise."""
        ...

    def down(self, cluster: Cluster) -> None:
        """Stop every agent of the cluster; safe to call twice."""
        ...
