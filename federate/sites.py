"""Sites other than cloud regions: on-prem clusters declared in configuration, and the local
site (this machine). Each becomes a `Site` whose node shape is priced from an internal rate
(zero by default), with a node count.

    sites:
      lab:
        region: us-west-2          # where it is: residency, and which cloud region is near
        nodes: 16
        shape: {cores: 64, memory-gib: 256, gpus: 4, gpu-model: A100, fabric: infiniband}
        price: {core-hour: 0.01, gpu-hour: 0.40}
        reads-free: [aws:us-west-2]  # stores it reads without fees (a private link)
        storage: nfs-first-node      # where a run's volumes live (below)
    buckets:                       # where the team's object stores live
      genomes: aws:us-west-2
    storage:                       # per cloud, or CLOUD:REGION (which wins)
      aws: nfs-first-node
      gcp:europe-west4: managed
    local:                         # this machine, charged at an internal rate (default free)
      price: {core-hour: 0.02}
    persistent:                    # the NFS share that keeps persistent volumes, likewise
      aws:us-east-1:
        share: fs-0123456789abcdef0.efs.us-east-1.amazonaws.com:/
        subnet: subnet-0123456789abcdef0   # where runs that use it go, to reach it
        cidr: 10.0.8.0/24                  # that subnet's range

Storage is where a cluster keeps a run's volumes: `node-local` (the node's own disk, for a
cluster of one node), `nfs-first-node` (the first node's disk, shared over NFS) or `managed`
(the cloud's NFS file system, priced). A site that names none gets node-local for one node,
else the cloud's file system (`storage.storage_class`).

Persistent volumes outlive runs, so a cloud cluster's storage, which goes with its stack,
cannot keep them: a cloud region keeps them on a share of the team's own, named under
`persistent:` (an NFS export, `HOST:/PATH`, such as an EFS file system, a Filestore instance or
an Azure Files NFS share), which every node of a run that uses one mounts. Such a share is
reached from its own network: a run that uses it joins the existing subnet named with it
(`subnet:`, with its range `cidr:`) instead of making a network of its own; a share given
alone (`aws: HOST:/PATH`) must be reachable from a run's new network. The subnet is what the
cloud's program takes for one: an AWS subnet id, a GCP subnetwork's self link, an Azure
subnet's resource id. A region without a share cannot run a workflow with persistent
volumes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .catalog import InstanceType
from .placement import Site
from .policy import PolicyError
from .storage import CLASSES

__all__ = [
    "PersistentShare",
    "bucket_locations",
    "cloud_storage",
    "local_price",
    "local_site",
    "onprem_sites",
    "persistent_shares",
    "with_persistent_shares",
    "with_storage",
]


def _shape_type(
    kind: str, name: str, region: str, shape: dict[str, Any], price: dict[str, Any]
) -> InstanceType:
    cores = int(shape.get("cores", 1))
    gpus = int(shape.get("gpus", 0))
    hourly = cores * float(price.get("core-hour", 0)) + gpus * float(price.get("gpu-hour", 0))
    return InstanceType(
        cloud=kind,
        region=region,
        name=f"{name} node",
        vcpus=cores,
        memory_gib=float(shape.get("memory-gib", 0)),
        gpu_model=str(shape.get("gpu-model", "")),
        gpu_count=gpus,
        gpu_memory_gib=0.0,
        price_ondemand=hourly,
        price_spot=None,
        fabric=str(shape.get("fabric", "none")),
        network_gbps=None,
        efa_interfaces=0,
        arch=str(shape.get("arch", "x86_64")),
        source="site configuration",
    )


def onprem_sites(path: Path) -> list[Site]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    sites = []
    for name, spec in (data.get("sites") or {}).items():
        if not isinstance(spec, dict) or "shape" not in spec or "nodes" not in spec:
            raise PolicyError(f"{path}: site {name!r} needs `nodes` and `shape`")
        region = str(spec.get("region", ""))
        node = _shape_type("onprem", str(name), region, spec["shape"], spec.get("price") or {})
        sites.append(
            Site(
                name=str(name),
                kind="onprem",
                region=region,
                types=(node,),
                max_nodes=int(spec["nodes"]),
                free_from=frozenset(map(str, spec.get("reads-free") or [])),
                storage=_storage_class(path, f"site {name!r}", spec.get("storage")),
            )
        )
    return sites


def _storage_class(path: Path, where: str, value: object) -> str | None:
    if value is None:
        return None
    if value not in CLASSES:
        raise PolicyError(f"{path}: {where}: storage is one of {', '.join(CLASSES)}, not {value!r}")
    return str(value)


def _section(path: Path, name: str, maps: str) -> dict[Any, Any]:
    """The mapping under `name` in the sites file (empty when absent); `maps`: what it maps,
    for the error when it is not a mapping."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: {name} maps {maps}")
    return section


def cloud_storage(path: Path) -> dict[str, str]:
    """The `storage:` section: CLOUD or CLOUD:REGION -> the storage its clusters use."""
    section = _section(path, "storage", "a CLOUD or CLOUD:REGION to a storage class")
    return {str(k): str(_storage_class(path, f"storage of {k}", v)) for k, v in section.items()}


@dataclass(frozen=True, slots=True)
class PersistentShare:
    """A region's share of persistent volumes: the NFS export, and the existing subnet (id
    and range) a run joins to reach it (None: the run's own network reaches it)."""

    share: str
    subnet: tuple[str, str] | None = None


def persistent_shares(path: Path) -> dict[str, PersistentShare]:
    """The `persistent:` section: CLOUD or CLOUD:REGION -> the NFS share (`HOST:/PATH`, or
    `{share: HOST:/PATH, subnet: ID, cidr: RANGE}`) that keeps persistent volumes there."""
    section = _section(path, "persistent", "a CLOUD or CLOUD:REGION to an NFS share")
    return {str(where): _share(path, str(where), value) for where, value in section.items()}


def _share(path: Path, where: str, value: object) -> PersistentShare:
    what = f"{path}: persistent of {where}"
    spec = value if isinstance(value, dict) else {"share": value}
    unknown = set(spec) - {"share", "subnet", "cidr"}
    if unknown:
        raise PolicyError(f"{what}: unknown {', '.join(sorted(map(str, unknown)))}")
    share = str(spec.get("share", ""))
    host, _, folder = share.partition(":")
    if not (host and folder.startswith("/")) or any(c.isspace() for c in share):
        raise PolicyError(f"{what}: an NFS share is HOST:/PATH, not {share!r}")
    if ("subnet" in spec) != ("cidr" in spec):
        raise PolicyError(f"{what}: give the subnet and its range (cidr) together")
    if "subnet" not in spec:
        return PersistentShare(share)
    subnet = spec["subnet"]
    if not isinstance(subnet, str) or not subnet or any(c.isspace() for c in subnet):
        raise PolicyError(f"{what}: subnet is the id of one subnet, not {subnet!r}")
    if ":" not in where:
        raise PolicyError(f"{what}: a subnet is a region's: name it under CLOUD:REGION")
    try:
        network = ipaddress.ip_network(str(spec["cidr"]))  # the subnet's range, exactly
    except ValueError as exc:
        raise PolicyError(f"{what}: cidr: {exc}") from None
    if network.prefixlen < 16:  # the run's volumes are opened to this range
        raise PolicyError(f"{what}: cidr {network} is wider than a subnet (/16 at most)")
    return PersistentShare(share, (subnet, str(network)))


def with_persistent_shares(sites: list[Site], shares: dict[str, PersistentShare]) -> list[Site]:
    """The cloud sites with the share `persistent_shares` names for them (CLOUD:REGION over
    CLOUD); the others as they are."""
    out = []
    for site in sites:
        found = shares.get(site.name, shares.get(site.cloud)) if site.kind == "cloud" else None
        if found is None:
            out.append(site)
        else:
            out.append(replace(site, persistent_share=found.share, persistent_subnet=found.subnet))
    return out


def with_storage(sites: list[Site], storage: dict[str, str]) -> list[Site]:
    """The cloud sites with the storage `cloud_storage` names for them (CLOUD:REGION over
    CLOUD); the others as they are."""
    out = []
    for site in sites:
        chosen = storage.get(site.name, storage.get(site.cloud)) if site.kind == "cloud" else None
        out.append(replace(site, storage=chosen) if chosen else site)
    return out


def bucket_locations(path: Path) -> dict[str, str]:
    """The `buckets:` section: bucket name -> CLOUD:REGION."""
    buckets = _section(path, "buckets", "a bucket name to CLOUD:REGION")
    if not all(isinstance(v, str) and ":" in v for v in buckets.values()):
        raise PolicyError(f"{path}: buckets maps a bucket name to CLOUD:REGION")
    return {str(k): v for k, v in buckets.items()}


def vm_site(cores: int, memory_gib: float, nodes: int) -> Site:
    """Virtual machines on this machine, booted from the node image (`--site vm`): free,
    `nodes` of them at most, each of `cores` and `memory_gib`."""
    shape = {"cores": cores, "memory-gib": memory_gib}
    return Site(
        name="vm",
        kind="vm",
        types=(_shape_type("vm", "a VM on this machine", "", shape, {}),),
        max_nodes=nodes,
    )


def local_price(path: Path) -> dict[str, float]:
    """The `local:` section's `price:` (`core-hour`, `gpu-hour`): what a team charges itself
    for this machine; empty (free) when the file names none."""
    section = _section(path, "local", "`price` to {core-hour: USD, gpu-hour: USD}")
    unknown = set(section) - {"price"}
    if unknown:
        raise PolicyError(f"{path}: local: unknown {', '.join(sorted(map(str, unknown)))}")
    price = section.get("price") or {}
    if not isinstance(price, dict) or set(price) - {"core-hour", "gpu-hour"}:
        raise PolicyError(f"{path}: local: price maps core-hour and gpu-hour to USD")
    out = {}
    for key, value in price.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PolicyError(f"{path}: local: price {key} must be a number of USD, at least 0")
        out[str(key)] = float(value)
    return out


def local_site(
    cores: int,
    memory_gib: float,
    gpus: int = 0,
    gpu_model: str = "",
    nodes: int = 1,
    price: dict[str, float] | None = None,
) -> Site:
    """This machine, as big as it is: free to use unless `price` (`local_price`) says what
    a team charges itself for it."""
    shape = {"cores": cores, "memory-gib": memory_gib, "gpus": gpus, "gpu-model": gpu_model}
    return Site(
        name="local",
        kind="local",
        types=(_shape_type("local", "this machine", "", shape, price or {}),),
        max_nodes=nodes,
    )
