"""What a run's volumes cost at a cloud site: the managed NFS file system its stack makes
(EFS, Filestore, Azure Files), for as long as the run lasts.

The prices are dated facts with their sources, in `storage.json` (Squall's own format, shipped
in `federate/data/`, entered by hand from the pages named in it; a catalog folder may carry
its own). A file system is billed on its capacity: EFS on what is stored (no minimum),
Filestore and Azure Files on what is provisioned, at least their minimum and in their steps.
A price the sources did not give is null: such storage is priced at 0, and said.

Which storage a site uses follows one rule, `storage_class`, the same as the cluster's
(`infra.spec.storage_for`, which federate may not import; a test keeps the two equal): what
the site asks for, else the node's own disk for one node, else the cloud's file system.
Only the managed file system costs anything here: node-local and nfs-first-node volumes live
on a node's disk, which compute prices do not separate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLASSES",
    "FORMAT",
    "HOURS_PER_MONTH",
    "StoragePrice",
    "StorageService",
    "billed_gib",
    "read_storage",
    "storage_class",
    "storage_cost",
]

FORMAT = "squall-storage/1"
HOURS_PER_MONTH = 730  # how the clouds turn a monthly price into an hourly one
CLASSES = ("node-local", "nfs-first-node", "managed")
_CLOUDS = ("aws", "gcp", "azure")
_BYTES = {"GB": 1e9, "GiB": 2**30}


@dataclass(frozen=True, slots=True)
class StoragePrice:
    usd_per_month: float  # per unit (the service's) and month of billed capacity
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StorageService:
    """One cloud's managed file system, as Squall's stacks make it."""

    cloud: str
    name: str
    unit: str  # what a price is per: GB or GiB
    # billed capacity in GiB: (smallest, largest, step) ranges, the first that holds the
    # volumes; none: billed as used
    ranges: tuple[tuple[int, int, int], ...]
    max_gib: int | None
    prices: dict[str, StoragePrice] = field(default_factory=dict)  # region -> price
    missing: str = ""  # which prices the sources did not give, and why
    date: str = ""  # when the prices were read


def storage_class(site_cloud: str, nodes: int, preferred: str | None) -> str:
    """The storage a cluster of `nodes` nodes gets: `infra.spec.storage_for`'s rule. Raises
    ValueError, saying why, for a choice that cannot hold the volumes."""
    if preferred is None:
        if nodes == 1:
            return "node-local"
        return "managed" if site_cloud in _CLOUDS else "nfs-first-node"
    if preferred not in CLASSES:
        raise ValueError(f"storage {preferred!r} is not one of {', '.join(CLASSES)}")
    if preferred == "node-local" and nodes != 1:
        raise ValueError(
            f"node-local storage is for a cluster of one node; this one has {nodes} "
            "(use nfs-first-node or managed)"
        )
    if preferred == "managed" and site_cloud not in _CLOUDS:
        raise ValueError(f"managed storage is made by a cloud's stack; {site_cloud} has none")
    return preferred


def billed_gib(service: StorageService, size_gib: int) -> int:
    """The capacity the cloud bills for `size_gib` of volumes. Raises ValueError when the
    file system cannot hold them."""
    if service.max_gib is not None and size_gib > service.max_gib:
        raise ValueError(
            f"{size_gib:,} GiB of volumes is more than {service.name} holds "
            f"({service.max_gib:,} GiB)"
        )
    for low, high, step in service.ranges:
        capacity = max(low, math.ceil(size_gib / step) * step)
        if capacity <= high:
            return capacity
    return size_gib


def storage_cost(
    services: dict[str, StorageService], cloud: str, region: str, size_gib: int, hours: float
) -> tuple[float, list[str]]:
    """The managed file system's cost for `hours` at `cloud:region`, and which figures are
    guesses. Raises ValueError when it cannot hold the volumes."""
    service = services.get(cloud)
    if service is None:
        return 0.0, [f"storage: no managed file system priced for {cloud}; priced at 0"]
    capacity = billed_gib(service, size_gib)
    guesses = []
    price = service.prices.get(region)
    if price is None and service.prices:
        near, price = sorted(service.prices.items())[0]
        guesses.append(
            f"storage: no {service.name} price for {region} in the catalog; "
            f"priced at {near}'s ${price.usd_per_month:g}/{service.unit}-month"
        )
    if price is None:
        return 0.0, [f"storage: no {service.name} price in the catalog; priced at 0"]
    units = capacity * 2**30 / _BYTES[service.unit]
    return units * price.usd_per_month * hours / HOURS_PER_MONTH, guesses


# ---- the file ---------------------------------------------------------------------------------


def _service(cloud: str, doc: dict[str, Any], date: str) -> StorageService:
    unit = str(doc["unit"])
    if unit not in _BYTES:
        raise ValueError(f"{cloud}: unit {unit!r} is not GB or GiB")
    prices = {}
    for region, entry in doc.get("prices", {}).items():
        if entry.get("usd_per_month") is None:
            continue
        sources = tuple(entry.get("sources", ()))
        if not sources:
            raise ValueError(f"{cloud} {region}: a price without its source")
        prices[str(region)] = StoragePrice(float(entry["usd_per_month"]), sources)
    ranges = tuple((int(a), int(b), int(c)) for a, b, c in doc.get("ranges", ()))
    max_gib = doc.get("max_gib")
    return StorageService(
        cloud=cloud,
        name=str(doc["name"]),
        unit=unit,
        ranges=ranges,
        max_gib=None if max_gib is None else int(max_gib),
        prices=prices,
        missing=str(doc.get("missing", "")),
        date=date,
    )


def read_storage(path: Path) -> dict[str, StorageService]:
    """A `storage.json` file: cloud -> its managed file system and prices. Raises ValueError
    naming the file when it is not in this format."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    date = str(doc.get("date", "undated"))
    try:
        return {
            str(cloud): _service(str(cloud), service, date)
            for cloud, service in doc["services"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc.__class__.__name__}: {exc}") from None
