"""The Azure program: one run's cluster in its own resource group (deleting the group takes
everything in it, which is the second line of defence behind the stack's own destroy).

What it gets right, each asserted by tests/infra/test_azure.py:
- an NSG that lets the agent port in from the orchestrator's address only (inside the virtual
  network, Azure's default rules already let the nodes reach each other);
- a node group as one VM scale set (Uniform, no overprovisioning: an extra VM would join the
  run; a public address per VM from the scale set's own configuration, no NIC or address
  resource per node: the nodes join the run, which learns their addresses then), in one
  proximity placement group when compact: Azure puts VMs on one InfiniBand fabric only when
  they share an availability set or a single-placement-group scale set, and such a scale set
  holds at most 100 VMs. A group whose node 0 keeps the run's volumes (its boot differs), or
  an InfiniBand group of more than 100 nodes, is made VM by VM instead, InfiniBand sizes in
  one availability set (200 VMs at most);
- accelerated networking on every NIC of a size that has it;
- spot as Spot priority, evicted by deletion, paying at most the on-demand price (-1);
- the boot script as custom data, marked secret; tags on everything;
- the run's volumes (`spec.storage`): managed, an NFS 4.1 share on a premium FileStorage
  account whose network rules admit the run's subnet only (through a Microsoft.Storage
  service endpoint on it); nfs-first-node, node 0 of the first group serves them and the
  others mount its private address (inside the virtual network, Azure's default rules let
  the nodes reach each other, and nothing outside reaches the nodes but the agent rule).

Azure refuses a Linux VM without an admin credential. Squall never logs in (no SSH anywhere),
so each cluster gets a fresh Ed25519 public key whose private half is never kept.
"""

from __future__ import annotations

import base64
from typing import Any

import pulumi
from pulumi_azure_native import compute, network, resources, storage

from .bootstrap import NfsMount
from .spec import ClusterSpec, Fabric, NodeGroup, StorageClass
from .volumes import Mount, boot_script, exports, first_node_mount

__all__ = [
    "AZURE_FILES_OPTIONS",
    "MIN_SHARE_GIB",
    "accelerated_networking",
    "build",
    "image_reference",
    "storage_account_name",
]

ADMIN = "squall"
# VMs in a scale set with a single placement group, the only kind on one InfiniBand fabric
# (https://learn.microsoft.com/azure/virtual-machine-scale-sets/
# virtual-machine-scale-sets-placement-groups)
SINGLE_PLACEMENT_MAX = 100
# NFS 4.1 shares exist only on premium (SSD) FileStorage accounts, with a provisioned size of
# 100 GiB at least; NFS has no encryption in transit on Azure Files, so the account must not
# require secure transfer, and the share is reached only from trusted networks
# (https://github.com/MicrosoftDocs/azure-docs, articles/storage/files/
# storage-files-quick-create-use-linux.md)
MIN_SHARE_GIB = 100
# the options of Azure's own mount script for NFS shares, with nconnect=4, which Microsoft
# recommends for NFS Azure file shares (https://learn.microsoft.com/troubleshoot/azure/
# azure-kubernetes/storage/mountoptions-settings-azure-files); hard, as nfs(5)'s default
AZURE_FILES_OPTIONS = "vers=4,minorversion=1,sec=sys,nconnect=4,hard"


def image_reference(image: str) -> compute.ImageReferenceArgs:
    """`publisher:offer:sku:version`, or the resource id of a custom image."""
    if image.startswith("/"):
        return compute.ImageReferenceArgs(id=image)
    parts = image.split(":")
    if len(parts) != 4:
        raise ValueError(
            f"Azure image {image!r}: give publisher:offer:sku:version or an image resource id"
        )
    publisher, offer, sku, version = parts
    return compute.ImageReferenceArgs(publisher=publisher, offer=offer, sku=sku, version=version)


def accelerated_networking(size: str) -> bool:
    """Every current HPC/GPU size has it; the burstable B and basic A sizes do not."""
    family = size.removeprefix("Standard_")
    return not family.startswith(("B", "A"))


def _throwaway_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def storage_account_name(run_id: str) -> str:
    """3 to 24 lower-case letters and digits, unique across Azure: from the run's id."""
    return ("squall" + run_id.replace("-", ""))[:24]


def build(spec: ClusterSpec) -> None:
    tags = spec.tags
    where = spec.site.region
    rg = resources.ResourceGroup("group", location=where, tags=tags).name
    # on every NIC, so that it holds in an existing subnet too
    nsg = network.NetworkSecurityGroup(
        "nodes",
        resource_group_name=rg,
        location=where,
        security_rules=[
            network.SecurityRuleArgs(
                name="squall-agent-from-orchestrator",
                priority=100,
                direction="Inbound",
                access="Allow",
                protocol="Tcp",
                source_address_prefix=spec.network.orchestrator_cidr,
                source_port_range="*",
                destination_address_prefix="*",
                destination_port_range=str(spec.network.agent_port),
            )
        ],
        tags=tags,
    )
    public = spec.network.subnet_id is None
    managed = spec.storage is not None and spec.storage.storage_class is StorageClass.MANAGED
    if public:
        vnet = network.VirtualNetwork(
            "network",
            resource_group_name=rg,
            location=where,
            address_space=network.AddressSpaceArgs(address_prefixes=[spec.network.cidr]),
            tags=tags,
        )
        subnet_id: Any = network.Subnet(
            "nodes",
            resource_group_name=rg,
            virtual_network_name=vnet.name,
            address_prefix=spec.network.cidr,
            # the storage account admits this subnet through the service endpoint (an
            # existing subnet must have one for managed storage)
            service_endpoints=(
                [network.ServiceEndpointPropertiesFormatArgs(service="Microsoft.Storage")]
                if managed
                else None
            ),
        ).id
    else:
        subnet_id = spec.network.subnet_id
    mount: Mount = _azure_files(spec, rg, subnet_id) if managed else None
    key = _throwaway_key()
    for g in spec.node_groups:
        served = _group(spec, g, rg, subnet_id, nsg.id, public, key, mount)
        mount = served if served is not None else mount


def _linux(key: str) -> compute.LinuxConfigurationArgs:
    """No password, and the throwaway admin key (Azure refuses a Linux VM without one)."""
    return compute.LinuxConfigurationArgs(
        disable_password_authentication=True,
        ssh=compute.SshConfigurationArgs(
            public_keys=[
                compute.SshPublicKeyArgs(path=f"/home/{ADMIN}/.ssh/authorized_keys", key_data=key)
            ]
        ),
    )


def _azure_files(spec: ClusterSpec, rg: Any, subnet_id: Any) -> pulumi.Output[NfsMount]:
    """An NFS 4.1 Azure file share for the run's volumes on a premium FileStorage account
    that only the run's subnet reaches."""
    assert spec.storage is not None
    name = storage_account_name(spec.run_id)
    account = storage.StorageAccount(
        "volumes",
        account_name=name,
        resource_group_name=rg,
        location=spec.site.region,
        kind="FileStorage",
        sku=storage.SkuArgs(name="Premium_LRS"),
        enable_https_traffic_only=False,  # NFS has no encryption in transit: Azure requires it
        minimum_tls_version="TLS1_2",
        allow_blob_public_access=False,
        network_rule_set=storage.NetworkRuleSetArgs(
            default_action=storage.DefaultAction.DENY,
            bypass="None",
            virtual_network_rules=[
                storage.VirtualNetworkRuleArgs(virtual_network_resource_id=subnet_id)
            ],
        ),
        tags=spec.tags,
    )
    share = storage.FileShare(
        "volumes",
        account_name=account.name,
        resource_group_name=rg,
        share_name="volumes",
        enabled_protocols="NFS",
        root_squash="NoRootSquash",  # the agents write the volumes as root
        share_quota=max(MIN_SHARE_GIB, spec.storage.size_gib),
    )
    return pulumi.Output.all(account.name, share.name).apply(
        lambda a: NfsMount(f"{a[0]}.file.core.windows.net:/{a[0]}/{a[1]}", AZURE_FILES_OPTIONS)
    )


def _group(
    spec: ClusterSpec,
    group: NodeGroup,
    rg: Any,
    subnet_id: Any,
    nsg_id: Any,
    public: bool,
    key: str,
    mount: Mount,
) -> pulumi.Output[NfsMount] | None:
    """The group's nodes; what the others mount when its node 0 serves the volumes."""
    infiniband = group.fabric is Fabric.INFINIBAND
    keeps = any(spec.holds_volumes(group, i) for i in range(group.count))
    if not keeps and not (infiniband and group.count > SINGLE_PLACEMENT_MAX):
        _scale_set(spec, group, rg, subnet_id, nsg_id, public, key, mount)
        return None
    tags = {**spec.tags, "squall-group": group.name}
    where = spec.site.region
    placement = availability = None
    if group.compact:
        placement = compute.ProximityPlacementGroup(
            f"{group.name}-proximity",
            resource_group_name=rg,
            location=where,
            proximity_placement_group_type="Standard",
            intent=compute.ProximityPlacementGroupPropertiesIntentArgs(
                vm_sizes=[group.instance_type]
            ),
            tags=tags,
        )
        availability = compute.AvailabilitySet(
            f"{group.name}-fabric",
            resource_group_name=rg,
            location=where,
            platform_fault_domain_count=1,
            platform_update_domain_count=1,
            sku=compute.SkuArgs(name="Aligned"),
            proximity_placement_group=compute.SubResourceArgs(id=placement.id),
            tags=tags,
        )
    image = image_reference(group.image)
    served: pulumi.Output[NfsMount] | None = None
    for i in range(group.count):
        name = f"{group.name}-{i}"
        # secret (as boot_script makes it): it carries the run's join token
        script = boot_script(
            spec,
            group,
            served if served is not None else mount,
            index=i if spec.holds_volumes(group, i) else None,
        ).apply(lambda text: base64.b64encode(text.encode()).decode())
        address = None
        if public:
            address = network.PublicIPAddress(
                f"{name}-ip",
                resource_group_name=rg,
                location=where,
                sku=network.PublicIPAddressSkuArgs(name="Standard"),
                public_ip_allocation_method="Static",
                tags=tags,
            )
        nic = network.NetworkInterface(
            f"{name}-nic",
            resource_group_name=rg,
            location=where,
            enable_accelerated_networking=accelerated_networking(group.instance_type),
            network_security_group=network.NetworkSecurityGroupArgs(id=nsg_id),
            ip_configurations=[
                network.NetworkInterfaceIPConfigurationArgs(
                    name="primary",
                    primary=True,
                    subnet=network.SubnetArgs(id=subnet_id),
                    public_ip_address=network.PublicIPAddressArgs(id=address.id)
                    if address
                    else None,
                )
            ],
            tags=tags,
        )
        compute.VirtualMachine(
            name,
            resource_group_name=rg,
            location=where,
            hardware_profile=compute.HardwareProfileArgs(vm_size=group.instance_type),
            storage_profile=compute.StorageProfileArgs(
                image_reference=image,
                os_disk=compute.OSDiskArgs(
                    create_option="FromImage",
                    delete_option="Delete",
                    disk_size_gb=spec.disk_gib(group, i),
                    managed_disk=compute.ManagedDiskParametersArgs(
                        storage_account_type="Premium_LRS"
                    ),
                ),
            ),
            os_profile=compute.OSProfileArgs(
                computer_name=name,
                admin_username=ADMIN,
                custom_data=script,
                linux_configuration=_linux(key),
            ),
            network_profile=compute.NetworkProfileArgs(
                network_interfaces=[
                    compute.NetworkInterfaceReferenceArgs(
                        id=nic.id, primary=True, delete_option="Delete"
                    )
                ]
            ),
            priority="Spot" if group.spot else "Regular",
            eviction_policy="Delete" if group.spot else None,
            billing_profile=compute.BillingProfileArgs(max_price=-1) if group.spot else None,
            proximity_placement_group=(
                compute.SubResourceArgs(id=placement.id) if placement else None
            ),
            availability_set=compute.SubResourceArgs(id=availability.id) if availability else None,
            tags=tags,
            # the admin key is new on every program run; it must not replace running VMs
            opts=pulumi.ResourceOptions(ignore_changes=["osProfile"]),
        )
        private_ip = nic.ip_configurations.apply(
            lambda c: c[0].get("private_ip_address") if c else None
        )
        if exports(spec, group, i):  # the others mount node 0's private address (its NIC's)
            served = first_node_mount(private_ip)
    return served


def _scale_set(
    spec: ClusterSpec,
    group: NodeGroup,
    rg: Any,
    subnet_id: Any,
    nsg_id: Any,
    public: bool,
    key: str,
    mount: Mount,
) -> compute.VirtualMachineScaleSet:
    """The group as one scale set: one resource for all its VMs, their NICs and addresses."""
    tags = {**spec.tags, "squall-group": group.name}
    where = spec.site.region
    placement = None
    if group.compact:
        placement = compute.ProximityPlacementGroup(
            f"{group.name}-proximity",
            resource_group_name=rg,
            location=where,
            proximity_placement_group_type="Standard",
            intent=compute.ProximityPlacementGroupPropertiesIntentArgs(
                vm_sizes=[group.instance_type]
            ),
            tags=tags,
        )
    # secret (as boot_script makes it): it carries the run's join token
    script = boot_script(spec, group, mount).apply(
        lambda text: base64.b64encode(text.encode()).decode()
    )
    return compute.VirtualMachineScaleSet(
        f"{group.name}-nodes",
        resource_group_name=rg,
        location=where,
        sku=compute.SkuArgs(name=group.instance_type, tier="Standard", capacity=group.count),
        orchestration_mode="Uniform",
        upgrade_policy=compute.UpgradePolicyArgs(mode=compute.UpgradeMode.MANUAL),
        # Azure makes extra VMs and deletes them once enough are up: those would take the
        # run's places at the join
        overprovision=False,
        # one placement group: one InfiniBand fabric for all the group's VMs (100 at most);
        # others may spread (up to 1000)
        single_placement_group=group.fabric is Fabric.INFINIBAND,
        platform_fault_domain_count=1,
        proximity_placement_group=compute.SubResourceArgs(id=placement.id) if placement else None,
        virtual_machine_profile=compute.VirtualMachineScaleSetVMProfileArgs(
            storage_profile=compute.VirtualMachineScaleSetStorageProfileArgs(
                image_reference=image_reference(group.image),
                os_disk=compute.VirtualMachineScaleSetOSDiskArgs(
                    create_option="FromImage",
                    delete_option="Delete",
                    disk_size_gb=group.disk_gib,
                    managed_disk=compute.VirtualMachineScaleSetManagedDiskParametersArgs(
                        storage_account_type="Premium_LRS"
                    ),
                ),
            ),
            os_profile=compute.VirtualMachineScaleSetOSProfileArgs(
                computer_name_prefix=group.name[:9],
                admin_username=ADMIN,
                custom_data=script,
                linux_configuration=_linux(key),
            ),
            network_profile=compute.VirtualMachineScaleSetNetworkProfileArgs(
                network_interface_configurations=[
                    compute.VirtualMachineScaleSetNetworkConfigurationArgs(
                        name="primary",
                        primary=True,
                        enable_accelerated_networking=accelerated_networking(group.instance_type),
                        network_security_group=compute.SubResourceArgs(id=nsg_id),
                        ip_configurations=[
                            compute.VirtualMachineScaleSetIPConfigurationArgs(
                                name="primary",
                                primary=True,
                                subnet=compute.ApiEntityReferenceArgs(id=subnet_id),
                                public_ip_address_configuration=(
                                    compute.VirtualMachineScaleSetPublicIPAddressConfigurationArgs(
                                        name="public",
                                        sku=compute.PublicIPAddressSkuArgs(name="Standard"),
                                    )
                                    if public
                                    else None
                                ),
                            )
                        ],
                    )
                ]
            ),
            priority="Spot" if group.spot else "Regular",
            eviction_policy="Delete" if group.spot else None,
            billing_profile=compute.BillingProfileArgs(max_price=-1) if group.spot else None,
        ),
        tags=tags,
        # the admin key is new on every program run; it must not replace running VMs
        opts=pulumi.ResourceOptions(ignore_changes=["virtualMachineProfile.osProfile"]),
    )
