"""The Azure program under Pulumi's mocks (no subscription, no `pulumi` CLI here: every resource
goes to tests/infra/mocks.py, which records it and answers as ARM would)."""

from __future__ import annotations

import base64

import pytest

from infra.azure import (
    AZURE_FILES_OPTIONS,
    MIN_SHARE_GIB,
    accelerated_networking,
    image_reference,
    storage_account_name,
)
from infra.spec import Storage, StorageClass

from .mocks import run
from .scripts import boot_scripts, mounted_source, secret
from .specs import ORCHESTRATOR, TOKEN, cpu_job, placed, with_volumes

VM = "azure-native:compute:VirtualMachine"
VMSS = "azure-native:compute:VirtualMachineScaleSet"
PPG = "azure-native:compute:ProximityPlacementGroup"
AVSET = "azure-native:compute:AvailabilitySet"
ACCOUNT = "azure-native:storage:StorageAccount"
UNTAGGABLE = {"azure-native:network:Subnet", "azure-native:storage:FileShare"}


def hpc_mpi(nodes: int = 4):
    from federate.workload import JobNeeds

    return JobNeeds(
        "cfd",
        cores=96,
        memory_gib=300,
        nodes=nodes,
        multinode=True,
        runtime_hours=3,
        runtime_source="annotation",
    )


def test_an_hb_series_workflow_is_one_scale_set_on_one_infiniband_fabric_without_nics_per_node():
    spec = placed("azure", hpc_mpi(nodes=4))
    [group] = spec.node_groups
    assert group.instance_type.startswith(("Standard_HB", "Standard_HX", "Standard_HC"))
    assert group.fabric.value == "infiniband"
    mocks = run(spec)
    [pool] = mocks.of(VMSS)
    [ppg] = mocks.of(PPG)
    # one resource for the four VMs: no VM, NIC or public address resource per node
    assert mocks.of(VM) == []
    assert mocks.of("azure-native:network:NetworkInterface") == []
    assert mocks.of("azure-native:network:PublicIPAddress") == []
    assert mocks.of(AVSET) == []
    assert pool.inputs["sku"] == {"name": group.instance_type, "tier": "Standard", "capacity": 4}
    # exactly four VMs, ever (an overprovisioned one would join the run), on one fabric
    assert pool.inputs["overprovision"] is False
    assert pool.inputs["singlePlacementGroup"] is True
    assert pool.inputs["orchestrationMode"] == "Uniform"
    assert pool.inputs["upgradePolicy"] == {"mode": "Manual"}
    assert pool.inputs["proximityPlacementGroup"]["id"].endswith(ppg.name)
    assert ppg.inputs["intent"] == {"vmSizes": [group.instance_type]}
    profile = secret(pool.inputs["virtualMachineProfile"])  # it holds the boot script
    [nic] = profile["networkProfile"]["networkInterfaceConfigurations"]
    assert nic["enableAcceleratedNetworking"] is True
    [ip] = nic["ipConfigurations"]
    assert ip["publicIPAddressConfiguration"]["sku"] == {"name": "Standard"}  # its own, per VM
    assert profile["storageProfile"]["osDisk"]["diskSizeGB"] == group.disk_gib


def test_a_group_whose_node_0_keeps_the_volumes_is_made_vm_by_vm_on_one_fabric():
    spec = placed("azure", hpc_mpi(nodes=2)).model_copy(
        update={"storage": Storage(storage_class=StorageClass.NFS_FIRST_NODE, size_gib=10)}
    )
    mocks = run(spec)
    assert mocks.of(VMSS) == []
    vms = mocks.of(VM)
    [ppg] = mocks.of(PPG)
    [avset] = mocks.of(AVSET)
    assert len(vms) == 2
    # one availability set: what puts Azure VMs made one by one on one InfiniBand fabric
    assert {vm.inputs["availabilitySet"]["id"] for vm in vms} == {
        f"/subscriptions/mock/resourceGroups/rg/providers/{AVSET}/{avset.name}"
    }
    assert avset.inputs["proximityPlacementGroup"]["id"].endswith(ppg.name)
    scripts = boot_scripts(mocks, "azure")
    assert "--join-index 0" in scripts["cfd-0"]  # it joins as node 0, whenever it boots
    assert "--join-index" not in scripts["cfd-1"]


def test_an_infiniband_group_over_100_nodes_is_made_vm_by_vm_in_one_availability_set():
    """A single-placement-group scale set (one fabric) holds 100 VMs at most."""
    spec = placed("azure", hpc_mpi(nodes=2))
    [group] = spec.node_groups
    big = spec.model_copy(update={"node_groups": (group.model_copy(update={"count": 101}),)})
    mocks = run(big)
    assert mocks.of(VMSS) == []
    assert len(mocks.of(VM)) == 101
    [_avset] = mocks.of(AVSET)
    at_limit = spec.model_copy(update={"node_groups": (group.model_copy(update={"count": 100}),)})
    [pool] = run(at_limit).of(VMSS)
    assert pool.inputs["sku"]["capacity"] == 100


def test_one_node_gets_no_proximity_group_and_spot_is_evicted_by_deletion():
    mocks = run(placed("azure", cpu_job(), spot=True))
    assert mocks.of(PPG) == []
    assert mocks.of(AVSET) == []
    [pool] = mocks.of(VMSS)
    assert pool.inputs["sku"]["capacity"] == 1
    profile = secret(pool.inputs["virtualMachineProfile"])
    assert (profile["priority"], profile["evictionPolicy"]) == ("Spot", "Delete")
    assert profile["billingProfile"] == {"maxPrice": -1}


def test_the_nsg_admits_the_agent_port_from_the_orchestrator_only():
    mocks = run(placed("azure", hpc_mpi(nodes=2)))
    [nsg] = mocks.of("azure-native:network:NetworkSecurityGroup")
    [rule] = nsg.inputs["securityRules"]
    assert rule["sourceAddressPrefix"] == ORCHESTRATOR
    assert (rule["destinationPortRange"], rule["direction"], rule["access"]) == (
        "7431",
        "Inbound",
        "Allow",
    )
    [pool] = mocks.of(VMSS)
    [nic] = secret(pool.inputs["virtualMachineProfile"])["networkProfile"][
        "networkInterfaceConfigurations"
    ]
    assert nic["networkSecurityGroup"]["id"].endswith(nsg.name)


def test_custom_data_tags_and_no_password():
    spec = placed("azure", cpu_job()).model_copy(
        update={"storage": Storage(storage_class=StorageClass.MANAGED, size_gib=10)}
    )
    mocks = run(spec)
    assert ACCOUNT in mocks.types()
    [pool] = mocks.of(VMSS)
    # a secret on the wire, as the custom data in it is
    profile = secret(pool.inputs["virtualMachineProfile"])["osProfile"]
    script = base64.b64decode(profile["customData"]).decode()
    assert "agent --listen 0.0.0.0:7431" in script
    assert TOKEN in script
    linux = profile["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert "adminPassword" not in profile
    assert linux["ssh"]["publicKeys"][0]["keyData"].startswith("ssh-ed25519 ")
    for r in mocks.created:
        if r.typ in UNTAGGABLE or r.typ.startswith("pulumi:providers:"):
            continue  # a subnet and a file share take no tags
        assert r.inputs["tags"]["squall-run"] == spec.run_id, r.typ
        assert r.inputs["tags"]["squall-expires-at"] == "2026-11-23T12:00:00Z", r.typ


def test_image_references_and_accelerated_networking():
    assert image_reference("Debian:debian-12:12-gen2:latest").publisher == "Debian"
    assert image_reference("/subscriptions/s/resourceGroups/g/providers/x/images/i").id
    with pytest.raises(ValueError, match="publisher:offer:sku:version"):
        image_reference("debian-12")
    assert accelerated_networking("Standard_HB176rs_v4")
    assert not accelerated_networking("Standard_B2s")


def test_managed_storage_is_an_nfs_share_only_the_runs_subnet_reaches_that_every_node_mounts():
    spec = with_volumes("azure", StorageClass.MANAGED, 2, 1, size_gib=40)
    mocks = run(spec)
    [account] = mocks.of(ACCOUNT)
    assert account.inputs["accountName"] == storage_account_name(spec.run_id)
    assert account.inputs["accountName"] == "squall0f8fad5bd9cb469fa1"
    assert account.inputs["kind"] == "FileStorage"
    assert account.inputs["sku"] == {"name": "Premium_LRS"}
    assert account.inputs["enableHttpsTrafficOnly"] is False  # NFS: Azure requires it off
    assert account.inputs["location"] == "eastus"
    assert account.inputs["tags"]["squall-run"] == spec.run_id
    [subnet] = mocks.of("azure-native:network:Subnet")
    subnet_id = f"/subscriptions/mock/resourceGroups/rg/providers/{subnet.typ}/{subnet.name}"
    # reached from the run's subnet only, through its service endpoint
    rules = account.inputs["networkRuleSet"]
    assert rules["defaultAction"] == "Deny"
    assert rules["virtualNetworkRules"] == [
        {"virtualNetworkResourceId": subnet_id, "action": "Allow"}
    ]
    assert "ipRules" not in rules
    assert subnet.inputs["serviceEndpoints"] == [{"service": "Microsoft.Storage"}]
    [share] = mocks.of("azure-native:storage:FileShare")
    assert share.inputs["enabledProtocols"] == "NFS"
    assert share.inputs["rootSquash"] == "NoRootSquash"
    assert share.inputs["shareQuota"] == MIN_SHARE_GIB == 100  # 40 GiB: the premium minimum
    assert share.inputs["accountName"] == account.inputs["accountName"]
    name = account.inputs["accountName"]
    scripts = boot_scripts(mocks, "azure")
    assert sorted(scripts) == ["g0-nodes", "g1-nodes"]  # a scale set a group
    for script in scripts.values():
        assert mounted_source(script) == (
            f"{name}.file.core.windows.net:/{name}/volumes",
            AZURE_FILES_OPTIONS,
        )
    # above the minimum, the share is the volumes' size
    mocks = run(with_volumes("azure", StorageClass.MANAGED, 2, size_gib=750))
    [share] = mocks.of("azure-native:storage:FileShare")
    assert share.inputs["shareQuota"] == 750


def test_without_managed_storage_the_subnet_has_no_service_endpoint():
    mocks = run(with_volumes("azure", StorageClass.NFS_FIRST_NODE))
    [subnet] = mocks.of("azure-native:network:Subnet")
    assert "serviceEndpoints" not in subnet.inputs
    assert mocks.of(ACCOUNT) == []
