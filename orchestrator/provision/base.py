"""What every provisioner takes and gives."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from substrate.tls import ClientTLS

from ..errors import Category, SquallError

if TYPE_CHECKING:
    from ..fuzzfile import Workflow
    from ..placing import Placement

__all__ = [
    "AgentEndpoint",
    "Cluster",
    "NodeSlice",
    "Plan",
    "ProvisionError",
    "Provisioner",
    "Report",
    "await_health",
    "quiet",
]

Report = Callable[[str], None]  # one line of progress, as it happens
Shape = TypeVar("Shape")  # what a provider sizes a cluster as: its nodes, a stack's spec


def quiet(line: str) -> None:
    """A report that goes nowhere."""
    del line


class ProvisionError(SquallError):
    """A cluster could not be brought up (nothing of it is left running) or taken down."""

    category = Category.PROVISION


class Cancelled(ProvisionError):
    """The run was cancelled while its cluster came up: the provider stopped (and took down
    what it had made)."""


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
    tls: ClientTLS | None = None  # the run CA and this orchestrator's certificate for it


@dataclass(frozen=True, slots=True)
class Cluster:
    run_id: str
    site: str
    agents: tuple[AgentEndpoint, ...]
    # job -> its nodes (indices of `agents`): the node group federation priced for it (a
    # cloud's); a job not named runs on any node
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # a multi-node job's containers share their nodes' own network (NETWORK_HOST): the nodes
    # do not route each other's pod subnets (a cloud's), and MPI gets the fabric
    host_network: bool = False
    # where volumes live on every node: the cluster's own storage, mounted at this path on
    # each; "": on this machine (the local site), where the orchestrator keeps them
    volume_root: str = ""
    # where every node has the share that keeps persistent volumes across runs (a cloud
    # region's, named in the sites file); "": on this machine (the local site)
    persistent_root: str = ""


@dataclass(frozen=True, slots=True)
class Plan(Generic[Shape]):
    """A cluster sized for one run before anything of it is made: the provider's `shape` of
    it, which its `up` brings up, and `record`, what the run keeps of it in its placement
    (`nodes` on the local site, `cluster` on a cloud)."""

    run_id: str
    shape: Shape
    record: Mapping[str, Any] = field(default_factory=dict)


class Provisioner(Protocol[Shape]):
    """A family of sites: it sizes a cluster for a run, brings it up, and always takes it
    down again. The engine drives every provider through these calls alone, picking the one
    that `serves` the site federation placed a run on. `cannot` declares what its sites
    cannot run yet (a workflow feature -> why); federation reads it, so such a site is an
    infeasible candidate with its reason, never a refusal after PLACING."""

    cannot: Mapping[str, str]

    def serves(self, site: str) -> bool:
        """Whether this provider makes clusters on `site` (a site name as federation has it)."""
        ...

    def plan(self, run_id: str, owner: str, wf: Workflow, placement: Placement) -> Plan[Shape]:
        """Size the cluster for `wf` as placed; nothing is made yet. Raises ProvisionError,
        in one line, when it cannot be made (a setting, a credential, a tool missing)."""
        ...

    def up(self, plan: Plan[Shape], report: Report) -> Cluster:
        """Bring the planned cluster up; on failure, take down what started and raise."""
        ...

    def down(self, cluster: Cluster, report: Report) -> None:
        """Take every node of the cluster down; safe to call twice. Raises ProvisionError
        when something of it may be left (a cloud stack that `squall stack gc` retries)."""
        ...

    def replace(self, cluster: Cluster, node: int, report: Report) -> AgentEndpoint:
        """Bring up a node in place of the cluster's node `node`, which was lost (its agent
        unreachable); its agent, empty. Raises ProvisionError when this site cannot (the
        run then goes on without the node, or moves to another site)."""
        ...


def await_health(agent: AgentEndpoint, timeout_s: float, why: Callable[[], str]) -> None:
    """Wait until `agent` answers a health call; else ProvisionError naming it, its address,
    gRPC's reason and `why()` (what its log or console says last)."""
    import grpc

    from api.substrate.v1 import agent_pb2 as pb
    from substrate.client import connect

    channel, stub = connect(agent.address, agent.token, agent.tls)
    try:
        stub.Health(pb.HealthRequest(), timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as exc:
        raise ProvisionError(
            f"the agent {agent.name} at {agent.address} does not answer: {exc.details()}; {why()}"
        ) from None
    finally:
        channel.close()
