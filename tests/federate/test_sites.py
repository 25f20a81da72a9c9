"""On-prem sites from configuration, priced next to the clouds."""

from __future__ import annotations

from pathlib import Path

import pytest

from federate.catalog import load
from federate.placement import cloud_sites, compare
from federate.policy import Policy, PolicyError
from federate.sites import local_site, onprem_sites
from federate.workload import DataMove, JobNeeds, Place, Workload

CATALOG = Path(__file__).resolve().parents[1] / "catalog"

SITES = """sites:
  lab:
    region: us-west-2
    nodes: 4
    shape: {cores: 64, memory-gib: 256, fabric: infiniband}
    price: {core-hour: 0.01}
    reads-free: ["aws:us-west-2"]
"""


def test_an_onprem_site_is_priced_from_its_rate_and_reads_its_store_free(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(SITES)
    [lab] = onprem_sites(path)
    catalog = load(CATALOG)
    job = JobNeeds(
        "mpi",
        cores=64,
        memory_gib=128,
        nodes=4,
        multinode=True,
        runtime_hours=3,
        runtime_source="annotation",
    )
    data = DataMove(
        "ingress", "s3://b/in", Place("cloud", "aws", "us-west-2"), 10**12, "object metadata"
    )
    result = compare(
        Workload("w", (job,), (data,)), catalog, [lab, *cloud_sites(catalog)], Policy()
    )
    best = result[0]
    assert best.site.name == "lab"
    assert best.compute_usd == pytest.approx(64 * 0.01 * 4 * 3)  # core-hours x rate
    assert best.data_usd == 0  # it reads aws:us-west-2 over its own link
    too_big = JobNeeds("mpi", cores=64, memory_gib=128, nodes=8, multinode=True, runtime_hours=3)
    [est] = compare(Workload("w", (too_big,)), catalog, [lab], Policy())
    assert not est.feasible  # 8 nodes asked, 4 there


def test_the_local_site_is_free_but_small(tmp_path: Path) -> None:
    here = local_site(cores=2, memory_gib=8)
    catalog = load(CATALOG)
    small = JobNeeds("s", cores=2, memory_gib=4, runtime_hours=1, runtime_source="annotation")
    big = JobNeeds("b", cores=16, memory_gib=4, runtime_hours=1, runtime_source="annotation")
    [ok] = compare(Workload("w", (small,)), catalog, [here], Policy())
    assert (ok.feasible, ok.total_usd) == (True, 0.0)
    [no] = compare(Workload("w", (big,)), catalog, [here], Policy())
    assert no.reasons == ["b: no node here has 16 cores, 4 GiB"]


def test_a_site_without_a_shape_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text("sites:\n  lab: {nodes: 2}\n")
    with pytest.raises(PolicyError, match="site 'lab' needs `nodes` and `shape`"):
        onprem_sites(path)


def test_the_sites_file_says_where_buckets_live(tmp_path: Path) -> None:
    from federate.sites import bucket_locations

    path = tmp_path / "sites.yaml"
    path.write_text(SITES + "buckets:\n  genomes: aws:us-west-2\n")
    assert bucket_locations(path) == {"genomes": "aws:us-west-2"}
    path.write_text("buckets:\n  genomes: us-west-2\n")
    with pytest.raises(PolicyError, match="buckets maps a bucket name to CLOUD:REGION"):
        bucket_locations(path)
