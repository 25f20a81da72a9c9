"""The boot scripts of a cluster with volumes, as Pulumi Outputs: what each program shares.

A node's script names the share it mounts, and that address is known only once the cloud
made it (the managed file system's, or node 0's private address under nfs-first-node). So
the scripts are Outputs of those addresses, and marked secret (they carry the join token).

Node 0's address is passed to the others as an Output rather than fixed in advance: it holds
in an existing subnet too, where Squall cannot know which addresses are free, and each cloud
reserves different ones in a subnet it made. The cost is that the other nodes are created
once node 0 has its address (seconds after it is requested); they wait for its export at
boot anyway.
"""

from __future__ import annotations

from typing import TypeAlias

import pulumi

from .bootstrap import NFS_SERVER_OPTIONS, NfsExport, NfsMount, startup_script
from .spec import VOLUME_ROOT, ClusterSpec, NodeGroup, StorageClass

__all__ = ["Mount", "boot_script", "exports", "first_node_mount"]

Mount: TypeAlias = "NfsMount | pulumi.Output[NfsMount] | None"


def exports(spec: ClusterSpec, group: NodeGroup, index: int) -> bool:
    """Whether this node serves the run's volumes to the others (nfs-first-node's node 0)."""
    storage = spec.storage
    return (
        storage is not None
        and storage.storage_class is StorageClass.NFS_FIRST_NODE
        and spec.holds_volumes(group, index)
    )


def first_node_mount(private_ip: pulumi.Output[str]) -> pulumi.Output[NfsMount]:
    """What every other node mounts under nfs-first-node: node 0's export."""
    return private_ip.apply(lambda ip: NfsMount(f"{ip}:{VOLUME_ROOT}", NFS_SERVER_OPTIONS))


def boot_script(
    spec: ClusterSpec, group: NodeGroup, mount: Mount, *, index: int | None = None
) -> pulumi.Output[str]:
    """The boot script of node `index` of `group` (None: any of the group's pooled nodes),
    secret: it mounts `mount` (none for node-local storage, for the exporting node, or
    without storage), or serves the volumes when this node exports them."""
    export = index is not None and exports(spec, group, index)
    served = NfsExport(spec.network.cidr) if export else None
    if export:
        mount = None  # it serves the volumes from its own disk
    if isinstance(mount, pulumi.Output):
        script = mount.apply(
            lambda m: startup_script(spec, group, mount=m, export=served, index=index)
        )
    else:
        script = pulumi.Output.from_input(
            startup_script(spec, group, mount=mount, export=served, index=index)
        )
    return pulumi.Output.secret(script)
