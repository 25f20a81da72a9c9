"""From a placement to a `ClusterSpec`: one node group per job, sized and typed as federation
priced it, with the fabric and every EFA interface its instance type has."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from federate.catalog import InstanceType
from federate.placement import SiteEstimate
from federate.workload import Workload
from infra.spec import (
    Bootstrap,
    ClusterSpec,
    Fabric,
    Network,
    NodeGroup,
    SiteRef,
    storage_for,
)

from ..errors import InvalidInput

__all__ = ["cluster_spec"]

DEFAULT_TTL = timedelta(hours=24)  # past this, `squall stack gc` destroys the cluster anyway


def _fabric(t: InstanceType) -> tuple[Fabric, int]:
    if t.fabric == "efa":
        return Fabric.EFA, max(t.efa_interfaces, 1)
    if t.fabric == "infiniband":
        return Fabric.INFINIBAND, 0
    if t.fabric.startswith("gpudirect"):
        return Fabric.GPUDIRECT, 0
    return Fabric.NONE, 0


def _group_name(job: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", job.lower()).strip("-") or "group"
    if not base[0].isalpha():
        base = "g-" + base
    name, n = base[:28], 2
    while name in taken:
        name, n = f"{base[:26]}-{n}", n + 1
    taken.add(name)
    return name


def cluster_spec(
    run_id: str,
    owner: str,
    workload: Workload,
    estimate: SiteEstimate,
    *,
    image: str,
    network: Network,
    bootstrap: Bootstrap,
    ttl: timedelta = DEFAULT_TTL,
    now: datetime | None = None,
    buckets: tuple[str, ...] = (),
) -> ClusterSpec:
    site = estimate.site
    if site.kind != "cloud":
        raise InvalidInput(f"{site.name} is not a cloud region: it needs no stack")
    if not estimate.feasible:
        raise InvalidInput(f"{site.name} is not feasible: {'; '.join(estimate.reasons)}")
    types = {t.name: t for t in site.types}
    multinode = {j.name for j in workload.jobs if j.multinode}
    groups: list[NodeGroup] = []
    taken: set[str] = set()
    for plan in estimate.jobs:
        kind = types[plan.instance]
        fabric, efa = _fabric(kind)
        groups.append(
            NodeGroup(
                name=_group_name(plan.job, taken),
                instance_type=plan.instance,
                count=plan.nodes,
                spot=plan.spot,
                image=image,
                fabric=fabric,
                efa_interfaces=efa,
                compact=plan.job in multinode and plan.nodes > 1,
                gpus=int(kind.gpu_count),
                gpu_model=kind.gpu_model,
            )
        )
    storage = None
    if workload.storage_gib > 0:  # the cluster's volumes: where federation priced them
        nodes = sum(g.count for g in groups)
        storage = storage_for(site.cloud, nodes, workload.storage_gib, estimate.storage or None)
    # persistent volumes are kept on the region's share (the sites file's `persistent:`),
    # which federation required of a site for a workflow with some; a run reaches it from
    # the subnet named with it, if one was
    share = site.persistent_share if "persistent volumes" in workload.features else None
    if share is not None and site.persistent_subnet is not None:
        subnet_id, cidr = site.persistent_subnet
        network = Network.model_validate(
            {**network.model_dump(), "subnet_id": subnet_id, "cidr": cidr}
        )
    return ClusterSpec(
        run_id=run_id,
        owner=owner,
        expires_at=(now or datetime.now(UTC)) + ttl,
        site=SiteRef(cloud=site.cloud, region=site.region),  # type: ignore[arg-type]
        node_groups=tuple(groups),
        network=network,
        bootstrap=bootstrap,
        buckets=buckets,
        storage=storage,
        persistent_share=share,
    )
