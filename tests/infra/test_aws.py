"""The AWS program under Pulumi's mocks (no AWS account, no `pulumi` CLI here: every resource
goes to tests/infra/mocks.py, which records it and answers as EC2 would)."""

from __future__ import annotations

import base64
import json

import pytest

from federate.catalog import load
from infra.aws import EFS_OPTIONS
from infra.spec import Fabric, Network, NodeGroup, Storage, StorageClass

from .mocks import run
from .scripts import boot_scripts, mounted_source
from .specs import CATALOG, ORCHESTRATOR, TOKEN, by_hand, cpu_job, gpu_mpi, placed, with_volumes

INSTANCE = "aws:ec2/instance:Instance"
TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
PLACEMENT = "aws:ec2/placementGroup:PlacementGroup"
FLEET = "aws:ec2/fleet:Fleet"
# resources EC2/IAM cannot tag
SECRET_SIG, SECRET_VALUE = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"
UNTAGGABLE = {
    "aws:ec2/routeTableAssociation:RouteTableAssociation",
    "aws:iam/rolePolicy:RolePolicy",
    "aws:efs/mountTarget:MountTarget",
}


def test_a_four_node_gpu_mpi_job_gets_efa_on_every_card_in_one_cluster_placement_group():
    spec = placed("aws", gpu_mpi(nodes=4))
    [group] = spec.node_groups
    kind = {(t.region, t.name): t for t in load(CATALOG).instances}[
        (spec.site.region, group.instance_type)
    ]
    mocks = run(spec)

    nodes = mocks.of(INSTANCE)
    [pg] = mocks.of(PLACEMENT)
    [template] = mocks.of(TEMPLATE)
    assert len(nodes) == 4
    assert pg.inputs["strategy"] == "cluster"
    assert len({n.inputs["placementGroup"] for n in nodes}) == 1
    assert nodes[0].inputs["placementGroup"].startswith(pg.name)
    assert template.inputs["placement"]["groupName"] == nodes[0].inputs["placementGroup"]
    assert template.inputs["instanceType"] == group.instance_type

    nics = template.inputs["networkInterfaces"]
    efa = [n for n in nics if n.get("interfaceType") == "efa-only"]
    assert kind.efa_interfaces > 1
    assert len(efa) == kind.efa_interfaces
    assert sorted(int(n["networkCardIndex"]) for n in efa) == list(range(kind.efa_interfaces))
    slots = [(int(n["networkCardIndex"]), int(n["deviceIndex"])) for n in nics]
    assert len(set(slots)) == len(slots), "two interfaces on one card and device index"
    primary = nics[0]
    assert (int(primary["networkCardIndex"]), int(primary["deviceIndex"])) == (0, 0)
    assert "interfaceType" not in primary  # ENA: an EFA-only interface cannot be primary

    # several interfaces: EC2 gives no public IP at launch, so each node gets an Elastic IP
    eips = mocks.of("aws:ec2/eip:Eip")
    assert len(eips) == 4
    assert all(e.inputs["domain"] == "vpc" for e in eips)


def test_one_cpu_node_gets_no_placement_group_and_a_public_ip_on_its_one_interface():
    mocks = run(placed("aws", cpu_job()))
    assert mocks.of(PLACEMENT) == []
    [template] = mocks.of(TEMPLATE)
    assert "groupName" not in template.inputs.get("placement", {})
    [nic] = template.inputs["networkInterfaces"]
    assert nic["associatePublicIpAddress"] == "true"
    assert "interfaceType" not in nic
    assert "instanceMarketOptions" not in template.inputs
    assert mocks.of("aws:ec2/eip:Eip") == []
    assert mocks.of(INSTANCE) == []  # the fleet makes it
    [fleet] = mocks.of(FLEET)
    assert fleet.inputs["targetCapacitySpecification"] == {
        "defaultTargetCapacityType": "on-demand",
        "totalTargetCapacity": 1,
    }


def test_a_group_is_one_instant_fleet_all_or_nothing_with_its_disk_in_the_template():
    group = NodeGroup(name="work", instance_type="c7i.4xlarge", count=3, image="ami-0123")
    spec = by_hand("aws", "us-east-2", group)
    mocks = run(spec)
    # one resource for the three nodes, none per node: they join the run
    assert mocks.of(INSTANCE) == []
    assert mocks.of("aws:ec2/eip:Eip") == []
    [fleet] = mocks.of(FLEET)
    [template] = mocks.of(TEMPLATE)
    assert fleet.inputs["type"] == "instant"  # launched once, never replaced
    assert fleet.inputs["terminateInstances"] is True  # its destroy takes the instances
    assert fleet.inputs["onDemandOptions"] == {
        "allocationStrategy": "lowest-price",
        "singleInstanceType": True,
        "singleAvailabilityZone": True,
        "minTargetCapacity": 3,  # all three, or none
    }
    [config] = fleet.inputs["launchTemplateConfigs"]
    assert config["launchTemplateSpecification"]["launchTemplateId"] == f"{template.name}-id"
    assert config["overrides"] == [{"instanceType": "c7i.4xlarge", "subnetId": "subnet-id"}]
    # the subnet is the fleet's to name, and the zone the subnet's
    [nic] = template.inputs["networkInterfaces"]
    assert "subnetId" not in nic
    assert "availabilityZone" not in template.inputs.get("placement", {})
    # the root disk, on the AMI's own root device
    assert template.inputs["blockDeviceMappings"] == [
        {
            "deviceName": "/dev/xvda",
            "ebs": {
                "volumeSize": group.disk_gib,
                "volumeType": "gp3",
                "deleteOnTermination": "true",
            },
        }
    ]
    assert fleet.inputs["tags"]["squall-run"] == spec.run_id


def test_spot_is_the_fleets_one_time_capacity_that_terminates():
    spec = placed("aws", cpu_job(), spot=True)
    assert spec.node_groups[0].spot
    mocks = run(spec)
    [template] = mocks.of(TEMPLATE)
    assert "instanceMarketOptions" not in template.inputs  # the fleet asks for spot
    [fleet] = mocks.of(FLEET)
    assert fleet.inputs["targetCapacitySpecification"]["defaultTargetCapacityType"] == "spot"
    assert fleet.inputs["spotOptions"]["instanceInterruptionBehavior"] == "terminate"
    assert fleet.inputs["spotOptions"]["minTargetCapacity"] == 1
    assert "onDemandOptions" not in fleet.inputs


def test_a_group_made_node_by_node_asks_for_one_time_spot_that_terminates():
    spec = with_volumes("aws", StorageClass.NFS_FIRST_NODE, 2)  # g0's node 0 keeps them
    group = spec.node_groups[0].model_copy(update={"spot": True})
    mocks = run(spec.model_copy(update={"node_groups": (group, *spec.node_groups[1:])}))
    assert [n.name for n in mocks.of(INSTANCE)] == ["g0-0", "g0-1"]
    scripts = boot_scripts(mocks, "aws")
    assert "--join-index 0" in scripts["g0-0"]  # it joins as node 0, whenever it boots
    assert "--join-index" not in scripts["g0-1"]
    for template in mocks.of(TEMPLATE):
        if template.name.startswith("g0"):
            market = template.inputs["instanceMarketOptions"]
            assert market["marketType"] == "spot"
            assert market["spotOptions"] == {
                "spotInstanceType": "one-time",
                "instanceInterruptionBehavior": "terminate",
            }


def test_the_agent_port_is_open_to_the_orchestrator_only_and_nodes_to_each_other():
    mocks = run(placed("aws", gpu_mpi(nodes=2)))
    [sg] = mocks.of("aws:ec2/securityGroup:SecurityGroup")
    ingress = sg.inputs["ingress"]
    assert all("0.0.0.0/0" not in r.get("cidrBlocks", []) for r in ingress)
    assert all("::/0" not in r.get("ipv6CidrBlocks", []) for r in ingress)
    [agent] = [r for r in ingress if r.get("cidrBlocks")]
    assert (agent["protocol"], agent["fromPort"], agent["toPort"]) == ("tcp", 7431, 7431)
    assert agent["cidrBlocks"] == [ORCHESTRATOR]
    [peers] = [r for r in ingress if r.get("self")]
    assert peers["protocol"] == "-1"
    assert any(r.get("self") and r["protocol"] == "-1" for r in sg.inputs["egress"])  # EFA


def test_every_resource_carries_the_run_owner_and_expiry_tags():
    spec = placed("aws", gpu_mpi(nodes=2))
    spec = spec.model_copy(
        update={
            "buckets": ("results-bucket",),
            "storage": Storage(storage_class=StorageClass.MANAGED, size_gib=10),
        }
    )
    mocks = run(spec)
    resources = [r for r in mocks.created if not r.typ.startswith("pulumi:providers:")]
    assert "aws:efs/fileSystem:FileSystem" in mocks.types()
    assert len(resources) >= 13
    for r in resources:
        if r.typ in UNTAGGABLE:
            continue
        tags = r.inputs.get("tags", {})
        assert tags.get("squall-run") == spec.run_id, r.typ
        assert tags.get("squall-expires-at") == "2026-11-23T12:00:00Z", r.typ
        assert tags.get("squall-owner") == "me", r.typ
    [provider] = [r for r in mocks.created if r.typ == "pulumi:providers:aws"]
    assert json.loads(provider.inputs["defaultTags"])["tags"] == spec.tags
    [template] = mocks.of(TEMPLATE)
    made = {t["resourceType"]: t["tags"] for t in template.inputs["tagSpecifications"]}
    assert {"instance", "volume", "network-interface"} <= set(made)
    assert all(t["squall-run"] == spec.run_id for t in made.values())


def test_the_instance_profile_reaches_the_runs_buckets_and_nothing_else():
    spec = placed("aws", cpu_job()).model_copy(update={"buckets": ("in-data", "out-data")})
    mocks = run(spec)
    [policy] = mocks.of("aws:iam/rolePolicy:RolePolicy")
    statements = json.loads(policy.inputs["policy"])["Statement"]
    resources = {res for s in statements for res in s["Resource"]}
    assert resources == {
        "arn:aws:s3:::in-data",
        "arn:aws:s3:::out-data",
        "arn:aws:s3:::in-data/*",
        "arn:aws:s3:::out-data/*",
    }
    assert all(s["Effect"] == "Allow" and "*" not in s["Action"] for s in statements)
    [template] = mocks.of(TEMPLATE)
    assert template.inputs["iamInstanceProfile"]["arn"].startswith("arn:")
    # no buckets: no role at all
    mocks = run(placed("aws", cpu_job()))
    assert mocks.of("aws:iam/role:Role") == []


def test_the_boot_script_starts_the_agent_with_the_join_token_and_is_a_secret():
    mocks = run(placed("aws", cpu_job()))
    [template] = mocks.of(TEMPLATE)
    wire = template.inputs["userData"]
    assert wire[SECRET_SIG] == SECRET_VALUE, "the boot script (with the token) is not a secret"
    script = base64.b64decode(wire["value"]).decode()
    assert script.startswith("#!/bin/sh")
    assert "agent --listen 0.0.0.0:7431" in script
    assert f"--deny-network {ORCHESTRATOR}" in script  # jobs never reach the orchestrator
    assert "--host-network auto" in script  # multi-node jobs on the node's own network
    assert TOKEN in script
    assert template.inputs["metadataOptions"]["httpTokens"] == "required"


def test_an_existing_subnet_makes_no_network_and_gives_nodes_no_public_address():
    group = NodeGroup(name="work", instance_type="c7i.4xlarge", count=2, image="ami-0123")
    network = Network(subnet_id="subnet-0abc", orchestrator_cidr="10.0.0.5/32")
    spec = by_hand("aws", "us-east-2", group, network=network)
    mocks = run(spec, {"aws:ec2/getSubnet:getSubnet": {"vpcId": "vpc-0existing"}})
    assert mocks.of("aws:ec2/vpc:Vpc") == []
    assert mocks.of("aws:ec2/subnet:Subnet") == []
    [sg] = mocks.of("aws:ec2/securityGroup:SecurityGroup")
    assert sg.inputs["vpcId"] == "vpc-0existing"
    [template] = mocks.of(TEMPLATE)
    [nic] = template.inputs["networkInterfaces"]
    assert "associatePublicIpAddress" not in nic
    [fleet] = mocks.of(FLEET)
    assert fleet.inputs["launchTemplateConfigs"][0]["overrides"][0]["subnetId"] == "subnet-0abc"


@pytest.mark.parametrize("fabric", [Fabric.EFA])
def test_a_compact_group_of_one_is_refused_by_the_spec(fabric):
    with pytest.raises(ValueError, match="compact placement"):
        NodeGroup(
            name="g",
            instance_type="p5.48xlarge",
            count=1,
            image="ami-1",
            fabric=fabric,
            efa_interfaces=32,
            compact=True,
        )


def test_managed_storage_is_an_encrypted_efs_in_the_runs_subnet_that_every_node_mounts():
    spec = with_volumes("aws", StorageClass.MANAGED, 2, 1, size_gib=120)
    mocks = run(spec)
    [fs] = mocks.of("aws:efs/fileSystem:FileSystem")
    assert fs.inputs["encrypted"] is True
    assert fs.inputs["throughputMode"] == "elastic"
    assert fs.inputs["tags"]["squall-run"] == spec.run_id
    assert fs.inputs["tags"]["squall-expires-at"] == "2026-11-22T12:00:00Z"
    [target] = mocks.of("aws:efs/mountTarget:MountTarget")
    assert target.inputs["fileSystemId"] == "volumes-id"
    assert target.inputs["subnetId"] == "subnet-id"  # the run's own subnet
    # NFS reaches the file system from the run's network only, and nothing else does
    [guard] = [g for g in mocks.of("aws:ec2/securityGroup:SecurityGroup") if g.name == "volumes"]
    assert target.inputs["securityGroups"] == ["volumes-id"]
    assert guard.inputs["vpcId"] == "vpc-id"
    assert guard.inputs["ingress"] == [
        {
            "protocol": "tcp",
            "fromPort": 2049,
            "toPort": 2049,
            "cidrBlocks": [spec.network.cidr],
            "description": "NFS from the run's nodes",
        }
    ]
    assert guard.inputs["tags"]["squall-run"] == spec.run_id
    # every node mounts it, by the mount target's address, before its agent starts
    address = mocks.state("aws:efs/mountTarget:MountTarget", "volumes")["ipAddress"]
    scripts = boot_scripts(mocks, "aws")
    assert sorted(scripts) == ["g0-nodes", "g1-nodes"]  # a fleet a group
    for script in scripts.values():
        assert mounted_source(script) == (f"{address}:/", EFS_OPTIONS)
    assert EFS_OPTIONS == (
        "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
    )
    assert {t.name for t in mocks.of(TEMPLATE)} == {"g0-template", "g1-template"}
