"""The price catalog: instance types per cloud and region, and data-transfer fees, dated and
with the source of every figure.

A catalog comes from one of two places:
- the one that ships inside the package (`federate/data/`, one JSON file per cloud in
  Squall's own format, see `catalog_file.py`), written by `scripts/build-catalog.py` from the
  dated reference snapshot; `shipped()` reads it;
- a folder named by the user (`--catalog`, `$SQUALL_CATALOG`): Squall's own format (what
  `squall catalog refresh` writes), or the reference snapshot's CSV layout (`snapshot.py`).
`load(folder)` reads either. The prices of the clouds' managed file systems (what a run's
volumes cost, `storage.py`) come from the folder's `storage.json`, else from the shipped one.

Units: memory in GiB, prices in USD per hour and per GB (10^9 bytes). A TB in a volume tier is
1,024 GB, as the clouds bill it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from .storage import StorageService, read_storage

__all__ = [
    "STALE_DAYS",
    "Catalog",
    "CloudMeta",
    "EgressFees",
    "InstanceType",
    "Tier",
    "age_days",
    "continent",
    "load",
    "open_catalog",
    "shipped",
    "shipped_storage",
]

FABRICS = ("efa", "infiniband", "gpudirect-tcpx", "gpudirect-tcpxo", "gpudirect-rdma")
CLOUDS = ("aws", "gcp", "azure")
STALE_DAYS = 90  # `catalog show` warns about prices older than this


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


@dataclass(frozen=True, slots=True)
class CloudMeta:
    """Where one cloud's figures come from, and the date of the data."""

    date: str  # YYYY-MM-DD, or "undated"
    sources: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class Catalog:
    date: str  # the oldest of its clouds' dates
    instances: list[InstanceType]
    egress: dict[tuple[str, str], EgressFees]
    meta: dict[str, CloudMeta] = field(default_factory=dict)  # per cloud
    origin: str = ""  # where it was read from, as a person reads it
    storage: dict[str, StorageService] = field(default_factory=dict)  # cloud -> file system

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


def age_days(date: str, today: dt.date | None = None) -> int | None:
    """How many days old a catalog date is (None: undated)."""
    try:
        day = dt.date.fromisoformat(date)
    except ValueError:
        return None
    return ((today or dt.date.today()) - day).days


def load(path: Path) -> Catalog:
    """A catalog folder: Squall's own format (`aws.json`, `gcp.json`, `azure.json`), or the
    reference snapshot's layout (`instances.csv`, `egress.csv`). Raises OSError or ValueError
    with what is wrong."""
    from . import catalog_file, snapshot

    if catalog_file.holds_catalog(path):
        return _with_storage(catalog_file.read(path, origin=str(path)), path)
    if (path / "instances.csv").exists():
        return _with_storage(snapshot.load_snapshot(path), path)
    raise FileNotFoundError(
        f"no catalog in {path}: expected {', '.join(f'{c}.json' for c in CLOUDS)} "
        "(what `squall catalog refresh` writes) or the snapshot's instances.csv and egress.csv"
    )


SHIPPED = "shipped with Squall"
STORAGE_FILE = "storage.json"


def _with_storage(catalog: Catalog, folder: Path) -> Catalog:
    """`catalog` with the managed file systems' prices of `folder`, else the shipped ones."""
    path = folder / STORAGE_FILE
    catalog.storage = read_storage(path) if path.is_file() else shipped_storage()
    return catalog


@cache
def _shipped_storage() -> dict[str, StorageService]:
    with resources.as_file(resources.files(__package__) / "data" / STORAGE_FILE) as path:
        return read_storage(path)


def shipped_storage() -> dict[str, StorageService]:
    """The managed file systems' prices inside the package (do not change them)."""
    return _shipped_storage()


@cache
def _shipped() -> Catalog:
    from . import catalog_file

    folder = resources.files(__package__) / "data"
    with resources.as_file(folder) as path:
        return _with_storage(catalog_file.read(path, origin=SHIPPED), path)


def shipped() -> Catalog:
    """The catalog inside the package (read once per process; do not change it)."""
    return _shipped()


def open_catalog(folder: Path | None) -> Catalog:
    """`folder`'s catalog, or the shipped one when none is named."""
    return load(folder) if folder is not None else shipped()
