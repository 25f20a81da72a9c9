"""The AWS program: one run's cluster in its own VPC (or an existing subnet).

What it gets right, each asserted by tests/infra/test_aws.py:
- the security group admits all traffic between the nodes (EFA needs it, both ways) and the
  agent port from the orchestrator's address only; never from 0.0.0.0/0;
- a cluster placement group only for compact groups (multi-node on a fabric): around one node
  it would only narrow the capacity EC2 can place it in;
- every EFA interface the type has, laid out as AWS documents for multi-card types (p4d,
  p5, hpc7a): an ENA primary interface, then one EFA-only interface per network card;
- a node group is one EC2 Fleet of type instant (what ParallelCluster launches compute nodes
  with): one request for all its nodes, all or nothing (minimum capacity = the group's size,
  one type, one zone), never replaced behind the run's back, terminated with the fleet; no
  resource per node: the nodes join the run, which learns their addresses then. The root
  disk's size goes in the launch template, on the AMI's own root device (read from the AMI);
- a group is made instance by instance instead when its node 0 keeps the run's volumes (its
  boot differs), or when its type has more than one interface in a public subnet: EC2 gives
  such a launch no public IP, so each node gets an Elastic IP on its primary interface;
- IMDSv2 only, an instance profile that may touch the run's buckets and nothing else, spot
  as one-time requests (or the fleet's spot capacity) that terminate (nothing restarts
  behind the ledger's back);
- tags on every resource that takes them, and on the instances, volumes and interfaces the
  launch template makes;
- the run's volumes (`spec.storage`): managed, an encrypted EFS file system with a mount
  target in the run's subnet, whose security group admits NFS (TCP 2049) from the run's
  network only; nfs-first-node, node 0 of the first group serves them (its own launch
  template, its boot script exports) and every other node mounts its private address (the
  node security group already admits all traffic between the nodes, and nothing else).
"""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

import pulumi
import pulumi_aws as aws

from .bootstrap import NfsMount
from .spec import NFS_PORT, ClusterSpec, Fabric, NodeGroup, StorageClass
from .volumes import Mount, boot_script, exports, first_node_mount

__all__ = ["EFS_OPTIONS", "build"]

# Amazon EFS's recommended NFS mount options, as its mount helper uses them on Linux: NFSv4.1,
# 1 MiB reads and writes, hard, 60 s timeout, 2 retries, a new source port on reconnection
# (https://docs.amazonaws.cn/en_us/efs/latest/ug/mount-helper-setting.html, "Mount settings
# used by EFS mount helper"; the same list as docs.aws.amazon.com's "Recommended NFS mount
# options")
EFS_OPTIONS = "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"


def build(spec: ClusterSpec) -> None:
    """Declare the cluster (its nodes join the run: no addresses come out)."""
    provider = aws.Provider(
        "aws",
        region=spec.site.region,
        default_tags=aws.ProviderDefaultTagsArgs(tags=spec.tags),
    )
    opts = pulumi.ResourceOptions(provider=provider)
    tags = {**spec.tags, "Name": spec.stack_name}
    public = spec.network.subnet_id is None
    vpc_id: Any
    subnet_id: Any
    if public:
        vpc_id, subnet_id = _network(spec, tags, opts)
    else:
        subnet_id = spec.network.subnet_id
        vpc_id = aws.ec2.get_subnet_output(
            id=subnet_id, opts=pulumi.InvokeOutputOptions(provider=provider)
        ).vpc_id
    sg = aws.ec2.SecurityGroup(
        "nodes",
        description=f"squall run {spec.run_id}: node to node, agent port from the orchestrator",
        vpc_id=vpc_id,
        ingress=[
            aws.ec2.SecurityGroupIngressArgs(
                protocol="-1", from_port=0, to_port=0, self=True, description="node to node"
            ),
            aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp",
                from_port=spec.network.agent_port,
                to_port=spec.network.agent_port,
                cidr_blocks=[spec.network.orchestrator_cidr],
                description="squall agent API, from the orchestrator only",
            ),
        ],
        egress=[
            aws.ec2.SecurityGroupEgressArgs(
                protocol="-1", from_port=0, to_port=0, self=True, description="node to node (EFA)"
            ),
            aws.ec2.SecurityGroupEgressArgs(
                protocol="-1",
                from_port=0,
                to_port=0,
                cidr_blocks=["0.0.0.0/0"],
                description="images and data",
            ),
        ],
        tags=tags,
        opts=opts,
    )
    profile = _instance_profile(spec, tags, opts) if spec.buckets else None
    mount: Mount = None
    if spec.storage is not None and spec.storage.storage_class is StorageClass.MANAGED:
        mount = _efs(spec, vpc_id, subnet_id, tags, opts)
    for group in spec.node_groups:
        served = _group(spec, group, subnet_id, sg, profile, public, tags, opts, mount)
        mount = served if served is not None else mount


def _efs(
    spec: ClusterSpec,
    vpc_id: Any,
    subnet_id: Any,
    tags: dict[str, str],
    opts: pulumi.ResourceOptions,
) -> pulumi.Output[NfsMount]:
    """An encrypted EFS file system for the run's volumes, reached from the run's subnet.

    Elastic throughput: a file system as small as one run's volumes would get a bursting
    baseline of 50 KB/s per GB stored, while elastic throughput does not depend on the size
    (it bills reads and writes per GB instead). EFS bills the bytes stored, with no minimum."""
    file_system = aws.efs.FileSystem(
        "volumes",
        encrypted=True,
        throughput_mode="elastic",
        performance_mode="generalPurpose",
        tags={**tags, "Name": f"{spec.stack_name}-volumes"},
        opts=opts,
    )
    guard = aws.ec2.SecurityGroup(
        "volumes",
        description=f"squall run {spec.run_id}: NFS to the volumes, from the run's network only",
        vpc_id=vpc_id,
        ingress=[
            aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp",
                from_port=NFS_PORT,
                to_port=NFS_PORT,
                cidr_blocks=[spec.network.cidr],
                description="NFS from the run's nodes",
            )
        ],
        tags=tags,
        opts=opts,
    )
    target = aws.efs.MountTarget(
        "volumes",
        file_system_id=file_system.id,
        subnet_id=subnet_id,
        security_groups=[guard.id],
        opts=opts,
    )
    # by the mount target's address: it needs no DNS in the VPC (an existing one may have none)
    return target.ip_address.apply(lambda ip: NfsMount(f"{ip}:/", EFS_OPTIONS))


def _network(
    spec: ClusterSpec, tags: dict[str, str], opts: pulumi.ResourceOptions
) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
    cidr = ipaddress.ip_network(spec.network.cidr, strict=False)
    vpc = aws.ec2.Vpc(
        "vpc",
        cidr_block=str(cidr),
        enable_dns_hostnames=True,
        enable_dns_support=True,
        tags=tags,
        opts=opts,
    )
    gateway = aws.ec2.InternetGateway("gateway", vpc_id=vpc.id, tags=tags, opts=opts)
    subnet = aws.ec2.Subnet(
        "subnet",
        vpc_id=vpc.id,
        cidr_block=str(
            next(cidr.subnets(new_prefix=max(cidr.prefixlen, min(cidr.prefixlen + 1, 28))))
        ),
        availability_zone=spec.site.zone,
        tags=tags,
        opts=opts,
    )
    routes = aws.ec2.RouteTable(
        "routes",
        vpc_id=vpc.id,
        routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=gateway.id)],
        tags=tags,
        opts=opts,
    )
    aws.ec2.RouteTableAssociation(
        "routes", subnet_id=subnet.id, route_table_id=routes.id, opts=opts
    )
    return vpc.id, subnet.id


def _instance_profile(
    spec: ClusterSpec, tags: dict[str, str], opts: pulumi.ResourceOptions
) -> aws.iam.InstanceProfile:
    """The nodes may list, read and write the run's buckets, and nothing else."""
    role = aws.iam.Role(
        "nodes",
        description=f"squall run {spec.run_id}: the run's buckets only",
        assume_role_policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "ec2.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
        tags=tags,
        opts=opts,
    )
    aws.iam.RolePolicy(
        "buckets",
        role=role.id,
        policy=json.dumps(bucket_policy(spec.buckets)),
        opts=opts,
    )
    return aws.iam.InstanceProfile("nodes", role=role.name, tags=tags, opts=opts)


def bucket_policy(buckets: tuple[str, ...]) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": [f"arn:aws:s3:::{b}" for b in buckets],
            },
            {
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": [f"arn:aws:s3:::{b}/*" for b in buckets],
            },
        ],
    }


def network_interfaces(
    group: NodeGroup, subnet_id: Any, sg_id: Any, public: bool
) -> list[aws.ec2.LaunchTemplateNetworkInterfaceArgs]:
    """AWS's layout for EFA on multi-card types: the primary interface is ENA (card 0,
    device 0) and carries the node's IP; then one EFA-only interface per network card, at
    device index 1 on card 0 and device index 0 on every other card. `subnet_id` None: the
    fleet's override names it."""

    def nic(card: int, device: int, kind: str | None) -> aws.ec2.LaunchTemplateNetworkInterfaceArgs:
        return aws.ec2.LaunchTemplateNetworkInterfaceArgs(
            device_index=device,
            network_card_index=card,
            interface_type=kind,
            subnet_id=subnet_id,
            security_groups=[sg_id],
            delete_on_termination="true",
            # EC2 auto-assigns a public IP only to single-interface launches
            associate_public_ip_address="true" if public and only and kind is None else None,
        )

    cards = group.efa_interfaces if group.fabric is Fabric.EFA else 0
    only = cards == 0
    return [nic(0, 0, None)] + [nic(c, 1 if c == 0 else 0, "efa-only") for c in range(cards)]


def _template(
    name: str,
    spec: ClusterSpec,
    group: NodeGroup,
    nics: list[aws.ec2.LaunchTemplateNetworkInterfaceArgs],
    placement_group: aws.ec2.PlacementGroup | None,
    profile: aws.iam.InstanceProfile | None,
    script: pulumi.Output[str],
    tags: dict[str, str],
    opts: pulumi.ResourceOptions,
    *,
    root_disk: tuple[pulumi.Output[str], int] | None = None,
) -> aws.ec2.LaunchTemplate:
    """The nodes' launch template; with `root_disk` (the AMI's root device, GiB), a fleet's:
    the disk's size is the template's, and spot is the fleet's to ask for."""
    made = {**tags, "squall-group": group.name}
    fleet = root_disk is not None
    return aws.ec2.LaunchTemplate(
        name,
        description=f"squall run {spec.run_id}, group {group.name}",
        image_id=group.image,  # an AMI id, or resolve:ssm:/path/to/parameter
        instance_type=group.instance_type,
        network_interfaces=nics,
        placement=aws.ec2.LaunchTemplatePlacementArgs(
            group_name=placement_group.name if placement_group else None,
            availability_zone=None if fleet else spec.site.zone,  # a fleet's is its subnet's
        ),
        block_device_mappings=(
            [
                aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                    device_name=root_disk[0],
                    ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                        volume_size=root_disk[1], volume_type="gp3", delete_on_termination="true"
                    ),
                )
            ]
            if root_disk is not None
            else None
        ),
        iam_instance_profile=(
            aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=profile.arn) if profile else None
        ),
        instance_market_options=(
            aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(
                market_type="spot",
                spot_options=aws.ec2.LaunchTemplateInstanceMarketOptionsSpotOptionsArgs(
                    spot_instance_type="one-time",
                    instance_interruption_behavior="terminate",
                ),
            )
            if group.spot and not fleet
            else None
        ),
        metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
            http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=2
        ),
        # secret (as boot_script makes it): it carries the join token
        user_data=script.apply(lambda text: base64.b64encode(text.encode()).decode()),
        tag_specifications=[
            aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind, tags=made)
            for kind in ("instance", "volume", "network-interface", "spot-instances-request")
            if kind != "spot-instances-request" or group.spot
        ],
        tags=tags,
        opts=opts,
    )


def _group(
    spec: ClusterSpec,
    group: NodeGroup,
    subnet_id: Any,
    sg: aws.ec2.SecurityGroup,
    profile: aws.iam.InstanceProfile | None,
    public: bool,
    tags: dict[str, str],
    opts: pulumi.ResourceOptions,
    mount: Mount,
) -> pulumi.Output[NfsMount] | None:
    """The group's nodes; what the others mount when its node 0 serves the volumes."""
    placement_group = (
        aws.ec2.PlacementGroup(f"{group.name}-placement", strategy="cluster", tags=tags, opts=opts)
        if group.compact
        else None
    )
    if not any(spec.holds_volumes(group, i) for i in range(group.count)) and not (
        public and group.fabric is Fabric.EFA and group.efa_interfaces > 0
    ):
        _fleet(spec, group, subnet_id, sg, profile, public, placement_group, tags, opts, mount)
        return None
    nics = network_interfaces(group, subnet_id, sg.id, public)
    made = {**tags, "squall-group": group.name}
    served: pulumi.Output[NfsMount] | None = None
    template: aws.ec2.LaunchTemplate | None = None
    for i in range(group.count):
        name = f"{group.name}-{i}"
        if spec.holds_volumes(group, i):
            # node 0 keeps the volumes (and may serve them): a template of its own, whose
            # script says so; the group's template (the others') is made from its address
            launch = _template(
                f"{name}-template",
                spec,
                group,
                nics,
                placement_group,
                profile,
                boot_script(spec, group, mount, index=i),
                tags,
                opts,
            )
        else:
            if template is None:
                template = _template(
                    f"{group.name}-template",
                    spec,
                    group,
                    nics,
                    placement_group,
                    profile,
                    boot_script(spec, group, served if served is not None else mount),
                    tags,
                    opts,
                )
            launch = template
        node = aws.ec2.Instance(
            name,
            launch_template=aws.ec2.InstanceLaunchTemplateArgs(
                id=launch.id, version=launch.latest_version.apply(str)
            ),
            placement_group=placement_group.name if placement_group else None,
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_size=spec.disk_gib(group, i), volume_type="gp3", delete_on_termination=True
            ),
            tags={**made, "Name": f"{spec.stack_name}-{name}"},
            opts=opts,
        )
        if exports(spec, group, i):
            served = first_node_mount(node.private_ip)
        if public and len(nics) > 1:
            # EC2 gives no public address to a multi-interface launch: the node's own, for
            # its images and for joining its run
            aws.ec2.Eip(
                f"{name}-ip",
                domain="vpc",
                network_interface=node.primary_network_interface_id,
                tags=made,
                opts=opts,
            )
    return served


def _root_device(image: str, opts: pulumi.ResourceOptions) -> pulumi.Output[str]:
    """The root device name of the AMI `image` (an id, or resolve:ssm:PARAMETER)."""
    invoke = pulumi.InvokeOutputOptions(provider=opts.provider)
    ami: Any = image
    if image.startswith("resolve:ssm:"):
        ami = aws.ssm.get_parameter_output(
            name=image.removeprefix("resolve:ssm:"), opts=invoke
        ).value
    return aws.ec2.get_ami_output(
        filters=[aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami])], opts=invoke
    ).root_device_name


def _fleet(
    spec: ClusterSpec,
    group: NodeGroup,
    subnet_id: Any,
    sg: aws.ec2.SecurityGroup,
    profile: aws.iam.InstanceProfile | None,
    public: bool,
    placement_group: aws.ec2.PlacementGroup | None,
    tags: dict[str, str],
    opts: pulumi.ResourceOptions,
    mount: Mount,
) -> aws.ec2.Fleet:
    """The group's nodes in one instant fleet: all of them or none."""
    template = _template(
        f"{group.name}-template",
        spec,
        group,
        network_interfaces(group, None, sg.id, public),
        placement_group,
        profile,
        boot_script(spec, group, mount),
        tags,
        opts,
        root_disk=(_root_device(group.image, opts), group.disk_gib),
    )
    return aws.ec2.Fleet(
        f"{group.name}-nodes",
        type="instant",
        launch_template_configs=[
            aws.ec2.FleetLaunchTemplateConfigArgs(
                launch_template_specification=(
                    aws.ec2.FleetLaunchTemplateConfigLaunchTemplateSpecificationArgs(
                        launch_template_id=template.id,
                        version=template.latest_version.apply(str),
                    )
                ),
                overrides=[
                    aws.ec2.FleetLaunchTemplateConfigOverrideArgs(
                        instance_type=group.instance_type, subnet_id=subnet_id
                    )
                ],
            )
        ],
        target_capacity_specification=aws.ec2.FleetTargetCapacitySpecificationArgs(
            default_target_capacity_type="spot" if group.spot else "on-demand",
            total_target_capacity=group.count,
        ),
        spot_options=(
            aws.ec2.FleetSpotOptionsArgs(
                allocation_strategy="price-capacity-optimized",
                instance_interruption_behavior="terminate",
                # all or nothing: one type in one zone (the subnet's), the whole group
                single_instance_type=True,
                single_availability_zone=True,
                min_target_capacity=group.count,
            )
            if group.spot
            else None
        ),
        on_demand_options=(
            None
            if group.spot
            else aws.ec2.FleetOnDemandOptionsArgs(
                allocation_strategy="lowest-price",
                single_instance_type=True,
                single_availability_zone=True,
                min_target_capacity=group.count,
            )
        ),
        terminate_instances=True,  # the fleet's destroy takes its instances with it
        tags={**tags, "squall-group": group.name},
        opts=opts,
    )
