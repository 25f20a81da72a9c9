"""`squall catalog refresh`: prices from the clouds' public pricing APIs into a catalog folder.

- AWS: the Price List bulk API (no credentials): one offer file per region, JSON, with every
  EC2 product's attributes (vCPUs, memory, GPUs) and on-demand terms. Rows of the catalog's
  types get the current Linux, shared-tenancy, on-demand price and their shape.
- Azure: the Retail Prices API (no credentials): consumption prices of Linux VMs per
  `armSkuName` and region, the `... Spot` SKUs for spot.
- GCP: the Cloud Billing Catalog API (an API key in $GOOGLE_API_KEY): per-vCPU, per-GiB and
  per-GPU hourly prices per machine family and region; a type's price is vCPUs x core +
  memory x RAM + GPUs x GPU (N1 hosts with attached GPUs, such as n1-standard-8+1xT4, too).

Parsing is separate from fetching, so that it is tested on small responses; a refresh that
cannot reach the API fails with one line saying so and leaves the catalog as it was. Shapes
and types the APIs do not describe (Azure, GCP) are kept from the catalog; only prices move.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .placement import gpu_key

__all__ = [
    "Price",
    "RefreshError",
    "Shape",
    "apply_prices",
    "aws_prices",
    "azure_prices",
    "gcp_prices",
    "http_fetch",
    "refresh",
]

Fetch = Callable[[str], Any]  # URL -> parsed JSON

AWS_OFFER = (
    "https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/{region}/index.json"
)
AZURE_PRICES = (
    "https://prices.azure.com/api/retail/prices?$filter=serviceName eq 'Virtual Machines' "
    "and armRegionName eq '{region}' and priceType eq 'Consumption'"
)
GCP_SKUS = (
    "https://cloudbilling.googleapis.com/v1/services/6F81-5844-456A/skus?key={key}&pageSize=5000"
)


class RefreshError(Exception):
    """A refresh that could not run; nothing was written."""


@dataclass(frozen=True, slots=True)
class Price:
    region: str
    instance_type: str
    ondemand: float | None = None
    spot: float | None = None
    vcpus: int | None = None
    memory_gib: float | None = None
    source: str = ""


# ---- AWS --------------------------------------------------------------------------------------


def aws_prices(offer: Mapping[str, Any], region: str, types: Iterable[str]) -> list[Price]:
    """Linux, shared tenancy, no pre-installed software, on-demand: the catalog's price."""
    wanted = set(types)
    skus: dict[str, dict[str, Any]] = {}
    for sku, product in offer.get("products", {}).items():
        a = product.get("attributes", {})
        if (
            a.get("instanceType") in wanted
            and a.get("operatingSystem") == "Linux"
            and a.get("tenancy") == "Shared"
            and a.get("preInstalledSw", "NA") == "NA"
            and a.get("capacitystatus", "Used") == "Used"
            and a.get("licenseModel", "No License required") == "No License required"
        ):
            skus[sku] = a
    prices = []
    for sku, a in sorted(skus.items(), key=lambda kv: kv[1]["instanceType"]):
        rate = None
        for term in offer.get("terms", {}).get("OnDemand", {}).get(sku, {}).values():
            for dim in term.get("priceDimensions", {}).values():
                if dim.get("unit") == "Hrs":
                    rate = float(dim["pricePerUnit"]["USD"])
        if rate is None or rate == 0:
            continue
        memory = re.match(r"([\d,.]+)\s*GiB", a.get("memory", ""))
        prices.append(
            Price(
                region=region,
                instance_type=a["instanceType"],
                ondemand=rate,
                vcpus=int(a["vcpu"]) if str(a.get("vcpu", "")).isdigit() else None,
                memory_gib=float(memory.group(1).replace(",", "")) if memory else None,
                source=f"aws price list {offer.get('publicationDate', '')}".strip(),
            )
        )
    return prices


# ---- Azure ------------------------------------------------------------------------------------


def azure_prices(items: Iterable[Mapping[str, Any]], region: str) -> list[Price]:
    ondemand: dict[str, float] = {}
    spot: dict[str, float] = {}
    for item in items:
        if (
            item.get("armRegionName") != region
            or item.get("type") != "Consumption"
            or "Windows" in item.get("productName", "")
            or item.get("unitOfMeasure") != "1 Hour"
        ):
            continue
        sku = item.get("armSkuName", "")
        name = item.get("skuName", "")
        if name.endswith("Low Priority"):
            continue
        target = spot if name.endswith(" Spot") else ondemand
        target[sku] = float(item["retailPrice"])
    return [
        Price(region, sku, ondemand.get(sku), spot.get(sku), source="azure retail prices api")
        for sku in sorted(set(ondemand) | set(spot))
    ]


# ---- GCP --------------------------------------------------------------------------------------

_GCP_FAMILY = re.compile(r"^([a-z]\d+[a-z]?)-")


def _unit_price(sku: Mapping[str, Any]) -> float | None:
    for info in sku.get("pricingInfo", []):
        rates = info.get("pricingExpression", {}).get("tieredRates", [])
        if rates:
            money = rates[-1]["unitPrice"]
            return int(money.get("units", "0")) + float(money.get("nanos", 0)) / 1e9
    return None


@dataclass(frozen=True, slots=True)
class Shape:
    """What a GCP machine type is made of, as the catalog has it."""

    vcpus: int
    memory_gib: float
    gpu_model: str = ""
    gpu_count: float = 0


def gcp_prices(
    skus: Iterable[Mapping[str, Any]], region: str, shapes: Mapping[str, Shape]
) -> list[Price]:
    """Prices of the machine types in `shapes` from per-unit SKUs: "<FAMILY> Instance Core
    running in ...", "<FAMILY> Instance Ram running in ..." and "Nvidia <MODEL> GPU running
    in ...", on demand (OnDemand) and spot (Preemptible). A GPU model with a memory size
    ("A100-80GB") takes the SKU that names it, one without ("A100") the SKU that does not."""
    unit: dict[tuple[str, str, str], float] = {}  # (family, core|ram, usage)
    gpu: dict[tuple[str, int | None, str], float] = {}  # (model, memory, usage)
    for sku in skus:
        if region not in sku.get("serviceRegions", []):
            continue
        category = sku.get("category", {})
        if category.get("resourceFamily") != "Compute":
            continue
        price = _unit_price(sku)
        usage = category.get("usageType", "OnDemand")
        description = sku.get("description", "")
        if price is None:
            continue
        if m := re.match(r"^(?:Spot Preemptible )?Nvidia (.+?) GPU running in", description):
            gpu[(*gpu_key(m.group(1)), usage)] = price
        elif m := re.match(
            r"^(?:Spot Preemptible )?(\w+) (?:AMD |Arm )?Instance (Core|Ram)", description
        ):
            unit[(m.group(1).upper(), m.group(2).lower(), usage)] = price
    prices = []
    for name, shape in sorted(shapes.items()):
        fam = _GCP_FAMILY.match(name)
        if not fam:
            continue
        family = fam.group(1).upper()

        def total(usage: str, family: str = family, shape: Shape = shape) -> float | None:
            core, ram = unit.get((family, "core", usage)), unit.get((family, "ram", usage))
            if core is None or ram is None:
                return None
            host = shape.vcpus * core + shape.memory_gib * ram
            if not shape.gpu_count:
                return host
            per_gpu = gpu.get((*gpu_key(shape.gpu_model), usage))
            return host + shape.gpu_count * per_gpu if per_gpu is not None else None

        ondemand, spot = total("OnDemand"), total("Preemptible")
        if ondemand is not None or spot is not None:
            prices.append(
                Price(
                    region,
                    name,
                    ondemand,
                    spot,
                    shape.vcpus,
                    shape.memory_gib,
                    "gcp cloud billing catalog",
                )
            )
    return prices


# ---- applying ---------------------------------------------------------------------------------


def apply_prices(folder: Path, cloud: str, prices: Iterable[Price], date: str) -> int:
    """Write the prices into `folder/instances.csv` (atomically); how many rows changed."""
    path = folder / "instances.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    by_key = {(p.region, p.instance_type): p for p in prices}
    changed = 0
    for row in rows:
        p = by_key.get((row["region"], row["instance_type"])) if row["cloud"] == cloud else None
        if p is None:
            continue
        before = dict(row)
        if p.ondemand is not None:
            row["price_ondemand_usd_hr"] = f"{p.ondemand:g}"
        if p.spot is not None:
            row["price_spot_usd_hr"] = f"{p.spot:g}"
        if p.vcpus is not None:
            row["vcpus"] = str(p.vcpus)
        if p.memory_gib is not None:
            row["memory_gib"] = f"{p.memory_gib:g}"
        row["source"] = f"{p.source} ({date})"
        changed += row != before
    tmp = path.with_name(".instances.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    _stamp(folder, cloud, date)
    return changed


def _stamp(folder: Path, cloud: str, date: str) -> None:
    """Record in catalog.yaml when each cloud's prices were last refreshed; the catalog's date
    is the newest of them."""
    meta = folder / "catalog.yaml"
    refreshed: dict[str, str] = {}
    if meta.exists():
        for line in meta.read_text().splitlines():
            m = re.match(r"^\s+(aws|gcp|azure):\s*(\S+)", line)
            if m:
                refreshed[m.group(1)] = m.group(2)
    refreshed[cloud] = date
    text = f"date: {max(refreshed.values())}\nrefreshed:\n" + "".join(
        f"  {c}: {d}\n" for c, d in sorted(refreshed.items())
    )
    tmp = meta.with_name(".catalog.yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, meta)


def _rows(folder: Path, cloud: str) -> list[dict[str, str]]:
    with open(folder / "instances.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["cloud"] == cloud]


def refresh(folder: Path, cloud: str, fetch: Fetch, today: str | None = None) -> int:
    """Fetch `cloud`'s prices for the catalog's regions and types; rows changed."""
    date = today or dt.date.today().isoformat()
    rows = _rows(folder, cloud)
    if not rows:
        raise RefreshError(f"the catalog in {folder} has no {cloud} rows to refresh")
    regions = sorted({r["region"] for r in rows})
    prices: list[Price] = []
    for region in regions:
        types = {r["instance_type"] for r in rows if r["region"] == region}
        if cloud == "aws":
            prices += aws_prices(fetch(AWS_OFFER.format(region=region)), region, types)
        elif cloud == "azure":
            items: list[Mapping[str, Any]] = []
            url: str | None = AZURE_PRICES.format(region=region)
            while url:
                page = fetch(url)
                items += page.get("Items", [])
                url = page.get("NextPageLink")
            prices += azure_prices(items, region)
        elif cloud == "gcp":
            key = os.environ.get("GOOGLE_API_KEY")
            if not key:
                raise RefreshError("GCP's billing catalog needs an API key: set GOOGLE_API_KEY")
            skus: list[Mapping[str, Any]] = []
            url = GCP_SKUS.format(key=key)
            while url:
                page = fetch(url)
                skus += page.get("skus", [])
                token = page.get("nextPageToken")
                url = GCP_SKUS.format(key=key) + f"&pageToken={token}" if token else None
            shapes = {
                r["instance_type"]: Shape(
                    int(float(r["vcpus"])),
                    float(r["memory_gib"]),
                    r["gpu_model"],
                    float(r["gpu_count"] or 0),
                )
                for r in rows
                if r["region"] == region
            }
            prices += gcp_prices(skus, region, shapes)
        else:
            raise RefreshError(f"unknown cloud {cloud!r}: aws, gcp or azure")
    return apply_prices(folder, cloud, prices, date)


def http_fetch(url: str, timeout: float = 60.0) -> Any:
    """GET a JSON document; a network failure is a RefreshError naming the host."""
    import httpx

    host = httpx.URL(url).host
    try:
        reply = httpx.get(url, timeout=timeout, follow_redirects=True)
        reply.raise_for_status()
        return reply.json()
    except httpx.HTTPError as exc:
        raise RefreshError(
            f"cannot reach {host} ({exc.__class__.__name__}: {exc}); catalog refresh needs "
            "network access to the cloud's public pricing API"
        ) from None
