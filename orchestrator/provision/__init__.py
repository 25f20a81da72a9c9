"""Provisioners turn a placement into a running cluster of substrate agents, and back.

Every provider implements one protocol (`base.Provisioner`): it says which sites it serves,
declares what they cannot run yet, plans a cluster for a placed run, brings it up and takes it
down. `local` runs agents as processes on this machine. `cloud` sizes a `ClusterSpec` from
federation's estimate and brings it up as a Pulumi stack (`stacks`, with the ledger that
`squall stack gc` works from). Either way, the engine talks to what comes up only through the
agents' gRPC API.
"""

from .base import (
    AgentEndpoint,
    Cancelled,
    Cluster,
    NodeSlice,
    Plan,
    Provisioner,
    ProvisionError,
    Report,
    quiet,
)
from .local import LocalProvisioner, Machine, local_plan, slice_machine, this_machine

__all__ = [
    "AgentEndpoint",
    "Cancelled",
    "Cluster",
    "LocalProvisioner",
    "Machine",
    "NodeSlice",
    "Plan",
    "ProvisionError",
    "Provisioner",
    "Report",
    "local_plan",
    "quiet",
    "slice_machine",
    "this_machine",
]
