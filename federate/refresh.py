"""`squall catalog refresh`: prices from the clouds' public pricing APIs into a catalog folder,
written in Squall's own format (`catalog_file.py`). A new or empty folder starts from the
catalog shipped with Squall; point $SQUALL_CATALOG at it to use it.

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

import datetime as dt
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import catalog_file
from .catalog import Catalog, CloudMeta, shipped
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
    "starting_point",
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


def apply_prices(
    catalog: Catalog, cloud: str, prices: Iterable[Price], date: str, what: str = ""
) -> tuple[Catalog, int]:
    """`catalog` with `cloud`'s rows repriced (a new catalog; the shipped one is never
    changed), dated `date`; and how many rows changed. `what` names the API for the header."""
    prices = list(prices)
    by_key = {(p.region, p.instance_type): p for p in prices}
    # a type's shape is one for all regions: what any region's offer says applies to all
    vcpus = {p.instance_type: p.vcpus for p in prices if p.vcpus is not None}
    memory = {p.instance_type: p.memory_gib for p in prices if p.memory_gib is not None}
    changed = 0
    rows = []
    for row in catalog.instances:
        if row.cloud != cloud:
            rows.append(row)
            continue
        new = replace(
            row,
            vcpus=vcpus.get(row.name, row.vcpus),
            memory_gib=memory.get(row.name, row.memory_gib),
        )
        p = by_key.get((row.region, row.name))
        if p is not None:
            new = replace(
                new,
                price_ondemand=row.price_ondemand if p.ondemand is None else p.ondemand,
                price_spot=row.price_spot if p.spot is None else p.spot,
            )
        changed += new != row
        if p is not None:
            new = replace(new, source=f"{p.source} ({date})")  # confirmed or changed
        rows.append(new)
    meta = dict(catalog.meta)
    old = meta.get(cloud, CloudMeta(catalog.date))
    line = f"refreshed {date} from {what or 'the public pricing API'}; rows it did not price "
    line += "keep their earlier source"
    meta[cloud] = CloudMeta(
        date,
        (line, *(s for s in old.sources if not s.startswith("refreshed "))),
        old.notes,
    )
    dates = [m.date for m in meta.values()]
    oldest = "undated" if "undated" in dates else min(dates)
    return Catalog(oldest, rows, catalog.egress, meta, catalog.origin, catalog.storage), changed


def starting_point(folder: Path) -> Catalog:
    """What a refresh of `folder` starts from: the catalog in it, or (an empty or new
    folder) the shipped one."""
    if catalog_file.holds_catalog(folder):
        return catalog_file.read(folder)
    if folder.exists() and any(folder.iterdir()):
        raise RefreshError(
            f"{folder} holds no catalog in Squall's format (aws.json, gcp.json, azure.json); "
            "give `catalog refresh` a folder of its own (a new or empty one starts from the "
            "catalog shipped with Squall)"
        )
    return shipped()


APIS = {
    "aws": "the AWS Price List bulk API",
    "azure": "the Azure Retail Prices API",
    "gcp": "the GCP Cloud Billing Catalog API",
}


def refresh(folder: Path, cloud: str, fetch: Fetch, today: str | None = None) -> int:
    """Fetch `cloud`'s prices for the catalog's regions and types and write the catalog
    into `folder` in Squall's format (each file atomically; nothing is written when a fetch
    fails); rows changed."""
    date = today or dt.date.today().isoformat()
    if cloud not in APIS:
        raise RefreshError(f"unknown cloud {cloud!r}: aws, gcp or azure")
    catalog = starting_point(folder)
    rows = [i for i in catalog.instances if i.cloud == cloud]
    if not rows:
        raise RefreshError(f"the catalog in {folder} has no {cloud} rows to refresh")
    regions = sorted({r.region for r in rows})
    prices: list[Price] = []
    for region in regions:
        types = {r.name for r in rows if r.region == region}
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
        else:
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
                r.name: Shape(r.vcpus, r.memory_gib, r.gpu_model, r.gpu_count)
                for r in rows
                if r.region == region
            }
            prices += gcp_prices(skus, region, shapes)
    repriced, changed = apply_prices(catalog, cloud, prices, date, APIS[cloud])
    catalog_file.write(repriced, folder)
    return changed


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
