"""The Azure program: one run's cluster in its own resource group (deleting the group takes
everything in it, which is the second line of defence behind the stack's own destroy).

What it gets right, each asserted by tests/infra/test_azure.py:
- an NSG that lets the agent port in from the orchestrator's address only (inside the virtual
  network, Azure's default rules already let the nodes reach each other);
- InfiniBand sizes (HB, HC, HX, ND…r) of a multi-node job in one availability set in one
  proximity placement group: Azure puts VMs on one InfiniBand fabric only when they share an
  availability set or a single-placement-group scale set;
- accelerated networking on every NIC of a size that has it;
- spot as Spot priority, evicted by deletion, paying at most the on-demand price (-1);
- the boot script as custom data, marked secret; tags on everything.

Azure refuses a Linux VM without an admin credential. Squall never logs in (no SSH anywhere),
so each cluster gets a fresh Ed25519 public key whose private half is never kept.
"""

from __future__ import annotations

import base64
from typing import Any

import pulumi
from pulumi_azure_native import compute, network, resources

from .bootstrap import startup_script
from .spec import ClusterSpec, NodeGroup

__all__ = ["accelerated_networking", "build", "image_reference"]

ADMIN = "squall"


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


def build(spec: ClusterSpec) -> list[dict[str, Any]]:
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
        ).id
    else:
        subnet_id = spec.network.subnet_id
    key = _throwaway_key()
    agents: list[dict[str, Any]] = []
    for g in spec.node_groups:
        agents += _group(spec, g, rg, subnet_id, nsg.id, public, key)
    return agents


def _group(
    spec: ClusterSpec,
    group: NodeGroup,
    rg: Any,
    subnet_id: Any,
    nsg_id: Any,
    public: bool,
    key: str,
) -> list[dict[str, Any]]:
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
    script = pulumi.Output.secret(base64.b64encode(startup_script(spec, group).encode()).decode())
    image = image_reference(group.image)
    agents = []
    for i in range(group.count):
        name = f"{group.name}-{i}"
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
                    disk_size_gb=group.disk_gib,
                    managed_disk=compute.ManagedDiskParametersArgs(
                        storage_account_type="Premium_LRS"
                    ),
                ),
            ),
            os_profile=compute.OSProfileArgs(
                computer_name=name,
                admin_username=ADMIN,
                custom_data=script,
                linux_configuration=compute.LinuxConfigurationArgs(
                    disable_password_authentication=True,
                    ssh=compute.SshConfigurationArgs(
                        public_keys=[
                            compute.SshPublicKeyArgs(
                                path=f"/home/{ADMIN}/.ssh/authorized_keys", key_data=key
                            )
                        ]
                    ),
                ),
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
        ip: Any = (
            address.ip_address
            if address
            else nic.ip_configurations.apply(lambda c: c[0]["private_ip_address"] if c else None)
        )
        agents.append(
            {
                "name": name,
                "group": group.name,
                "address": pulumi.Output.concat(ip, ":", str(spec.network.agent_port)),
            }
        )
    return agents
