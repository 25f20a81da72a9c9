"""ClusterSpec: its safety rules, and how a placement becomes one (no cloud is touched: the
spec is data; the Pulumi programs that read it come with the rest of the infra issue)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from federate.catalog import load
from federate.placement import cloud_sites, compare
from federate.policy import Policy
from federate.workload import JobNeeds, Workload
from infra.spec import Bootstrap, ClusterSpec, Fabric, Network, NodeGroup, SiteRef
from orchestrator.provision.cluster_spec import cluster_spec

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
NETWORK = Network(orchestrator_cidr="203.0.113.7/32")
BOOT = Bootstrap(
    orchestrator="203.0.113.7:7433",
    ca_certificate="-----BEGIN CERTIFICATE-----",
    join_token="s3cr3t-join",
)
RUN = "0f8fad5b-d9cb-469f-a165-70867728950e"


AWS_ONLY = Policy(allowed_clouds=frozenset({"aws"}))


def spec_for(job: JobNeeds, policy: Policy = AWS_ONLY) -> ClusterSpec:
    catalog = load(CATALOG)
    workload = Workload("w", (job,))
    best = compare(workload, catalog, cloud_sites(catalog), policy)[0]
    return cluster_spec(
        RUN, "me", workload, best, image="oci://node:1", network=NETWORK, bootstrap=BOOT, now=NOW
    )


def test_a_four_node_gpu_mpi_job_gets_efa_with_every_interface_in_one_placement_group() -> None:
    spec = spec_for(
        JobNeeds(
            "train",
            cores=32,
            memory_gib=256,
            gpus=8,
            gpu_model="H100",
            nodes=4,
            multinode=True,
            runtime_hours=2,
            runtime_source="annotation",
        )
    )
    [group] = spec.node_groups
    catalog = {(t.region, t.name): t for t in load(CATALOG).instances}
    chosen = catalog[(spec.site.region, group.instance_type)]
    assert (group.count, group.fabric, group.compact) == (4, Fabric.EFA, True)
    assert group.efa_interfaces == chosen.efa_interfaces > 1
    assert spec.stack_name == f"squall-{RUN}"
    assert spec.tags == {
        "squall-run": RUN,
        "squall-owner": "me",
        "squall-expires-at": "2026-11-23T12:00:00Z",
    }


def test_a_one_node_cpu_job_gets_no_placement_group_and_spot_sets_spot() -> None:
    job = JobNeeds("crunch", cores=4, memory_gib=8, runtime_hours=1, runtime_source="annotation")
    [group] = spec_for(job).node_groups
    assert (group.count, group.compact, group.spot) == (1, False, False)
    [spot] = spec_for(job, Policy(allowed_clouds=frozenset({"aws"}), spot=True)).node_groups
    assert spot.spot


def test_the_agent_port_is_never_open_to_the_internet() -> None:
    for cidr in ("0.0.0.0/0", "0.0.0.0/1", "::/0"):
        with pytest.raises(ValidationError, match="too much of the internet"):
            Network(orchestrator_cidr=cidr)
    with pytest.raises(ValidationError):
        Network(orchestrator_cidr="not-an-address")


def test_fabrics_belong_to_their_clouds_and_compact_placement_is_for_gangs() -> None:
    efa = NodeGroup(
        name="mpi",
        instance_type="hpc7a.96xlarge",
        count=4,
        image="i",
        fabric=Fabric.EFA,
        efa_interfaces=2,
        compact=True,
    )
    with pytest.raises(ValidationError, match="efa is a fabric of aws, not azure"):
        ClusterSpec(
            run_id=RUN,
            owner="me",
            expires_at=NOW,
            site=SiteRef(cloud="azure", region="eastus"),
            node_groups=(efa,),
            network=NETWORK,
            bootstrap=BOOT,
        )
    with pytest.raises(ValidationError, match="compact placement is for 2 or more nodes"):
        NodeGroup(name="one", instance_type="c8in.12xlarge", count=1, image="i", compact=True)
    with pytest.raises(ValidationError, match="needs efa_interfaces"):
        NodeGroup(name="e", instance_type="p5.48xlarge", count=2, image="i", fabric=Fabric.EFA)


def test_the_join_token_never_shows() -> None:
    spec = spec_for(
        JobNeeds("crunch", cores=4, memory_gib=8, runtime_hours=1, runtime_source="annotation")
    )
    assert "s3cr3t-join" not in repr(spec)
    assert "s3cr3t-join" not in spec.model_dump_json()
    assert spec.bootstrap.join_token.get_secret_value() == "s3cr3t-join"
