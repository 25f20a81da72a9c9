"""Write the catalog that ships inside the package (federate/data/) from the dated reference
snapshot of cloud prices:

    python scripts/build-catalog.py SNAPSHOT_DIR [--out DIR]

SNAPSHOT_DIR holds instances.csv, egress.csv and a README.md whose provenance table names,
per cloud, the source file, its commit and the date of its data (the snapshot the tests use
is tests/catalog). The output is Squall's own format (federate/catalog_file.py), one JSON file
per cloud, dated and with its sources named.

Rows the snapshot flags SUSPECT (GCP GPU types whose on-demand GPU price is below, or within
a few percent of, their spot price: commitment SKUs picked by the upstream fetcher) keep
their shape and spot price; their on-demand price is withheld, so placement never chooses
them on demand at a price no one can buy. `squall catalog refresh --cloud gcp` prices them
again from GCP's billing catalog.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federate.catalog import Catalog, CloudMeta  # noqa: E402
from federate.catalog_file import write  # noqa: E402
from federate.snapshot import load_snapshot  # noqa: E402

UPSTREAM = "anycloud-sh/catalog"
HAND_ENTERED = (
    "network bandwidth, the fabric of GCP and Azure types, Azure GPU memory and the GB200 GPU "
    "model and count: the vendors' instance-type pages, entered by hand in the snapshot"
)
# notes the snapshot puts on rows that say nothing a reader of prices needs
ROUTINE = ("price = host VM row + accelerator row", "composite:", "no spot price in source")


class SnapshotError(Exception):
    pass


def provenance(readme: Path) -> dict[str, tuple[str, str, str]]:
    """cloud -> (file, commit, date of the data) from the README's provenance table."""
    found = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] not in ("aws", "gcp", "azure"):
            continue
        cloud, file, version, date = cells
        commit = next((w.strip("`") for w in version.split() if len(w.strip("`")) == 40), "")
        if not commit or not date[:10].replace("-", "").isdigit():
            raise SnapshotError(f"{readme}: cannot read the provenance row of {cloud}: {line}")
        found[cloud] = (file.strip("`"), commit, date[:10])
    if not found:
        raise SnapshotError(f"{readme}: no provenance table (cloud | file | version | date)")
    return found


def price_notes(path: Path) -> dict[tuple[str, str, str], str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {
            (r["cloud"], r["region"], r["instance_type"]): r["price_note"]
            for r in csv.DictReader(f)
        }


def build(snapshot: Path) -> Catalog:
    catalog = load_snapshot(snapshot)
    origin = provenance(snapshot / "README.md")
    notes = price_notes(snapshot / "instances.csv")
    withheld: dict[str, set[str]] = defaultdict(set)
    remarks: dict[tuple[str, str], set[str]] = defaultdict(set)  # (cloud, note) -> types
    rows = []
    for i in catalog.instances:
        note = notes.get((i.cloud, i.region, i.name), "")
        if note.startswith("SUSPECT"):
            withheld[i.cloud].add(i.name)
            i = replace(i, price_ondemand=None)
        elif note and not note.startswith(ROUTINE):
            remarks[(i.cloud, note)].add(i.name)
        rows.append(i)
    meta = {}
    for cloud, old in catalog.meta.items():
        if cloud not in origin:
            raise SnapshotError(f"{snapshot}/README.md names no source for {cloud}")
        file, commit, date = origin[cloud]
        egress = sorted(
            {s for (c, _), f in catalog.egress.items() if c == cloud for s in f.sources}
        )
        sources = [
            f"instance types and prices: {UPSTREAM} {file} at commit {commit} (data of {date}), "
            "filtered to the HPC and GPU families and the regions of Squall's reference snapshot",
            HAND_ENTERED,
            *(f"egress: {s}" for s in egress),
        ]
        cloud_notes = [
            "list prices before discounts, published by the cloud; spot prices are single "
            "observations at the date of the data and move hourly",
        ]
        if withheld[cloud]:
            cloud_notes.append(
                "on-demand price withheld (null) for "
                + ", ".join(sorted(withheld[cloud]))
                + ": the upstream on-demand GPU price is below or within a few percent of the "
                "spot price (a commitment SKU); spot kept; `squall catalog refresh` prices them"
            )
        cloud_notes += [
            f"{note} ({', '.join(sorted(types))})"
            for (c, note), types in sorted(remarks.items())
            if c == cloud
        ]
        meta[cloud] = CloudMeta(date, tuple(sources), tuple(cloud_notes))
        del old
    dates = [m.date for m in meta.values()]
    return Catalog(min(dates), rows, catalog.egress, meta, origin="built from the snapshot")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", type=Path, help="the snapshot folder (e.g. tests/catalog)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "federate" / "data", help="default: federate/data"
    )
    args = parser.parse_args()
    try:
        catalog = build(args.snapshot)
    except (OSError, ValueError, SnapshotError) as exc:
        print(f"build-catalog: {exc}", file=sys.stderr)
        return 1
    for path in write(catalog, args.out):
        rows = sum(1 for i in catalog.instances if i.cloud == path.stem)
        print(f"{path}: {rows} rows, data of {catalog.meta[path.stem].date}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
