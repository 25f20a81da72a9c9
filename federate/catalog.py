"""The price catalog: instance types per cloud and region, and data-transfer fees, dated and
with the source of every figure.

`load(path)` reads a catalog folder: `instances.csv` (one row per cloud, region and type) and
`egress.csv` (fees per cloud, source region and destination class, with volume tiers). The
columns are those of the dated reference snapshot the tests use; the egress tiers, which
that snapshot states in words ("first 100 GB/month free", "next 40 TB/month"), are read into
explicit per-GB bands here, the one place that knows how.

Units: memory in GiB, prices in USD per hour and per GB. GCP publishes per GiB; its fees are
converted to per GB. A TB in a tier is 1,024 GB, as the clouds bill it.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Catalog",
    "EgressFees",
    "InstanceType",
    "Tier",
    "catalog_date",
    "continent",
    "load",
]

GIB_PER_GB = 1e9 / 2**30  # a per-GiB price times this is the per-GB price
FABRICS = ("efa", "infiniband", "gpudirect-tcpx", "gpudirect-tcpxo", "gpudirect-rdma")


@dataclass(frozen=True, slots=True)
class InstanceType:
    cloud: str
    region: str
    name: str
    vcpus: int
    memory_gib: float
    gpu_model: str  # "" when none
    gpu_count: float
    gpu_memory_gib: float
    price_ondemand: float | None  # USD per hour; None: not sold on demand
    price_spot: float | None
    fabric: str  # efa, infiniband, gpudirect-*, tier1, none
    network_gbps: float | None
    efa_interfaces: int
    arch: str
    source: str

    @property
    def hpc_fabric(self) -> bool:
        """An RDMA-class fabric for multi-node jobs (EFA, InfiniBand, GPUDirect)."""
        return self.fabric in FABRICS


@dataclass(frozen=True, slots=True)
class Tier:
    upto_gb: float  # cumulative monthly volume this band ends at (inf for the last)
    usd_per_gb: float


@dataclass(frozen=True, slots=True)
class EgressFees:
    """What one cloud region charges for data leaving it, by destination class."""

    cloud: str
    region: str
    internet: tuple[Tier, ...]
    same_region: float  # object storage to compute in the region
    same_continent: float
    pairs: dict[str, float] = field(default_factory=dict)  # region -> cheaper pair rate
    other_continent: float = 0.0
    sources: tuple[str, ...] = ()

    def internet_cost(self, gb: float, *, free_allowance: bool = False) -> float:
        """The cost of `gb` to the internet (or another cloud), tier by tier from the start
        of the month. Without `free_allowance`, free bands are priced at the next band's
        rate: the allowance is per account and month, so a run should not count on it."""
        tiers = list(self.internet)
        if not free_allowance:
            paid = [t for t in tiers if t.usd_per_gb > 0]
            tiers = [Tier(t.upto_gb, paid[0].usd_per_gb) if t.usd_per_gb == 0 else t for t in tiers]
        cost, start = 0.0, 0.0
        for tier in tiers:
            if gb <= start:
                break
            band = min(gb, tier.upto_gb) - start
            cost += band * tier.usd_per_gb
            start = tier.upto_gb
        return cost


@dataclass(slots=True)
class Catalog:
    date: str
    instances: list[InstanceType]
    egress: dict[tuple[str, str], EgressFees]

    def regions(self) -> list[tuple[str, str]]:
        return sorted({(i.cloud, i.region) for i in self.instances})

    def types_in(self, cloud: str, region: str) -> list[InstanceType]:
        return [i for i in self.instances if i.cloud == cloud and i.region == region]


def continent(cloud: str, region: str) -> str:
    """NA, EU or AS, from a region's name (enough for the catalog's regions)."""
    r = region.lower()
    if r.startswith(("eu-", "europe-")) or r in ("westeurope", "northeurope", "swedencentral"):
        return "EU"
    if r.startswith(("ap-", "asia-", "australia")) or "asia" in r or "japan" in r:
        return "AS"
    return "NA"


def _float(text: str) -> float | None:
    return float(text) if text.strip() else None


def _instances(path: Path) -> list[InstanceType]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                InstanceType(
                    cloud=r["cloud"],
                    region=r["region"],
                    name=r["instance_type"],
                    vcpus=int(float(r["vcpus"])),
                    memory_gib=float(r["memory_gib"]),
                    gpu_model=r["gpu_model"],
                    gpu_count=float(r["gpu_count"] or 0),
                    gpu_memory_gib=float(r["gpu_memory_gib"] or 0),
                    price_ondemand=_float(r["price_ondemand_usd_hr"]),
                    price_spot=_float(r["price_spot_usd_hr"]),
                    fabric=r["hpc_network"] or "none",
                    network_gbps=_float(r["network_gbps"]),
                    efa_interfaces=int(r["max_efa_interfaces"] or 0),
                    arch=r["arch"],
                    source=r["source"],
                )
            )
    return rows


_AMOUNT = r"(\d+(?:\.\d+)?)\s*(GB|TB|GiB|TiB)"


def _gb(amount: str, unit: str) -> float:
    scale = {"GB": 1.0, "TB": 1024.0, "GiB": 2**30 / 1e9, "TiB": 2**40 / 1e9}[unit]
    return float(amount) * scale


def _internet_tiers(rows: list[dict[str, str]]) -> tuple[Tier, ...]:
    """Volume bands from the snapshot's words, in the order the rows give them."""
    tiers: list[Tier] = []
    start = 0.0
    for r in rows:
        note = r["tier_note"]
        if "Standard Tier" in note:
            continue  # Premium (the default network tier) is what a VM egresses on
        price = float(r["usd_per_gb"]) * (GIB_PER_GB if r["cloud"] == "gcp" else 1.0)
        if (m := re.search(r"first " + _AMOUNT, note)) or (
            m := re.search(r"up to " + _AMOUNT, note)
        ):
            end = _gb(*m.groups())
        elif m := re.search(r"next " + _AMOUNT, note):
            end = start + _gb(*m.groups())
        elif m := re.search(r"(\d+)-(\d+)\s*(TiB|TB)", note):
            end = _gb(m.group(2), m.group(3))
        elif re.search(r">\s*" + _AMOUNT, note):
            end = math.inf
        else:
            raise ValueError(
                f"cannot read the egress tier {note!r} ({r['cloud']} {r['from_region']})"
            )
        tiers.append(Tier(end, price))
        start = end
    if tiers and tiers[-1].upto_gb != math.inf:
        tiers.append(Tier(math.inf, tiers[-1].usd_per_gb))
    return tuple(tiers)


def _egress(path: Path) -> dict[tuple[str, str], EgressFees]:
    grouped: defaultdict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            grouped[(r["cloud"], r["from_region"])].append(r)
    fees = {}
    for (cloud, region), rows in grouped.items():
        scale = GIB_PER_GB if cloud == "gcp" else 1.0

        def rate(to: str, rows: list[dict[str, str]] = rows, scale: float = scale) -> float:
            found = [
                float(r["usd_per_gb"]) * scale
                for r in rows
                if r["to"] == to and "only the" not in r["tier_note"]
            ]
            return found[0] if found else 0.0

        pairs = {}
        for r in rows:
            if m := re.search(r"only the (\S+)<->(\S+) pair", r["tier_note"]):
                other = m.group(2) if m.group(1) == region else m.group(1)
                pairs[other] = float(r["usd_per_gb"]) * scale
        same_region = [
            float(r["usd_per_gb"]) * scale
            for r in rows
            if r["to"] == "same-region" and "object storage" in r["tier_note"]
        ]
        fees[(cloud, region)] = EgressFees(
            cloud=cloud,
            region=region,
            internet=_internet_tiers([r for r in rows if r["to"] == "internet"]),
            same_region=same_region[0] if same_region else 0.0,
            same_continent=rate("inter-region-same-continent"),
            pairs=pairs,
            other_continent=rate("inter-region"),
            sources=tuple(sorted({r["source"] for r in rows})),
        )
    return fees


def catalog_date(path: Path) -> str:
    """The date of a catalog folder: `date:` in its catalog.yaml (written by a refresh), else
    the newest date its README names (the reference snapshot), else "undated"."""
    meta = path / "catalog.yaml"
    if meta.exists():
        m = re.search(r"^date:\s*['\"]?(\d{4}-\d{2}-\d{2})", meta.read_text(), re.M)
        if m:
            return m.group(1)
    readme = path / "README.md"
    found = re.findall(r"\d{4}-\d{2}-\d{2}", readme.read_text()) if readme.exists() else []
    return max(found) if found else "undated"


def load(path: Path, date: str = "") -> Catalog:
    """A catalog folder (instances.csv, egress.csv)."""
    if not date:
        date = catalog_date(path)
    return Catalog(
        date=date, instances=_instances(path / "instances.csv"), egress=_egress(path / "egress.csv")
    )
