"""The reference snapshot's layout: a folder with `instances.csv` (one row per cloud, region
and type) and `egress.csv` (fees per cloud, source region and destination class), as in the
dated snapshot the tests use and the shipped catalog is built from.

The snapshot states its egress volume tiers in words ("first 100 GB/month free", "next 40
TB/month"); they are read into explicit per-GB bands here, the one place that knows how. GCP
publishes per GiB; its fees are converted to per GB.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

from .catalog import Catalog, CloudMeta, EgressFees, InstanceType, Tier

__all__ = ["GIB_PER_GB", "load_snapshot", "snapshot_date"]

GIB_PER_GB = 1e9 / 2**30  # a per-GiB price times this is the per-GB price


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


def snapshot_date(path: Path) -> str:
    """The date of a snapshot folder: the newest date its README names, else "undated"."""
    readme = path / "README.md"
    found = re.findall(r"\d{4}-\d{2}-\d{2}", readme.read_text()) if readme.exists() else []
    return max(found) if found else "undated"


def load_snapshot(path: Path) -> Catalog:
    """A folder in the snapshot's layout (instances.csv, egress.csv), dated by its README."""
    date = snapshot_date(path)
    instances = _instances(path / "instances.csv")
    egress = _egress(path / "egress.csv")
    meta = {}
    for cloud in sorted({i.cloud for i in instances} | {c for c, _ in egress}):
        sources = {i.source for i in instances if i.cloud == cloud}
        sources |= {s for (c, _), fees in egress.items() if c == cloud for s in fees.sources}
        meta[cloud] = CloudMeta(date, tuple(sorted(sources)))
    return Catalog(date, instances, egress, meta, origin=str(path))
