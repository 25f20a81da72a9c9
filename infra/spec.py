"""`ClusterSpec`: everything a cloud program needs to build one run's cluster, and nothing
about workflows. The orchestrator turns a placement into one; the Pulumi programs read it.

The rules that keep a cluster safe and cheap are checked here, once, for every cloud:
- the agent port is opened only to the orchestrator's address, never to the whole internet;
- a fabric fits its cloud (EFA on AWS, InfiniBand on Azure, GPUDirect on GCP);
- compact placement only where it pays: the nodes of one multi-node job (a placement group
  around a single node only narrows the capacity it can be placed in);
- every node group is tagged with the run, its owner and when the cluster expires.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["Bootstrap", "ClusterSpec", "Fabric", "Network", "NodeGroup", "SiteRef"]

_FABRIC_CLOUD = {"efa": "aws", "infiniband": "azure", "gpudirect": "gcp"}


class Fabric(StrEnum):
    NONE = "none"
    EFA = "efa"
    INFINIBAND = "infiniband"
    GPUDIRECT = "gpudirect"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteRef(_Model):
    cloud: Literal["aws", "gcp", "azure"]
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


class Network(_Model):
    subnet_id: str | None = None  # an existing subnet; None: a new VPC/network for the run
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


class Bootstrap(_Model):
    orchestrator: str | None = Field(default=None, pattern=r"^[^:\s]+:\d+$")  # host:port
    ca_certificate: str = ""  # PEM the agents trust for the orchestrator ("" : none given)
    join_token: SecretStr  # never printed: SecretStr hides it in repr and logs


class ClusterSpec(_Model):
    run_id: str = Field(pattern=r"^[0-9a-f-]{8,64}$")
    owner: str = Field(min_length=1)
    expires_at: datetime
    site: SiteRef
    node_groups: tuple[NodeGroup, ...] = Field(min_length=1)
    network: Network
    bootstrap: Bootstrap
    buckets: tuple[str, ...] = ()  # object-store buckets the nodes may read and write

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
        return self

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
