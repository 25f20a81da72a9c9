"""The run's volumes on every cloud, under Pulumi's mocks (no cloud account, no `pulumi` CLI
here): the storage rules of the spec, node-local and nfs-first-node storage on each cloud,
and a cluster without volumes, which gets nothing. The managed file systems are asserted in
each cloud's own test file."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pydantic import ValidationError

from infra.bootstrap import NFS_SERVER_OPTIONS, NfsExport, NfsMount, startup_script
from infra.spec import VOLUME_ROOT, Storage, StorageClass, storage_for

from .mocks import RecordingMocks
from .mocks import run as build
from .scripts import INSTANCES, boot_scripts, groups_of, mounted_source, node_disks
from .specs import REGIONS, by_hand, with_volumes

CLOUDS = ("aws", "gcp", "azure")
INVOKES = {"gcp:compute/getZones:getZones": {"names": ["us-central1-a"]}}
MANAGED = {  # what each cloud's managed storage is made of
    "aws": {"aws:efs/fileSystem:FileSystem", "aws:efs/mountTarget:MountTarget"},
    "gcp": {"gcp:filestore/instance:Instance"},
    "azure": {"azure-native:storage:StorageAccount", "azure-native:storage:FileShare"},
}
DISK_INPUTS = {
    "aws": lambda n: n.inputs["rootBlockDevice"]["volumeSize"],
    "gcp": lambda n: n.inputs["bootDisk"]["initializeParams"]["size"],
    "azure": lambda n: n.inputs["storageProfile"]["osDisk"]["diskSizeGB"],
}


def run(spec) -> RecordingMocks:
    return build(spec, INVOKES)


def private_ip(mocks: RecordingMocks, cloud: str, node: str) -> str:
    """The private address the mock's cloud gave a node."""
    if cloud == "aws":
        return mocks.state(INSTANCES["aws"], node)["privateIp"]
    if cloud == "gcp":
        return mocks.state(INSTANCES["gcp"], node)["networkInterfaces"][0]["networkIp"]
    nic = mocks.state("azure-native:network:NetworkInterface", f"{node}-nic")
    return nic["ipConfigurations"][0]["privateIPAddress"]


# ---- the spec's rules ------------------------------------------------------------------------


def test_node_local_storage_is_for_one_node_in_all() -> None:
    with_volumes("aws", StorageClass.NODE_LOCAL, 1)  # one node: fine
    with pytest.raises(ValidationError, match="node-local storage is for a cluster of one node"):
        with_volumes("aws", StorageClass.NODE_LOCAL, 2)
    with pytest.raises(ValidationError, match="this one has 2"):  # one node per group, two groups
        with_volumes("gcp", StorageClass.NODE_LOCAL, 1, 1)
    with pytest.raises(ValueError, match="node-local storage is for a cluster of one node"):
        storage_for("azure", 2, 10, "node-local")
    with pytest.raises(ValidationError):
        Storage(storage_class=StorageClass.MANAGED, size_gib=0)


def test_storage_for_uses_the_nodes_own_disk_for_one_node_and_the_clouds_file_system_else():
    assert storage_for("aws", 1, 30, None) == Storage(
        storage_class=StorageClass.NODE_LOCAL, size_gib=30
    )
    for cloud in CLOUDS:
        assert storage_for(cloud, 4, 30, None).storage_class is StorageClass.MANAGED
        assert storage_for(cloud, 4, 30, "nfs-first-node").storage_class is (
            StorageClass.NFS_FIRST_NODE
        )
        # a site may pay for the managed file system even for one node
        assert storage_for(cloud, 1, 30, "managed").storage_class is StorageClass.MANAGED
    assert storage_for("onprem", 3, 30, None).storage_class is StorageClass.NFS_FIRST_NODE
    with pytest.raises(ValueError, match="'lustre' is not one of node-local, nfs-first-node"):
        storage_for("aws", 2, 30, "lustre")
    with pytest.raises(ValueError, match="managed storage is made by a cloud's stack"):
        storage_for("onprem", 2, 30, "managed")


def test_the_boot_scripts_are_valid_shell() -> None:
    sh = shutil.which("sh")
    assert sh is not None
    spec = with_volumes("aws", StorageClass.NFS_FIRST_NODE)
    group = spec.node_groups[0]
    scripts = [
        startup_script(spec, group, export=NfsExport("10.42.0.0/16")),
        startup_script(spec, group, mount=NfsMount("10.42.0.9:/x", NFS_SERVER_OPTIONS)),
        startup_script(with_volumes("gcp", StorageClass.NODE_LOCAL, 1), group),
        startup_script(by_hand("azure", "eastus", group), group),
    ]
    for script in scripts:
        checked = subprocess.run([sh, "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, checked.stderr


# ---- no volumes, node-local ------------------------------------------------------------------


@pytest.mark.parametrize("cloud", CLOUDS)
def test_no_storage_makes_nothing_and_mounts_nothing(cloud: str) -> None:
    group = with_volumes(cloud, StorageClass.MANAGED).node_groups[0]
    spec = by_hand(cloud, REGIONS[cloud], group)
    mocks = run(spec)
    assert not MANAGED[cloud] & mocks.types()
    if cloud == "aws":  # the nodes' own group only: none for a file system
        assert [g.name for g in mocks.of("aws:ec2/securityGroup:SecurityGroup")] == ["nodes"]
    for script in boot_scripts(mocks, cloud).values():
        assert VOLUME_ROOT not in script
        assert "--volume-root" not in script
        assert "mount" not in script
        assert "exportfs" not in script
    assert node_disks(mocks, cloud) == [40, 40]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_node_local_storage_is_the_nodes_own_disk_made_larger_by_the_volumes(cloud: str) -> None:
    spec = with_volumes(cloud, StorageClass.NODE_LOCAL, 1, size_gib=300)
    mocks = run(spec)
    assert not MANAGED[cloud] & mocks.types()
    [script] = boot_scripts(mocks, cloud).values()
    assert f"install -d -m 0755 {VOLUME_ROOT}" in script
    assert "mount" not in script
    assert "exportfs" not in script
    assert f"--volume-root {VOLUME_ROOT}" in script
    assert script.index(f"install -d -m 0755 {VOLUME_ROOT}") < script.index(
        "systemctl enable --now squall-agent.service"
    )
    [node] = mocks.of(INSTANCES[cloud])
    assert DISK_INPUTS[cloud](node) == 40 + 300


# ---- nfs-first-node --------------------------------------------------------------------------


@pytest.mark.parametrize("cloud", CLOUDS)
def test_nfs_first_node_node_0_exports_to_the_run_and_every_other_node_mounts_its_address(
    cloud: str,
) -> None:
    spec = with_volumes(cloud, StorageClass.NFS_FIRST_NODE, 2, 1, size_gib=200)
    mocks = run(spec)
    assert not MANAGED[cloud] & mocks.types()
    scripts = boot_scripts(mocks, cloud)
    # node 0 of g0 on its own (it keeps the volumes); g1 as a scale set where the cloud's
    # program makes one
    assert sorted(scripts)[:2] == ["g0-0", "g0-1"]
    assert groups_of(scripts) == ["g0", "g0", "g1"]
    [g1] = [name for name in scripts if name.startswith("g1")]

    server = scripts["g0-0"]
    export = f"{VOLUME_ROOT} {spec.network.cidr}(rw,sync,no_subtree_check,no_root_squash)"
    assert export in server  # to the run's network only
    assert server.index("exportfs -ra") < server.index("systemctl enable --now squall-agent")
    assert "systemctl enable --now nfs-server" in server
    assert f"--volume-root {VOLUME_ROOT}" in server
    assert "mount.nfs" not in server  # it serves its own disk: nothing to mount
    [node0] = [n for n in mocks.of(INSTANCES[cloud]) if n.name == "g0-0"]
    assert DISK_INPUTS[cloud](node0) == 40 + 200  # the volumes live on its disk

    address = private_ip(mocks, cloud, "g0-0")
    assert address.startswith("10.42.")
    for name in ("g0-1", g1):  # the rest of its group, and the next group
        source, options = mounted_source(scripts[name])
        assert source == f"{address}:{VOLUME_ROOT}"
        assert options == NFS_SERVER_OPTIONS
        assert "exportfs" not in scripts[name]
    assert sorted(node_disks(mocks, cloud)) == [40, 40, 40 + 200]


def test_the_aws_exporter_has_a_launch_template_of_its_own() -> None:
    mocks = run(with_volumes("aws", StorageClass.NFS_FIRST_NODE, 3))
    templates = {t.name for t in mocks.of("aws:ec2/launchTemplate:LaunchTemplate")}
    assert templates == {"g0-0-template", "g0-template"}
    used = {n.name: n.inputs["launchTemplate"]["id"] for n in mocks.of(INSTANCES["aws"])}
    assert used == {
        "g0-0": "g0-0-template-id",
        "g0-1": "g0-template-id",
        "g0-2": "g0-template-id",
    }


@pytest.mark.parametrize("cloud", CLOUDS)
def test_nothing_opens_the_nfs_port_beyond_the_run(cloud: str) -> None:
    """nfs-first-node adds no rule: the nodes already reach each other, and only the agent
    port is open from outside (to the orchestrator)."""
    groups = with_volumes(cloud, StorageClass.MANAGED).node_groups
    plain = run(by_hand(cloud, REGIONS[cloud], *groups))
    served = run(with_volumes(cloud, StorageClass.NFS_FIRST_NODE))
    rules = {
        "aws": "aws:ec2/securityGroup:SecurityGroup",
        "gcp": "gcp:compute/firewall:Firewall",
        "azure": "azure-native:network:NetworkSecurityGroup",
    }[cloud]
    assert [r.inputs for r in served.of(rules)] == [r.inputs for r in plain.of(rules)]
