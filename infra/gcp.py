"""The GCP program: one run's cluster in its own VPC network (or an existing subnetwork).

What it gets right, each asserted by tests/infra/test_gcp.py:
- firewall rules: all protocols between the run's nodes, the agent port from the
  orchestrator's address only;
- a node group is one zonal managed instance group from one instance template (no resource
  per node: the nodes join the run, which learns their addresses then), which waits until
  its VMs run and never repairs or recreates one behind the run's back (DO_NOTHING on
  failure, opportunistic updates); a group whose node 0 keeps the run's volumes (its boot
  differs) is made instance by instance;
- a compact-placement resource policy (COLLOCATED) only for compact groups;
- GPUs as guest accelerators of the model the catalog priced (A2/A3/G2 bundle theirs: the
  accelerator named is the one the machine type carries), and TERMINATE on host maintenance,
  which GPUs and compact placement require;
- gVNIC on every node, and Tier-1 egress bandwidth on the families and sizes that offer it;
- spot as the SPOT provisioning model, deleted (not stopped) when preempted;
- the boot script as the `user-data` metadata value, marked secret: cloud-init's GCE
  datasource runs it once per instance (the node image has cloud-init and no Google guest
  agent, which alone would run a `startup-script`, and on every boot); labels (GCP's
  lower-case form of the run's tags) on every resource that takes them;
- the run's volumes (`spec.storage`): managed, a Filestore instance (Zonal tier, NFSv4.1) on
  the run's network in the nodes' zone, exported read-write to the run's network only;
  nfs-first-node, node 0 of the first group serves them and the others mount its private
  address (the node-to-node firewall rule already admits them, and only them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_gcp as gcp

from .bootstrap import NfsMount
from .spec import ClusterSpec, NodeGroup, StorageClass
from .volumes import Mount, boot_script, exports, first_node_mount

__all__ = [
    "FILESTORE_OPTIONS",
    "FILESTORE_TIER",
    "accelerator",
    "build",
    "filestore_capacity_gib",
    "labels",
    "machine_type",
    "tier_1",
]

# Filestore's Zonal tier: the one its documentation names for HPC and batch compute, and
# one that serves NFSv4.1 (Basic HDD and SSD serve NFSv3 only), whose traffic the client
# always starts on port 2049: no callbacks into the nodes, so no firewall rule for them
# (https://cloud.google.com/filestore/docs/service-tiers,
# https://cloud.google.com/filestore/docs/about-supported-protocols)
FILESTORE_TIER = "ZONAL"
# NFSv4.1 over TCP (`tcp` skips the UDP probe that costs each mount 3 s:
# https://cloud.google.com/filestore/docs/mount-latency); hard, with nfs(5)'s TCP timeout
# and retries made explicit
FILESTORE_OPTIONS = "nfsvers=4.1,proto=tcp,hard,timeo=600,retrans=2"
# Zonal capacity, GiB (https://cloud.google.com/filestore/docs/service-tiers-zonal): 1 TiB to
# 9.75 TiB in steps of 256 GiB, or 10 TiB to 100 TiB in steps of 2.5 TiB
_ZONAL_RANGES = ((1024, 9984, 256), (10240, 102400, 2560))

# the catalog's GPU model names -> GCP accelerator types
_ACCELERATORS = {
    "H100": "nvidia-h100-80gb",
    "H100-MEGA": "nvidia-h100-mega-80gb",
    "H200": "nvidia-h200-141gb",
    "B200": "nvidia-b200",
    "A100": "nvidia-tesla-a100",
    "A100-80GB": "nvidia-a100-80gb",
    "L4": "nvidia-l4",
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
}
# families with Tier-1 (per-VM egress up to 200 Gbps) at 30 vCPUs or more
_TIER_1 = {"n2", "n2d", "c2", "c2d", "c3", "c3d", "c4", "c4a", "c4d", "h3", "m3", "z3"}
_HYPERDISK_ONLY = {"c4", "c4a", "c4d", "n4", "x4", "a4", "a3-ultragpu"}


def machine_type(name: str) -> str:
    """The catalog writes N1 + attached GPUs as `n1-standard-16+2xT4`; GCP wants the N1 part."""
    return name.split("+", 1)[0]


def accelerator(group: NodeGroup) -> str | None:
    if not group.gpus:
        return None
    model = group.gpu_model.upper()
    if model == "H100" and machine_type(group.instance_type).startswith("a3-mega"):
        model = "H100-MEGA"
    try:
        return _ACCELERATORS[model]
    except KeyError:
        raise ValueError(
            f"{group.name}: no GCP accelerator type known for GPU model {group.gpu_model!r}"
        ) from None


def tier_1(name: str) -> bool:
    family, *rest = machine_type(name).split("-")
    vcpus = next((int(p) for p in rest if p.isdigit()), 0)
    return family in _TIER_1 and vcpus >= 30


def filestore_capacity_gib(size_gib: int) -> int:
    """The smallest Zonal capacity that holds `size_gib`: Filestore bills what is provisioned,
    at least its minimum."""
    for low, high, step in _ZONAL_RANGES:
        capacity = max(low, -(-size_gib // step) * step)
        if capacity <= high:
            return capacity
    raise ValueError(
        f"{size_gib} GiB of volumes is more than a Filestore Zonal instance holds "
        f"({_ZONAL_RANGES[-1][1]} GiB)"
    )


def labels(tags: Mapping[str, str]) -> dict[str, str]:
    """`tags` as GCP labels, which allow [a-z0-9_-] and 63 characters."""

    def clean(text: str) -> str:
        return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]

    return {clean(k): clean(v) for k, v in tags.items()}


def build(spec: ClusterSpec) -> None:
    provider = gcp.Provider("gcp", region=spec.site.region, default_labels=labels(spec.tags))
    opts = pulumi.ResourceOptions(provider=provider)
    invoke = pulumi.InvokeOutputOptions(provider=provider)
    tag = f"squall-{spec.run_id}"[:63]
    public = spec.network.subnet_id is None
    network_id: Any
    subnet_id: Any
    if public:
        network = gcp.compute.Network("network", auto_create_subnetworks=False, mtu=8896, opts=opts)
        subnet = gcp.compute.Subnetwork(
            "subnet",
            network=network.id,
            region=spec.site.region,
            ip_cidr_range=spec.network.cidr,
            opts=opts,
        )
        network_id, subnet_id = network.id, subnet.id
    else:
        existing = gcp.compute.get_subnetwork_output(self_link=spec.network.subnet_id, opts=invoke)
        network_id, subnet_id = existing.network, spec.network.subnet_id
    gcp.compute.Firewall(
        "nodes",
        network=network_id,
        description=f"squall run {spec.run_id}: node to node",
        allows=[gcp.compute.FirewallAllowArgs(protocol="all")],
        source_tags=[tag],
        target_tags=[tag],
        opts=opts,
    )
    gcp.compute.Firewall(
        "agent",
        network=network_id,
        description=f"squall run {spec.run_id}: the agent API, from the orchestrator only",
        allows=[
            gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[str(spec.network.agent_port)])
        ],
        source_ranges=[spec.network.orchestrator_cidr],
        target_tags=[tag],
        opts=opts,
    )
    zone = (
        spec.site.zone
        or gcp.compute.get_zones_output(region=spec.site.region, status="UP", opts=invoke).names[0]
    )
    mount: Mount = None
    if spec.storage is not None and spec.storage.storage_class is StorageClass.MANAGED:
        mount = _filestore(spec, zone, network_id, opts)
    for group in spec.node_groups:
        served = _group(spec, group, zone, subnet_id, public, tag, opts, mount)
        mount = served if served is not None else mount


def _filestore(
    spec: ClusterSpec, zone: Any, network_id: Any, opts: pulumi.ResourceOptions
) -> pulumi.Output[NfsMount]:
    """A Filestore instance for the run's volumes, in the nodes' zone, on the run's network,
    exported read-write (root as root: the agents write as root) to the run's network only."""
    assert spec.storage is not None
    share = "volumes"
    instance = gcp.filestore.Instance(
        "volumes",
        location=zone,
        tier=FILESTORE_TIER,
        protocol="NFS_V4_1",
        description=f"squall run {spec.run_id}: the run's volumes",
        file_shares=gcp.filestore.InstanceFileSharesArgs(
            name=share,
            capacity_gb=filestore_capacity_gib(spec.storage.size_gib),  # GiB, despite the name
            nfs_export_options=[
                gcp.filestore.InstanceFileSharesNfsExportOptionArgs(
                    ip_ranges=[spec.network.cidr],
                    access_mode="READ_WRITE",
                    squash_mode="NO_ROOT_SQUASH",
                )
            ],
        ),
        networks=[
            gcp.filestore.InstanceNetworkArgs(
                # Filestore names the network; the run's network id ends with its name
                network=pulumi.Output.from_input(network_id).apply(
                    lambda n: str(n).rsplit("/", 1)[-1]
                ),
                modes=["MODE_IPV4"],
                connect_mode="DIRECT_PEERING",
            )
        ],
        labels=labels(spec.tags),
        deletion_protection_enabled=False,  # the stack destroys it with the run
        opts=opts,
    )
    return instance.networks.apply(
        lambda nets: NfsMount(f"{nets[0]['ip_addresses'][0]}:/{share}", FILESTORE_OPTIONS)
    )


def _group(
    spec: ClusterSpec,
    group: NodeGroup,
    zone: Any,
    subnet_id: Any,
    public: bool,
    tag: str,
    opts: pulumi.ResourceOptions,
    mount: Mount,
) -> pulumi.Output[NfsMount] | None:
    """The group's nodes; what the others mount when its node 0 serves the volumes."""
    policy = (
        gcp.compute.ResourcePolicy(
            f"{group.name}-compact",
            region=spec.site.region,
            group_placement_policy=gcp.compute.ResourcePolicyGroupPlacementPolicyArgs(
                collocation="COLLOCATED", vm_count=group.count
            ),
            opts=opts,
        )
        if group.compact
        else None
    )
    kind = machine_type(group.instance_type)
    gpu = accelerator(group)
    family = "a3-ultragpu" if kind.startswith("a3-ultragpu") else kind.split("-")[0]
    disk_type = "hyperdisk-balanced" if family in _HYPERDISK_ONLY else "pd-balanced"
    timing: dict[str, Any] = {
        # GPUs cannot live-migrate, nor can VMs under a compact policy
        "on_host_maintenance": "TERMINATE" if gpu or group.compact or group.spot else "MIGRATE",
        "automatic_restart": not group.spot,
        "preemptible": group.spot,
        "provisioning_model": "SPOT" if group.spot else "STANDARD",
        "instance_termination_action": "DELETE" if group.spot else None,
    }
    node_labels = {**labels(spec.tags), "squall-group": group.name}
    if not any(spec.holds_volumes(group, i) for i in range(group.count)):
        template = gcp.compute.InstanceTemplate(
            f"{group.name}-template",
            machine_type=kind,
            disks=[
                gcp.compute.InstanceTemplateDiskArgs(
                    source_image=group.image,
                    boot=True,
                    auto_delete=True,
                    disk_size_gb=group.disk_gib,
                    disk_type=disk_type,
                )
            ],
            network_interfaces=[
                gcp.compute.InstanceTemplateNetworkInterfaceArgs(
                    subnetwork=subnet_id,
                    nic_type="GVNIC",
                    access_configs=(
                        [gcp.compute.InstanceTemplateNetworkInterfaceAccessConfigArgs()]
                        if public
                        else None
                    ),
                )
            ],
            network_performance_config=(
                gcp.compute.InstanceTemplateNetworkPerformanceConfigArgs(
                    total_egress_bandwidth_tier="TIER_1"
                )
                if tier_1(kind)
                else None
            ),
            guest_accelerators=(
                [gcp.compute.InstanceTemplateGuestAcceleratorArgs(type=gpu, count=group.gpus)]
                if gpu
                else None
            ),
            scheduling=gcp.compute.InstanceTemplateSchedulingArgs(**timing),
            resource_policies=policy.self_link if policy else None,
            # secret: it carries the run's join token
            metadata={"user-data": boot_script(spec, group, mount)},
            labels=node_labels,
            tags=[tag],
            opts=opts,
        )
        gcp.compute.InstanceGroupManager(
            f"{group.name}-nodes",
            zone=zone,
            base_instance_name=f"{group.name}-{spec.run_id[:8]}",
            versions=[
                gcp.compute.InstanceGroupManagerVersionArgs(
                    name="nodes", instance_template=template.self_link_unique
                )
            ],
            target_size=group.count,
            # a VM that fails or is preempted stays gone: a new one could not join the run
            instance_lifecycle_policy=gcp.compute.InstanceGroupManagerInstanceLifecyclePolicyArgs(
                default_action_on_failure="DO_NOTHING"
            ),
            update_policy=gcp.compute.InstanceGroupManagerUpdatePolicyArgs(
                type="OPPORTUNISTIC", minimal_action="REFRESH"
            ),
            wait_for_instances=True,  # `up` fails when the zone cannot give them
            wait_for_instances_status="STABLE",
            opts=opts,
        )
        return None
    scheduling = gcp.compute.InstanceSchedulingArgs(**timing)
    served: pulumi.Output[NfsMount] | None = None
    for i in range(group.count):
        name = f"{group.name}-{i}"
        # secret: it carries the run's join token
        script = boot_script(
            spec,
            group,
            served if served is not None else mount,
            index=i if spec.holds_volumes(group, i) else None,
        )
        node = gcp.compute.Instance(
            name,
            machine_type=kind,
            zone=zone,
            boot_disk=gcp.compute.InstanceBootDiskArgs(
                auto_delete=True,
                initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                    image=group.image,
                    size=spec.disk_gib(group, i),
                    type=disk_type,
                ),
            ),
            network_interfaces=[
                gcp.compute.InstanceNetworkInterfaceArgs(
                    subnetwork=subnet_id,
                    nic_type="GVNIC",
                    access_configs=[gcp.compute.InstanceNetworkInterfaceAccessConfigArgs()]
                    if public
                    else None,
                )
            ],
            network_performance_config=(
                gcp.compute.InstanceNetworkPerformanceConfigArgs(
                    total_egress_bandwidth_tier="TIER_1"
                )
                if tier_1(kind)
                else None
            ),
            guest_accelerators=(
                [gcp.compute.InstanceGuestAcceleratorArgs(type=gpu, count=group.gpus)]
                if gpu
                else None
            ),
            scheduling=scheduling,
            resource_policies=policy.self_link if policy else None,
            metadata={"user-data": script},
            labels=node_labels,
            tags=[tag],
            allow_stopping_for_update=False,
            opts=opts,
        )
        if exports(spec, group, i):
            served = first_node_mount(node.network_interfaces.apply(lambda n: n[0]["network_ip"]))
    return served
