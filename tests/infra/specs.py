"""Cluster specs for the program tests: by hand, or from a placement over the test catalog."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federate.catalog import load
from federate.placement import cloud_sites, compare
from federate.policy import Policy
from federate.workload import JobNeeds, Workload
from infra.spec import Bootstrap, ClusterSpec, Network, NodeGroup, SiteRef, Storage, StorageClass
from orchestrator.provision.cluster_spec import cluster_spec

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RUN = "0f8fad5b-d9cb-469f-a165-70867728950e"
ORCHESTRATOR = "203.0.113.7/32"
TOKEN = "join-s3cr3t-8c1f0e"
BOOT = Bootstrap(
    orchestrator="203.0.113.7:7433",
    ca_certificate="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    join_token=TOKEN,
)
REGIONS = {"aws": "us-east-2", "gcp": "us-central1", "azure": "eastus"}
TYPES = {"aws": "c7i.4xlarge", "gcp": "c3-standard-8", "azure": "Standard_D8s_v5"}
IMAGES = {
    "aws": "resolve:ssm:/squall/node-image/x86_64",
    "gcp": "projects/squall-images/global/images/family/squall-node",
    "azure": "Debian:debian-12:12-gen2:latest",
}


def placed(cloud: str, job: JobNeeds, *, spot: bool = False, **network: Any) -> ClusterSpec:
    """The spec Squall makes for `job` at the cheapest region of `cloud` in the test catalog."""
    catalog = load(CATALOG)
    workload = Workload("w", (job,))
    best = compare(
        workload,
        catalog,
        cloud_sites(catalog),
        Policy(allowed_clouds=frozenset({cloud}), spot=spot),
    )[0]
    assert best.feasible, best.reasons
    return cluster_spec(
        RUN,
        "me",
        workload,
        best,
        image=IMAGES[cloud],
        network=Network(orchestrator_cidr=ORCHESTRATOR, **network),
        bootstrap=BOOT,
        now=NOW,
    )


def by_hand(cloud: str, region: str, *groups: NodeGroup, **extra: Any) -> ClusterSpec:
    network = extra.pop("network", None) or Network(orchestrator_cidr=ORCHESTRATOR)
    return ClusterSpec(
        run_id=RUN,
        owner="me",
        expires_at=NOW,
        site=SiteRef(cloud=cloud, region=region),  # type: ignore[arg-type]
        node_groups=groups,
        network=network,
        bootstrap=extra.pop("bootstrap", BOOT),
        **extra,
    )


def with_volumes(
    cloud: str,
    storage_class: StorageClass,
    *counts: int,
    size_gib: int = 50,
    bootstrap: Bootstrap = BOOT,
) -> ClusterSpec:
    """A cluster of node groups of `counts` nodes each (two, of 2 and 1, by default) with
    `size_gib` of volumes held as `storage_class` says."""
    groups = tuple(
        NodeGroup(
            name=f"g{n}", instance_type=TYPES[cloud], count=count, image=IMAGES[cloud], disk_gib=40
        )
        for n, count in enumerate(counts or (2, 1))
    )
    return by_hand(
        cloud,
        REGIONS[cloud],
        *groups,
        storage=Storage(storage_class=storage_class, size_gib=size_gib),
        bootstrap=bootstrap,
    )


def gpu_mpi(nodes: int = 4, model: str = "H100") -> JobNeeds:
    return JobNeeds(
        "train",
        cores=32,
        memory_gib=256,
        gpus=8,
        gpu_model=model,
        nodes=nodes,
        multinode=True,
        runtime_hours=2,
        runtime_source="annotation",
    )


def cpu_job(cores: int = 4) -> JobNeeds:
    return JobNeeds("prep", cores=cores, memory_gib=8, runtime_hours=1, runtime_source="annotation")
