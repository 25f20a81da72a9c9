"""`ClusterSpec`: everything a cloud program needs to build one run's cluster, and nothing
about workflows. The orchestrator turns a placement into one; the Pulumi programs read it.

The rules that keep a cluster safe and cheap are checked here, once, for every cloud:
- the agent port is opened only to the orchestrator's address, never to the whole internet;
- a fabric fits its cloud (EFA on AWS, InfiniBand on Azure, GPUDirect on GCP);
- compact placement only where it pays: the nodes of one multi-node job (a placement group
  around a single node only narrows the capacity it can be placed in);
- every node group is tagged with the run, its owner and when the cluster expires;
- the run's volumes live where every node sees them at one path (`VOLUME_ROOT`): the node's
  own disk for a cluster of one node, else an NFS share (the first node's, or the cloud's
  managed file system), reached only from inside the cluster;
- the join token never shows in a repr or a log.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "CLOUDS",
    "NFS_PORT",
    "PERSISTENT_ROOT",
    "VOLUME_ROOT",
    "Bootstrap",
    "ClusterSpec",
    "Fabric",
    "Network",
    "NodeGroup",
    "SiteRef",
    "Storage",
    "StorageClass",
    "storage_for",
]

_FABRIC_CLOUD = {"efa": "aws", "infiniband": "azure", "gpudirect": "gcp"}
CLOUDS = ("aws", "gcp", "azure")
# where every node sees the run's volumes, whatever holds them (the same path on every node)
VOLUME_ROOT = "/var/lib/squall/volumes"
# where every node of a run with persistent volumes mounts the team's share that keeps them
PERSISTENT_ROOT = "/var/lib/squall/persistent"
NFS_PORT = 2049  # NFSv4 needs no other port (no portmapper, mountd or lock manager)


class Fabric(StrEnum):
    NONE = "none"
    EFA = "efa"
    INFINIBAND = "infiniband"
    GPUDIRECT = "gpudirect"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteRef(_Model):
    # vm: virtual machines on the orchestrator's own machine, booted from the node image's
    # disk (orchestrator/provision/vm.py); no Pulumi program makes those
    cloud: Literal["aws", "gcp", "azure", "vm"]
    region: str = Field(min_length=1)
    zone: str | None = None  # one zone for the whole cluster; None: the program picks


class NodeGroup(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    instance_type: str = Field(min_length=1)
    count: int = Field(ge=1, le=1024)
    spot: bool = False
    disk_gib: int = Field(default=100, ge=8)
    image: str = Field(min_length=1)  # the node image (Warewulf/OCI) that starts the agent
    fabric: Fabric = Fabric.NONE
    efa_interfaces: int = Field(default=0, ge=0)  # AWS: attach all the type supports
    compact: bool = False  # one placement group / compact policy / proximity group
    gpus: int = Field(default=0, ge=0)  # per node, as the type has them (GCP attaches them)
    gpu_model: str = ""  # e.g. "H100", "A100 80GB": the catalog's name for the model

    @model_validator(mode="after")
    def _fabric_rules(self) -> NodeGroup:
        if self.fabric is Fabric.EFA and self.efa_interfaces < 1:
            raise ValueError(f"{self.name}: an EFA group needs efa_interfaces >= 1")
        if self.fabric is not Fabric.EFA and self.efa_interfaces:
            raise ValueError(f"{self.name}: efa_interfaces without the EFA fabric")
        if self.compact and self.count < 2:
            raise ValueError(
                f"{self.name}: compact placement is for 2 or more nodes; it "
                "would only shrink the capacity a single or plain node can get"
            )
        return self


class StorageClass(StrEnum):
    """What holds a run's volumes."""

    NODE_LOCAL = "node-local"  # the node's own disk: a cluster of exactly one node
    NFS_FIRST_NODE = "nfs-first-node"  # node 0 of the first group exports its disk over NFS
    MANAGED = "managed"  # the cloud's NFS service: EFS, Filestore, Azure Files (NFS)


class Storage(_Model):
    storage_class: StorageClass
    size_gib: int = Field(ge=1)  # the sum of the workflow's volume sizes


def storage_for(site_cloud: str, nodes: int, size_gib: int, preferred: str | None) -> Storage:
    """The storage a cluster of `nodes` nodes (in all) gets for `size_gib` of volumes: what
    the site asks for (`preferred`, a `StorageClass` value), else the node's own disk for one
    node, else the cloud's managed file system (a cluster off the clouds: the first node's
    NFS share). Raises ValueError, saying why, for a choice that cannot hold the volumes.

    Federation prices the same rule (`federate.storage.storage_class`); a test keeps them
    equal, since federate and infra may not import each other."""
    if nodes < 1:
        raise ValueError(f"a cluster has at least one node, not {nodes}")
    if preferred is None:
        if nodes == 1:
            chosen = StorageClass.NODE_LOCAL
        elif site_cloud in CLOUDS:
            chosen = StorageClass.MANAGED
        else:
            chosen = StorageClass.NFS_FIRST_NODE
    else:
        try:
            chosen = StorageClass(preferred)
        except ValueError:
            known = ", ".join(c.value for c in StorageClass)
            raise ValueError(f"storage {preferred!r} is not one of {known}") from None
    if chosen is StorageClass.NODE_LOCAL and nodes != 1:
        raise ValueError(
            f"node-local storage is for a cluster of one node; this one has {nodes} "
            "(use nfs-first-node or managed)"
        )
    if chosen is StorageClass.MANAGED and site_cloud not in CLOUDS:
        raise ValueError(f"managed storage is made by a cloud's stack; {site_cloud} has none")
    return Storage(storage_class=chosen, size_gib=size_gib)


class Network(_Model):
    subnet_id: str | None = None  # an existing subnet; None: a new VPC/network for the run
    # the run's network: a new VPC's range, or the existing subnet's. The NFS port of the
    # run's volumes is open to this range only, so in an existing subnet give that subnet's.
    cidr: str = "10.42.0.0/16"
    agent_port: int = Field(default=7431, ge=1, le=65535)  # = substrate.AGENT_PORT
    orchestrator_cidr: str  # who may reach the agents: the orchestrator's address

    @field_validator("cidr", "orchestrator_cidr")
    @classmethod
    def _network(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=False)  # raises ValueError with the reason
        return value

    @field_validator("orchestrator_cidr")
    @classmethod
    def _not_everyone(cls, value: str) -> str:
        if ipaddress.ip_network(value, strict=False).prefixlen < 8:
            raise ValueError(
                f"{value} opens the agent port to too much of the internet; give the "
                "orchestrator's own address (a /32) or its network"
            )
        return value


# HOST[:PORT][/PATH]: what goes into the agent's unit as it is
_Registry = Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._/-]+)?$")]


class Bootstrap(_Model):
    """What a node boots with: its agent makes its own key and trades `join_token` for a
    certificate of the run's CA at the `orchestrator`'s join service, whose certificate it
    checks against `ca_certificate` (api/squall/v1/join.proto)."""

    # HOST:PORT of the join service ([ADDRESS]:PORT for IPv6)
    orchestrator: str = Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):\d+$")
    ca_certificate: str = Field(min_length=1)  # PEM of the orchestrator's join CA
    join_token: SecretStr  # never printed: SecretStr hides it in repr and logs
    # registries for unqualified image names, and those the agents reach over plain HTTP
    search_registries: tuple[_Registry, ...] = ()
    insecure_registries: tuple[_Registry, ...] = ()


class ClusterSpec(_Model):
    run_id: str = Field(pattern=r"^[0-9a-f-]{8,64}$")
    owner: str = Field(min_length=1)
    expires_at: datetime
    site: SiteRef
    node_groups: tuple[NodeGroup, ...] = Field(min_length=1)
    network: Network
    bootstrap: Bootstrap
    buckets: tuple[str, ...] = ()  # object-store buckets the nodes may read and write
    storage: Storage | None = None  # None: no volumes, nothing made or mounted
    # the team's NFS share (HOST:/PATH) that keeps persistent volumes, mounted by every node
    # at PERSISTENT_ROOT; it is not the stack's, and outlives it. None: no persistent volumes
    persistent_share: str | None = Field(default=None, pattern=r"^[^\s:]+:/\S*$")

    @model_validator(mode="after")
    def _cluster_rules(self) -> ClusterSpec:
        names = [g.name for g in self.node_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"node group names repeat: {names}")
        for g in self.node_groups:
            cloud = _FABRIC_CLOUD.get(g.fabric.value)
            if cloud is not None and cloud != self.site.cloud:
                raise ValueError(
                    f"{g.name}: {g.fabric.value} is a fabric of {cloud}, not {self.site.cloud}"
                )
        if self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone (UTC)")
        if (
            self.storage is not None
            and self.storage.storage_class is StorageClass.NODE_LOCAL
            and self.nodes != 1
        ):
            raise ValueError(
                f"node-local storage is for a cluster of one node; this one has {self.nodes} "
                "(use nfs-first-node or managed)"
            )
        return self

    @property
    def nodes(self) -> int:
        return sum(g.count for g in self.node_groups)

    def holds_volumes(self, group: NodeGroup, index: int) -> bool:
        """Whether the run's volumes live on this node's own disk: the one node of a
        node-local cluster, or node 0 of the first group that exports them."""
        if self.storage is None or self.storage.storage_class is StorageClass.MANAGED:
            return False
        return group.name == self.node_groups[0].name and index == 0

    def disk_gib(self, group: NodeGroup, index: int) -> int:
        """The node's root disk: the group's, plus the volumes where they live on it."""
        if self.storage is not None and self.holds_volumes(group, index):
            return group.disk_gib + self.storage.size_gib
        return group.disk_gib

    @property
    def stack_name(self) -> str:
        return f"squall-{self.run_id}"

    @property
    def tags(self) -> dict[str, str]:
        """On every resource: what the ledger and `squall stack gc` find clusters by."""
        return {
            "squall-run": self.run_id,
            "squall-owner": self.owner,
            "squall-expires-at": self.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
