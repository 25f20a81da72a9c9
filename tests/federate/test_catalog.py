"""The catalog that ships inside the package: written by scripts/build-catalog.py from the
dated reference snapshot (tests/catalog), in Squall's own format, with its date and sources;
`catalog show` says which catalog is in use and warns when its prices are old."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from federate import catalog_file
from federate.catalog import STALE_DAYS, CloudMeta, load, shipped

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = ROOT / "tests" / "catalog"
SHIPPED = ROOT / "federate" / "data"
SQUALL = str(Path(sys.executable).parent / "squall")


def test_the_shipped_catalog_is_what_the_script_writes_from_the_snapshot(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "build-catalog.py"),
            str(SNAPSHOT),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["aws.json", "azure.json", "gcp.json"]
    for name in written:  # rebuild federate/data with the script when the snapshot changes
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_the_shipped_catalog_has_the_snapshots_figures_less_the_suspect_on_demand_prices() -> None:
    ours, snapshot = shipped(), load(SNAPSHOT)
    assert ours.origin == "shipped with Squall"
    ours_rows = {(i.cloud, i.region, i.name): i for i in ours.instances}
    snap_rows = {(i.cloud, i.region, i.name): i for i in snapshot.instances}
    assert ours_rows.keys() == snap_rows.keys()
    assert len(ours_rows) == 564
    suspect = {
        (r.split(",")[0], r.split(",")[1], r.split(",")[2])
        for r in (SNAPSHOT / "instances.csv").read_text().splitlines()
        if ",SUSPECT" in r
    }
    assert len(suspect) == 31
    for key, row in ours_rows.items():
        if key in suspect:  # a commitment price is not an on-demand price: withheld
            assert row.price_ondemand is None
            assert row.price_spot == snap_rows[key].price_spot is not None
            assert replace(row, price_ondemand=snap_rows[key].price_ondemand) == snap_rows[key]
        else:
            assert row == snap_rows[key]
    assert ours.egress.keys() == snapshot.egress.keys()
    for key, fees in ours.egress.items():
        theirs = snapshot.egress[key]
        assert [t.upto_gb for t in fees.internet] == [t.upto_gb for t in theirs.internet]
        for a, b in zip(fees.internet, theirs.internet, strict=True):
            assert math.isclose(a.usd_per_gb, b.usd_per_gb, rel_tol=1e-8)
        for f in ("same_region", "same_continent", "other_continent"):
            assert math.isclose(getattr(fees, f), getattr(theirs, f), rel_tol=1e-8)
        assert fees.pairs.keys() == theirs.pairs.keys()
        assert fees.sources == theirs.sources
    # dated per cloud, with the upstream commit and the vendors' pages named
    assert {c: m.date for c, m in ours.meta.items()} == {
        "aws": "2026-04-02",
        "gcp": "2026-05-20",
        "azure": "2026-05-20",
    }
    assert ours.date == "2026-04-02"
    assert "69b86f0bec0f152ed452516e6fac70ff53106a5a" in ours.meta["aws"].sources[0]
    assert "62ff0a987e0c257a89235415d2877812fb1aaf29" in ours.meta["gcp"].sources[0]
    assert any("azure.microsoft.com/en-us/pricing" in s for s in ours.meta["azure"].sources)
    assert any("a3-highgpu-8g" in n and "withheld" in n for n in ours.meta["gcp"].notes)


def test_each_file_opens_with_its_header() -> None:
    for cloud in ("aws", "gcp", "azure"):
        doc = json.loads((SHIPPED / f"{cloud}.json").read_text())
        assert list(doc)[:6] == ["format", "cloud", "date", "sources", "notes", "units"]
        assert doc["format"] == catalog_file.FORMAT
        assert doc["cloud"] == cloud


def squall(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SQUALL_")}
    return subprocess.run(
        [SQUALL, *args], capture_output=True, text=True, timeout=60, env={**base, **(env or {})}
    )


def test_catalog_show_names_the_catalog_in_use_and_warns_when_it_is_old(tmp_path: Path) -> None:
    default = squall("catalog", "show", "-o", "json")
    assert default.returncode == 0, default.stderr
    info = json.loads(default.stdout)
    assert info["catalog"] == "shipped with Squall"
    assert info["clouds"]["aws"]["date"] == "2026-04-02"
    assert info["clouds"]["aws"]["age_days"] == (dt.date.today() - dt.date(2026, 4, 2)).days
    assert len(info["regions"]) == 14
    # the shipped figures are from spring 2026: old, and said so with what to do
    assert f"older than {STALE_DAYS} days" in default.stderr
    assert "squall catalog refresh --cloud aws --catalog DIR" in default.stderr

    fresh = tmp_path / "fresh"
    today = dt.date.today().isoformat()
    recent = shipped()
    recent = replace(recent, meta={c: CloudMeta(today, m.sources) for c, m in recent.meta.items()})
    catalog_file.write(recent, fresh)
    mine = squall("catalog", "show", env={"SQUALL_CATALOG": str(fresh)})
    assert mine.returncode == 0, mine.stderr
    assert f"catalog: {fresh}" in mine.stdout
    assert f"aws: data of {today} (0 days old)" in mine.stdout
    assert "warning" not in mine.stderr

    old = tmp_path / "old"
    month_ago = (dt.date.today() - dt.timedelta(days=STALE_DAYS + 1)).isoformat()
    catalog_file.write(replace(recent, meta={**recent.meta, "gcp": CloudMeta(month_ago)}), old)
    stale = squall("catalog", "show", "--catalog", str(old))
    assert f"gcp {month_ago} ({STALE_DAYS + 1} days)" in stale.stderr
    assert "aws" not in stale.stderr.split("days:")[1].split(".")[0]  # only gcp is old


def test_refresh_needs_a_folder_of_its_own_and_a_bad_catalog_is_one_line(tmp_path: Path) -> None:
    no_folder = squall("catalog", "refresh", "--cloud", "aws")
    assert no_folder.returncode == 2
    assert "give --catalog DIR" in no_folder.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "aws.json").write_text("{}")
    bad = squall("catalog", "show", "--catalog", str(broken))
    assert bad.returncode == 2
    assert f"{broken / 'aws.json'}: not a squall-catalog/1 file for aws" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_the_format_reads_back_what_it_wrote(tmp_path: Path, cloud: str) -> None:
    catalog_file.write(shipped(), tmp_path, clouds=(cloud,))
    again = load(tmp_path)
    assert again.instances == [i for i in shipped().instances if i.cloud == cloud]
    assert again.meta == {cloud: shipped().meta[cloud]}
