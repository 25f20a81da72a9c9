"""The GCP program under Pulumi's mocks (no GCP project, no `pulumi` CLI here: every resource
goes to tests/infra/mocks.py, which records it and answers as Compute Engine would)."""

from __future__ import annotations

import pytest

from infra.gcp import (
    FILESTORE_OPTIONS,
    accelerator,
    filestore_capacity_gib,
    machine_type,
    tier_1,
)
from infra.spec import NodeGroup, StorageClass

from .mocks import RecordingMocks
from .mocks import run as build_under_mocks
from .scripts import boot_scripts, mig_template, mounted_source, secret
from .specs import ORCHESTRATOR, TOKEN, by_hand, cpu_job, gpu_mpi, placed, with_volumes

INSTANCE = "gcp:compute/instance:Instance"
TEMPLATE = "gcp:compute/instanceTemplate:InstanceTemplate"
MIG = "gcp:compute/instanceGroupManager:InstanceGroupManager"
POLICY = "gcp:compute/resourcePolicy:ResourcePolicy"
FILESTORE = "gcp:filestore/instance:Instance"
ZONES = {"gcp:compute/getZones:getZones": {"names": ["us-east1-b", "us-east1-c"]}}


def run(spec) -> RecordingMocks:
    return build_under_mocks(spec, ZONES)


@pytest.mark.parametrize(("model", "family"), [("H100", "a3-"), ("A100", "a2-")])
def test_an_a3_or_a2_mpi_workflow_gets_accelerators_compact_placement_and_terminate(model, family):
    spec = placed("gcp", gpu_mpi(nodes=2, model=model))
    [group] = spec.node_groups
    assert group.instance_type.startswith(family)
    mocks = run(spec)
    assert mocks.of(INSTANCE) == []  # no resource per node: the group makes them
    [mig] = mocks.of(MIG)
    [policy] = mocks.of(POLICY)
    assert mig.inputs["targetSize"] == 2
    assert policy.inputs["groupPlacementPolicy"] == {"collocation": "COLLOCATED", "vmCount": 2}
    for node in [mig_template(mocks, mig)]:
        [gpu] = node.inputs["guestAccelerators"]
        assert gpu == {"type": accelerator(group), "count": 8}
        assert gpu["type"].startswith("nvidia-")
        assert node.inputs["scheduling"]["onHostMaintenance"] == "TERMINATE"
        assert node.inputs["resourcePolicies"].endswith(policy.name)
        assert node.inputs["networkInterfaces"][0]["nicType"] == "GVNIC"
        assert node.inputs["machineType"] == group.instance_type
        assert node.inputs["networkInterfaces"][0]["accessConfigs"] == [{}]  # a public address


def test_a_single_cpu_node_gets_no_placement_policy_and_migrates_on_maintenance():
    mocks = run(placed("gcp", cpu_job()))
    assert mocks.of(POLICY) == []
    [node] = mocks.of(TEMPLATE)
    assert "guestAccelerators" not in node.inputs
    assert node.inputs["scheduling"]["onHostMaintenance"] == "MIGRATE"
    [mig] = mocks.of(MIG)
    assert mig.inputs["zone"] == "us-east1-b"  # the region's first zone that is UP (invoke)


def test_spot_nodes_are_spot_and_deleted_when_preempted():
    mocks = run(placed("gcp", cpu_job(), spot=True))
    [node] = mocks.of(TEMPLATE)
    scheduling = node.inputs["scheduling"]
    assert scheduling["provisioningModel"] == "SPOT"
    assert scheduling["preemptible"] is True
    assert scheduling["automaticRestart"] is False
    assert scheduling["instanceTerminationAction"] == "DELETE"
    # and its agent watches for the preemption notice, to say it before the node goes
    [script] = boot_scripts(mocks, "gcp").values()
    assert "--interruption-notices gcp" in script
    on_demand = boot_scripts(run(placed("gcp", cpu_job())), "gcp")
    assert all("--interruption-notices" not in s for s in on_demand.values())


def test_firewall_opens_the_agent_port_to_the_orchestrator_only():
    mocks = run(placed("gcp", gpu_mpi(nodes=2)))
    rules = mocks.of("gcp:compute/firewall:Firewall")
    assert len(rules) == 2
    for rule in rules:
        assert "0.0.0.0/0" not in rule.inputs.get("sourceRanges", [])
    [agent] = [r for r in rules if r.inputs.get("sourceRanges")]
    assert agent.inputs["sourceRanges"] == [ORCHESTRATOR]
    assert agent.inputs["allows"] == [{"protocol": "tcp", "ports": ["7431"]}]
    [nodes] = [r for r in rules if r.inputs.get("sourceTags")]
    assert nodes.inputs["sourceTags"] == nodes.inputs["targetTags"]


def test_labels_and_the_startup_script():
    spec = placed("gcp", cpu_job())
    mocks = run(spec)
    [node] = mocks.of(TEMPLATE)
    labels = node.inputs["labels"]
    assert labels["squall-run"] == spec.run_id
    assert labels["squall-expires-at"] == "2026-11-23t12-00-00z"
    script = secret(node.inputs["metadata"])["user-data"]  # cloud-init runs it, once
    assert "agent --listen 0.0.0.0:7431" in script
    assert TOKEN in script
    [provider] = [r for r in mocks.created if r.typ == "pulumi:providers:gcp"]
    assert '"squall-run"' in provider.inputs["defaultLabels"]


def test_tier_1_networking_only_where_the_type_offers_it():
    assert tier_1("n2-standard-32")
    assert tier_1("c3-standard-88-lssd")
    assert not tier_1("n2-standard-16")
    assert not tier_1("e2-standard-32")
    assert machine_type("n1-standard-16+2xT4") == "n1-standard-16"
    group = NodeGroup(
        name="big", instance_type="c3-standard-176", count=1, image="projects/p/global/images/i"
    )
    mocks = run(by_hand("gcp", "us-central1", group))
    [node] = mocks.of(TEMPLATE)
    assert node.inputs["networkPerformanceConfig"] == {"totalEgressBandwidthTier": "TIER_1"}


def test_an_n1_with_attached_t4s_names_the_n1_type_and_the_t4_accelerator():
    group = NodeGroup(
        name="infer",
        instance_type="n1-standard-16+2xT4",
        count=1,
        image="projects/p/global/images/i",
        gpus=2,
        gpu_model="T4",
    )
    mocks = run(by_hand("gcp", "us-central1", group))
    [node] = mocks.of(TEMPLATE)
    assert node.inputs["machineType"] == "n1-standard-16"
    assert node.inputs["guestAccelerators"] == [{"type": "nvidia-tesla-t4", "count": 2}]
    assert node.inputs["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_an_unknown_gpu_model_is_a_clear_error():
    group = NodeGroup(
        name="x", instance_type="n1-standard-8", count=1, image="i", gpus=1, gpu_model="Z9000"
    )
    with pytest.raises(ValueError, match="no GCP accelerator type known for GPU model 'Z9000'"):
        accelerator(group)


def test_managed_storage_is_a_zonal_filestore_on_the_runs_network_that_every_node_mounts():
    spec = with_volumes("gcp", StorageClass.MANAGED, 2, 1, size_gib=1500)
    mocks = run(spec)
    [fs] = mocks.of(FILESTORE)
    assert (fs.inputs["tier"], fs.inputs["protocol"]) == ("ZONAL", "NFS_V4_1")
    assert fs.inputs["location"] == "us-east1-b"  # the nodes' zone
    assert {n.inputs["zone"] for n in mocks.of(MIG)} == {"us-east1-b"}
    [share] = [fs.inputs["fileShares"]]
    assert share["capacityGb"] == 1536  # 1,500 GiB, up to Zonal's 256 GiB steps
    # exported read-write to the run's network only, root as root (the agents write as root)
    assert share["nfsExportOptions"] == [
        {
            "ipRanges": [spec.network.cidr],
            "accessMode": "READ_WRITE",
            "squashMode": "NO_ROOT_SQUASH",
        }
    ]
    [net] = fs.inputs["networks"]
    assert net["network"] == "network-id"  # the run's own network, by name
    assert net["connectMode"] == "DIRECT_PEERING"
    assert fs.inputs["labels"]["squall-run"] == spec.run_id
    assert fs.inputs["deletionProtectionEnabled"] is False  # destroyed with the stack
    # no firewall rule for it: NFSv4.1 traffic is started by the nodes (egress is open)
    assert len(mocks.of("gcp:compute/firewall:Firewall")) == 2
    address = mocks.state(FILESTORE, "volumes")["networks"][0]["ipAddresses"][0]
    scripts = boot_scripts(mocks, "gcp")
    assert sorted(scripts) == ["g0-nodes", "g1-nodes"]  # a managed instance group a group
    for script in scripts.values():
        assert mounted_source(script) == (f"{address}:/volumes", FILESTORE_OPTIONS)


def test_filestore_capacity_honours_the_zonal_minimum_and_steps():
    assert filestore_capacity_gib(1) == 1024  # the minimum is billed, however little is used
    assert filestore_capacity_gib(1024) == 1024
    assert filestore_capacity_gib(1025) == 1280
    assert filestore_capacity_gib(9984) == 9984  # 9.75 TiB: the top of the lower range
    assert filestore_capacity_gib(9985) == 10240  # then 10 TiB, in steps of 2.5 TiB
    assert filestore_capacity_gib(12000) == 12800
    assert filestore_capacity_gib(102400) == 102400
    with pytest.raises(ValueError, match="more than a Filestore Zonal instance holds"):
        filestore_capacity_gib(102401)


def test_a_group_is_one_managed_instance_group_that_never_repairs_behind_the_run():
    group = NodeGroup(
        name="work", instance_type="c3-standard-8", count=3, image="projects/p/global/images/i"
    )
    mocks = run(by_hand("gcp", "us-central1", group))
    assert mocks.of(INSTANCE) == []
    [mig] = mocks.of(MIG)
    [template] = mocks.of(TEMPLATE)
    assert mig_template(mocks, mig) is template  # the template as it is now, by unique link
    assert mig.inputs["targetSize"] == 3
    # a VM that fails or is preempted is not made again: a new one could not join the run
    assert mig.inputs["instanceLifecyclePolicy"] == {"defaultActionOnFailure": "DO_NOTHING"}
    assert mig.inputs["updatePolicy"]["type"] == "OPPORTUNISTIC"
    assert (mig.inputs["waitForInstances"], mig.inputs["waitForInstancesStatus"]) == (
        True,
        "STABLE",
    )
    [disk] = template.inputs["disks"]
    assert (disk["boot"], disk["autoDelete"], disk["diskSizeGb"]) == (True, True, group.disk_gib)
    assert disk["sourceImage"] == "projects/p/global/images/i"
    assert template.inputs["networkInterfaces"][0]["accessConfigs"] == [{}]  # a public address


def test_a_group_whose_node_0_keeps_the_volumes_is_made_instance_by_instance():
    mocks = run(with_volumes("gcp", StorageClass.NFS_FIRST_NODE, 2))
    assert [n.name for n in mocks.of(INSTANCE)] == ["g0-0", "g0-1"]
    scripts = boot_scripts(mocks, "gcp")
    assert "--join-index 0" in scripts["g0-0"]  # it joins as node 0, whenever it boots
    assert "--join-index" not in scripts["g0-1"]
