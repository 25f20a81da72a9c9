"""Provisioners turn a placement into a running cluster of substrate agents, and back.

`local` runs agents as processes on this machine. `cloud` sizes a `ClusterSpec` from
federation's estimate and brings it up as a Pulumi stack (`stacks`, with the ledger that
`squall stack gc` works from). Either way, the engine talks to what comes up only through the
agents' gRPC API.
"""

from .base import AgentEndpoint, Cluster, NodeSlice, Provisioner, ProvisionError
from .local import LocalProvisioner, Machine, slice_machine, this_machine

__all__ = [
    "AgentEndpoint",
    "Cluster",
    "LocalProvisioner",
    "Machine",
    "NodeSlice",
    "ProvisionError",
    "Provisioner",
    "slice_machine",
    "this_machine",
]
