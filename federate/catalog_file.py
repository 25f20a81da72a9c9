"""Squall's own catalog format: one JSON file per cloud (`aws.json`, `gcp.json`,
`azure.json`), what ships in `federate/data/` and what `squall catalog refresh` writes.

Each file starts with a header (the format, the cloud, the date of the data, its sources and
notes), then:
- `types`: each instance type's shape, once (vCPUs, memory GiB, GPUs, fabric, network Gbps,
  EFA interfaces, architecture);
- `prices`: per region, per type `[on-demand, spot]` in USD per hour (null: not sold that way),
  with a third element when that row's source differs from the file's `price_source`;
- `egress`: per source region, USD per GB (10^9 bytes): `internet` volume bands as
  `[cumulative GB per month the band ends at (null: no end), rate]`, `same_region` (object
  storage to compute), `same_continent`, `pairs` (cheaper region pairs), `other_continent`.

Figures are stored per GB even for GCP (which bills per GiB), so no reader converts anything.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .catalog import CLOUDS, Catalog, CloudMeta, EgressFees, InstanceType, Tier

__all__ = ["FORMAT", "holds_catalog", "read", "write"]

FORMAT = "squall-catalog/1"
UNITS = (
    "vcpus; memory and GPU memory in GiB; prices in USD per hour; egress in USD per GB "
    "(10^9 bytes); internet bands end at a cumulative monthly volume in GB (1 TB = 1,024 GB)"
)


def holds_catalog(folder: Path) -> bool:
    return any((folder / f"{cloud}.json").is_file() for cloud in CLOUDS)


# ---- reading ----------------------------------------------------------------------------------


def _instances(cloud: str, doc: dict[str, Any], where: Path) -> list[InstanceType]:
    types: dict[str, dict[str, Any]] = doc["types"]
    default_source = doc.get("price_source", "")
    out = []
    for region, priced in doc["prices"].items():
        for name, entry in priced.items():
            shape = types.get(name)
            if shape is None:
                raise ValueError(f"{where}: prices.{region}.{name} names no type in `types`")
            gpu = shape.get("gpu") or {}
            ondemand, spot, *rest = entry
            out.append(
                InstanceType(
                    cloud=cloud,
                    region=region,
                    name=name,
                    vcpus=int(shape["vcpus"]),
                    memory_gib=float(shape["memory_gib"]),
                    gpu_model=str(gpu.get("model", "")),
                    gpu_count=float(gpu.get("count", 0)),
                    gpu_memory_gib=float(gpu.get("memory_gib", 0)),
                    price_ondemand=None if ondemand is None else float(ondemand),
                    price_spot=None if spot is None else float(spot),
                    fabric=str(shape.get("fabric", "none")),
                    network_gbps=None
                    if shape.get("network_gbps") is None
                    else float(shape["network_gbps"]),
                    efa_interfaces=int(shape.get("efa_interfaces", 0)),
                    arch=str(shape.get("arch", "x86_64")),
                    source=str(rest[0]) if rest else default_source,
                )
            )
    return out


def _egress(cloud: str, doc: dict[str, Any]) -> dict[tuple[str, str], EgressFees]:
    fees = {}
    for region, e in doc.get("egress", {}).items():
        fees[(cloud, region)] = EgressFees(
            cloud=cloud,
            region=region,
            internet=tuple(
                Tier(math.inf if upto is None else float(upto), float(rate))
                for upto, rate in e["internet"]
            ),
            same_region=float(e["same_region"]),
            same_continent=float(e["same_continent"]),
            pairs={str(k): float(v) for k, v in e.get("pairs", {}).items()},
            other_continent=float(e["other_continent"]),
            sources=tuple(e.get("sources", ())),
        )
    return fees


def read(folder: Path, origin: str = "") -> Catalog:
    """The clouds present in `folder`. Raises ValueError naming the file when one is not in
    this format."""
    instances: list[InstanceType] = []
    egress: dict[tuple[str, str], EgressFees] = {}
    meta: dict[str, CloudMeta] = {}
    for cloud in CLOUDS:
        path = folder / f"{cloud}.json"
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("cloud") != cloud:
            raise ValueError(f"{path}: not a {FORMAT} file for {cloud}")
        try:
            instances += _instances(cloud, doc, path)
            egress |= _egress(cloud, doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc.__class__.__name__}: {exc}") from None
        meta[cloud] = CloudMeta(
            str(doc.get("date", "undated")),
            tuple(doc.get("sources", ())),
            tuple(doc.get("notes", ())),
        )
    dates = [m.date for m in meta.values()]
    date = "undated" if not dates or "undated" in dates else min(dates)
    return Catalog(date, instances, egress, meta, origin or str(folder))


# ---- writing ----------------------------------------------------------------------------------


def _num(x: float) -> float | int:
    """Integral figures as integers, others rounded past float noise."""
    if float(x).is_integer():
        return int(x)
    return round(float(x), 10)


def _price(x: float | None) -> float | int | None:
    return None if x is None else _num(x)


def document(catalog: Catalog, cloud: str) -> dict[str, Any]:
    """One cloud of `catalog` as this format's document."""
    rows = sorted(
        (i for i in catalog.instances if i.cloud == cloud), key=lambda i: (i.region, i.name)
    )
    meta = catalog.meta.get(cloud, CloudMeta(catalog.date))
    common = Counter(i.source for i in rows).most_common(1)
    default_source = common[0][0] if common else ""
    types: dict[str, dict[str, Any]] = {}
    for i in sorted(rows, key=lambda i: i.name):
        shape: dict[str, Any] = {"vcpus": i.vcpus, "memory_gib": _num(i.memory_gib)}
        if i.gpu_count:
            shape["gpu"] = {
                "model": i.gpu_model,
                "count": _num(i.gpu_count),
                "memory_gib": _num(i.gpu_memory_gib),
            }
        shape |= {
            "fabric": i.fabric,
            "network_gbps": _price(i.network_gbps),
            "efa_interfaces": i.efa_interfaces,
            "arch": i.arch,
        }
        if types.setdefault(i.name, shape) != shape:
            raise ValueError(f"{cloud} {i.name}: its shape differs between regions")
    prices: dict[str, dict[str, list[Any]]] = {}
    for i in rows:
        entry: list[Any] = [_price(i.price_ondemand), _price(i.price_spot)]
        if i.source != default_source:
            entry.append(i.source)
        prices.setdefault(i.region, {})[i.name] = entry
    egress = {
        region: {
            "internet": [
                [None if t.upto_gb == math.inf else _num(t.upto_gb), _num(t.usd_per_gb)]
                for t in fees.internet
            ],
            "same_region": _num(fees.same_region),
            "same_continent": _num(fees.same_continent),
            "pairs": {k: _num(v) for k, v in sorted(fees.pairs.items())},
            "other_continent": _num(fees.other_continent),
            "sources": list(fees.sources),
        }
        for (c, region), fees in sorted(catalog.egress.items())
        if c == cloud
    }
    return {
        "format": FORMAT,
        "cloud": cloud,
        "date": meta.date,
        "sources": list(meta.sources),
        "notes": list(meta.notes),
        "units": UNITS,
        "price_source": default_source,
        "types": types,
        "prices": prices,
        "egress": egress,
    }


def _dump(value: Any, path: tuple[str, ...] = ()) -> str:
    """JSON with one line per type, price row and egress figure: small, readable diffs."""
    compact = len(path) >= 3 or (len(path) == 2 and path[0] == "types")
    if compact or not isinstance(value, dict) or not value:
        if isinstance(value, list) and len(path) == 1 and value:  # header lists: one a line
            pad = "  " * (len(path) + 1)
            items = ",\n".join(pad + json.dumps(v, ensure_ascii=False) for v in value)
            return "[\n" + items + "\n" + "  " * len(path) + "]"
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    pad = "  " * (len(path) + 1)
    items = ",\n".join(
        f"{pad}{json.dumps(k, ensure_ascii=False)}: {_dump(v, (*path, k))}"
        for k, v in value.items()
    )
    return "{\n" + items + "\n" + "  " * len(path) + "}"


def write(catalog: Catalog, folder: Path, clouds: tuple[str, ...] = CLOUDS) -> list[Path]:
    """Write `clouds` of `catalog` into `folder`, each file atomically; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cloud in clouds:
        if cloud not in catalog.meta and not any(i.cloud == cloud for i in catalog.instances):
            continue
        path = folder / f"{cloud}.json"
        tmp = folder / f".{cloud}.json.tmp"
        tmp.write_text(_dump(document(catalog, cloud)) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written
