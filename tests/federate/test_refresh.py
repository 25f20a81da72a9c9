"""Parsing the clouds' pricing APIs and applying the prices to a catalog.

No network here: the responses below are small, written by hand in the documented shapes of
the AWS Price List bulk offer file, the Azure Retail Prices API and the GCP Cloud Billing
Catalog API (a few products each, with the decoys a real response holds: Windows, dedicated
tenancy, low priority, other regions). The live fetch is tested only for its failure."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from federate import catalog_file
from federate.catalog import load, shipped
from federate.refresh import (
    RefreshError,
    Shape,
    apply_prices,
    aws_prices,
    azure_prices,
    gcp_prices,
    http_fetch,
    refresh,
)

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
SHIPPED = Path(__file__).resolve().parents[2] / "federate" / "data"

AWS_OFFER = {
    "publicationDate": "2026-11-01T00:00:00Z",
    "products": {
        "SKU1": {
            "productFamily": "Compute Instance",
            "attributes": {
                "instanceType": "hpc7a.96xlarge",
                "vcpu": "192",
                "memory": "768 GiB",
                "operatingSystem": "Linux",
                "tenancy": "Shared",
                "preInstalledSw": "NA",
                "capacitystatus": "Used",
                "licenseModel": "No License required",
            },
        },
        "SKU2": {
            "productFamily": "Compute Instance",
            "attributes": {
                "instanceType": "hpc7a.96xlarge",
                "vcpu": "192",
                "memory": "768 GiB",
                "operatingSystem": "Windows",
                "tenancy": "Shared",
                "preInstalledSw": "NA",
                "capacitystatus": "Used",
                "licenseModel": "No License required",
            },
        },
        "SKU3": {
            "productFamily": "Compute Instance",
            "attributes": {
                "instanceType": "hpc7a.96xlarge",
                "vcpu": "192",
                "memory": "768 GiB",
                "operatingSystem": "Linux",
                "tenancy": "Dedicated",
                "preInstalledSw": "NA",
                "capacitystatus": "Used",
                "licenseModel": "No License required",
            },
        },
        "SKU4": {
            "productFamily": "Compute Instance",
            "attributes": {
                "instanceType": "m7i.large",
                "vcpu": "2",
                "memory": "8 GiB",
                "operatingSystem": "Linux",
                "tenancy": "Shared",
                "preInstalledSw": "NA",
                "capacitystatus": "Used",
                "licenseModel": "No License required",
            },
        },
    },
    "terms": {
        "OnDemand": {
            "SKU1": {
                "SKU1.JRTCKXETXF": {
                    "priceDimensions": {
                        "SKU1.JRTCKXETXF.6YS6EN2CT7": {
                            "unit": "Hrs",
                            "pricePerUnit": {"USD": "7.5000000000"},
                        }
                    }
                }
            },
            "SKU2": {
                "SKU2.JRTCKXETXF": {
                    "priceDimensions": {"x": {"unit": "Hrs", "pricePerUnit": {"USD": "99"}}}
                }
            },
            "SKU3": {
                "SKU3.JRTCKXETXF": {
                    "priceDimensions": {"x": {"unit": "Hrs", "pricePerUnit": {"USD": "88"}}}
                }
            },
            "SKU4": {
                "SKU4.JRTCKXETXF": {
                    "priceDimensions": {"x": {"unit": "Hrs", "pricePerUnit": {"USD": "0.1"}}}
                }
            },
        }
    },
}

AZURE_ITEMS = [
    {
        "armRegionName": "eastus",
        "armSkuName": "Standard_HB120rs_v3",
        "skuName": "HB120rs v3",
        "productName": "Virtual Machines HBv3 Series",
        "retailPrice": 3.7,
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
    },
    {
        "armRegionName": "eastus",
        "armSkuName": "Standard_HB120rs_v3",
        "skuName": "HB120rs v3 Spot",
        "productName": "Virtual Machines HBv3 Series",
        "retailPrice": 0.9,
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
    },
    {
        "armRegionName": "eastus",
        "armSkuName": "Standard_HB120rs_v3",
        "skuName": "HB120rs v3 Low Priority",
        "productName": "Virtual Machines HBv3 Series",
        "retailPrice": 0.5,
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
    },
    {
        "armRegionName": "eastus",
        "armSkuName": "Standard_HB120rs_v3",
        "skuName": "HB120rs v3",
        "productName": "Virtual Machines HBv3 Series Windows",
        "retailPrice": 9.9,
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
    },
    {
        "armRegionName": "westeurope",
        "armSkuName": "Standard_HB120rs_v3",
        "skuName": "HB120rs v3",
        "productName": "Virtual Machines HBv3 Series",
        "retailPrice": 4.1,
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
    },
]


def _money(usd: float) -> dict[str, object]:
    units = int(usd)
    return {"currencyCode": "USD", "units": str(units), "nanos": round((usd - units) * 1e9)}


def _gcp_sku(description: str, usage: str, region: str, usd: float) -> dict[str, object]:
    return {
        "description": description,
        "category": {"resourceFamily": "Compute", "resourceGroup": "CPU", "usageType": usage},
        "serviceRegions": [region],
        "pricingInfo": [
            {
                "pricingExpression": {
                    "usageUnit": "h",
                    "tieredRates": [{"startUsageAmount": 0, "unitPrice": _money(usd)}],
                }
            }
        ],
    }


GCP_SKUS = [
    _gcp_sku("N2 Instance Core running in Americas", "OnDemand", "us-central1", 0.031611),
    _gcp_sku("N2 Instance Ram running in Americas", "OnDemand", "us-central1", 0.004237),
    _gcp_sku(
        "Spot Preemptible N2 Instance Core running in Americas",
        "Preemptible",
        "us-central1",
        0.0077,
    ),
    _gcp_sku(
        "Spot Preemptible N2 Instance Ram running in Americas", "Preemptible", "us-central1", 0.001
    ),
    _gcp_sku("N2 Instance Core running in Netherlands", "OnDemand", "europe-west4", 0.05),
    _gcp_sku("A2 Instance Core running in Americas", "OnDemand", "us-central1", 0.031611),
    _gcp_sku("A2 Instance Ram running in Americas", "OnDemand", "us-central1", 0.004237),
    _gcp_sku("Nvidia Tesla A100 GPU running in Americas", "OnDemand", "us-central1", 2.933908),
    _gcp_sku("Nvidia A100 80GB GPU running in Americas", "OnDemand", "us-central1", 3.92808),
]


def test_aws_offer_keeps_linux_shared_on_demand_only() -> None:
    [price] = aws_prices(AWS_OFFER, "us-east-2", {"hpc7a.96xlarge"})
    assert (price.instance_type, price.ondemand, price.vcpus, price.memory_gib) == (
        "hpc7a.96xlarge",
        7.5,
        192,
        768.0,
    )


def test_azure_items_give_on_demand_and_spot_per_region() -> None:
    [price] = azure_prices(AZURE_ITEMS, "eastus")
    assert (price.instance_type, price.ondemand, price.spot) == ("Standard_HB120rs_v3", 3.7, 0.9)


def test_gcp_types_are_priced_from_core_and_ram_skus() -> None:
    shapes = {
        "n2-standard-32": Shape(32, 128.0),
        "e2-small": Shape(2, 2.0),  # no e2 SKUs in the response: left alone
        "a2-highgpu-1g": Shape(12, 85.0, "A100", 1),
        "a2-ultragpu-1g": Shape(12, 170.0, "A100-80GB", 1),
    }
    prices = {p.instance_type: p for p in gcp_prices(GCP_SKUS, "us-central1", shapes)}
    assert sorted(prices) == ["a2-highgpu-1g", "a2-ultragpu-1g", "n2-standard-32"]
    n2 = prices["n2-standard-32"]
    assert n2.ondemand == pytest.approx(32 * 0.031611 + 128 * 0.004237)
    assert n2.spot == pytest.approx(32 * 0.0077 + 128 * 0.001)
    host = 12 * 0.031611
    assert prices["a2-highgpu-1g"].ondemand == pytest.approx(host + 85 * 0.004237 + 2.933908)
    assert prices["a2-ultragpu-1g"].ondemand == pytest.approx(host + 170 * 0.004237 + 3.92808)
    assert prices["a2-highgpu-1g"].spot is None  # no spot SKUs for A2 in the response


def test_refresh_writes_squalls_format_and_changes_only_what_the_api_priced(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "catalog"
    catalog_file.write(load(CATALOG), folder)  # the reference snapshot, in Squall's format
    urls: list[str] = []

    def fetch(url: str) -> object:  # the offer for us-east-2; the other regions' are empty
        urls.append(url)
        return AWS_OFFER if "/us-east-2/" in url else {"products": {}, "terms": {}}

    changed = refresh(folder, "aws", fetch, today="2026-11-22")
    assert len(urls) == 4  # one offer file per AWS region in the catalog
    assert changed == 1  # hpc7a.96xlarge in us-east-2; the offer names no other catalog type
    refreshed = load(folder)
    after = {(i.region, i.name): i for i in refreshed.instances}
    hpc = after[("us-east-2", "hpc7a.96xlarge")]
    assert hpc.price_ondemand == 7.5
    assert hpc.source == "aws price list 2026-11-01T00:00:00Z (2026-11-22)"
    before = {(i.region, i.name): i for i in load(CATALOG).instances}
    assert after[("eu-west-1", "hpc7a.96xlarge")] == before[("eu-west-1", "hpc7a.96xlarge")]
    assert refreshed.meta["aws"].date == "2026-11-22"
    assert (
        refreshed.meta["aws"]
        .sources[0]
        .startswith("refreshed 2026-11-22 from the AWS Price List bulk API")
    )
    assert refreshed.meta["gcp"] == load(CATALOG).meta["gcp"]  # other clouds as they were
    assert refreshed.date == load(CATALOG).date  # the oldest cloud dates the catalog
    unchanged, none = apply_prices(refreshed, "aws", [], "2026-11-23")
    assert none == 0
    assert unchanged.instances == refreshed.instances


def test_a_new_folder_starts_from_the_shipped_catalog_which_never_changes(
    tmp_path: Path,
) -> None:
    shipped_files = {p.name: p.read_bytes() for p in SHIPPED.glob("*.json")}
    folder = tmp_path / "new"

    def fetch(url: str) -> object:
        return AWS_OFFER if "/us-east-2/" in url else {"products": {}, "terms": {}}

    assert refresh(folder, "aws", fetch, today="2026-11-22") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["aws.json", "azure.json", "gcp.json"]
    mine = load(folder)
    assert len(mine.instances) == len(shipped().instances)
    assert (folder / "gcp.json").read_bytes() == shipped_files["gcp.json"]
    assert {p.name: p.read_bytes() for p in SHIPPED.glob("*.json")} == shipped_files
    assert shipped().meta["aws"].date == "2026-04-02"
    # a folder holding something else is refused, not overwritten
    other = tmp_path / "snapshot"
    shutil.copytree(CATALOG, other)
    with pytest.raises(RefreshError, match="holds no catalog in Squall's format"):
        refresh(other, "aws", fetch)
    assert not (other / "aws.json").exists()


def test_refresh_without_network_says_so_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RefreshError, match=r"cannot reach 127\.0\.0\.1 .*needs network access"):
        http_fetch("http://127.0.0.1:9/offers/index.json", timeout=2)
    folder = tmp_path / "catalog"
    catalog_file.write(load(CATALOG), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def offline(url: str) -> object:
        raise RefreshError("cannot reach pricing.us-east-1.amazonaws.com")

    with pytest.raises(RefreshError):
        refresh(folder, "aws", offline)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
