"""Provisioners turn a placement into a running cluster of substrate agents, and back.

One protocol, one module per kind of site: `local` (agents as processes on this machine) now,
the Pulumi-driven cloud provisioner later. The engine talks to whatever comes up only through
the agents' gRPC API.
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
