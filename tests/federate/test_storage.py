"""What a run's volumes cost at a cloud site: the managed file system its stack makes, for
the run's hours, at the dated prices of federate/data/storage.json (or a catalog folder's own);
and which storage a site's clusters use, by the same rule as the cluster spec's."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from federate.catalog import Catalog, load, shipped
from federate.placement import Site, cloud_sites, compare, estimate
from federate.policy import Policy, PolicyError
from federate.sites import (
    cloud_storage,
    onprem_sites,
    persistent_shares,
    with_persistent_shares,
    with_storage,
)
from federate.storage import (
    HOURS_PER_MONTH,
    billed_gib,
    read_storage,
    storage_class,
    storage_cost,
)
from federate.workload import JobNeeds, Workload
from infra.azure import MIN_SHARE_GIB
from infra.gcp import filestore_capacity_gib
from infra.spec import storage_for

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "tests" / "catalog"
SHIPPED = ROOT / "federate" / "data" / "storage.json"
EFS = 0.30  # USD per GB-month, us-east-1 (federate/data/storage.json, with its sources)
GB_PER_GIB = 2**30 / 1e9


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load(CATALOG)


def workload(nodes: int = 2, hours: float = 10, storage_gib: int = 100) -> Workload:
    job = JobNeeds(
        "solve",
        cores=32,
        memory_gib=64,
        nodes=nodes,
        multinode=nodes > 1,
        runtime_hours=hours,
        runtime_source="annotation",
    )
    return Workload("w", (job,), storage_gib=storage_gib, features=frozenset({"volumes"}))


def site(catalog: Catalog, name: str, storage: str | None = None) -> Site:
    [found] = [s for s in cloud_sites(catalog) if s.name == name]
    return replace(found, storage=storage)


# ---- the prices --------------------------------------------------------------------------------


def test_the_shipped_prices_are_dated_sourced_and_say_what_was_not_found() -> None:
    doc = json.loads(SHIPPED.read_text())
    assert doc["date"] == "2026-12-03"
    services = read_storage(SHIPPED)
    assert services == shipped().storage
    assert set(services) == {"aws", "gcp", "azure"}
    efs = services["aws"]
    assert (efs.unit, efs.ranges, efs.max_gib) == ("GB", (), None)  # billed as used
    [(region, price)] = efs.prices.items()
    assert (region, price.usd_per_month) == ("us-east-1", EFS)
    assert any(s.startswith("https://aws.amazon.com/efs/pricing/") for s in price.sources)
    # no figure could be read for Filestore Zonal or Azure Files premium: none is made up
    for cloud in ("gcp", "azure"):
        assert services[cloud].prices == {}
        assert "found" in services[cloud].missing  # says why
        assert all(p["usd_per_month"] is None for p in doc["services"][cloud]["prices"].values())
    assert services["gcp"].ranges == ((1024, 9984, 256), (10240, 102400, 2560))
    assert services["azure"].ranges == ((100, 102400, 1),)


def test_a_price_needs_its_source(tmp_path: Path) -> None:
    doc = json.loads(SHIPPED.read_text())
    doc["services"]["aws"]["prices"]["us-east-1"]["sources"] = []
    bad = tmp_path / "storage.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="us-east-1: a price without its source"):
        read_storage(bad)
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a squall-storage/1 file"):
        read_storage(bad)


def test_billed_capacity_honours_each_file_systems_minimum_and_steps() -> None:
    services = shipped().storage
    assert billed_gib(services["aws"], 7) == 7  # EFS: what is stored, no minimum
    for size in itertools.chain(range(1, 3000, 37), range(9900, 11000, 41), (102400,)):
        assert billed_gib(services["gcp"], size) == filestore_capacity_gib(size)
        assert billed_gib(services["azure"], size) == max(MIN_SHARE_GIB, size)
    with pytest.raises(ValueError, match="more than Filestore Zonal"):
        billed_gib(services["gcp"], 102401)


def test_storage_cost_follows_the_size_and_the_hours() -> None:
    services = shipped().storage
    cost, guesses = storage_cost(services, "aws", "us-east-1", 100, 10)
    assert cost == pytest.approx(100 * GB_PER_GIB * EFS * 10 / HOURS_PER_MONTH)
    assert guesses == []
    assert storage_cost(services, "aws", "us-east-1", 200, 10)[0] == pytest.approx(2 * cost)
    assert storage_cost(services, "aws", "us-east-1", 100, 30)[0] == pytest.approx(3 * cost)
    # a region without its own figure: another region's, said
    near, guesses = storage_cost(services, "aws", "us-east-2", 100, 10)
    assert near == pytest.approx(cost)
    assert guesses == [
        "storage: no Amazon EFS Standard (Regional), elastic throughput price for us-east-2 "
        "in the catalog; priced at us-east-1's $0.3/GB-month"
    ]
    # a cloud without any: 0, said
    assert storage_cost(services, "gcp", "us-central1", 100, 10) == (
        0.0,
        [
            "storage: no Filestore Zonal (NFSv4.1), default performance price in the catalog; "
            "priced at 0"
        ],
    )


# ---- placement ---------------------------------------------------------------------------------


def test_a_multi_node_cloud_estimate_adds_its_file_system_to_the_total(catalog: Catalog) -> None:
    east = site(catalog, "aws:us-east-1")
    est = estimate(east, workload(), catalog, Policy())
    assert est.feasible, est.reasons
    assert est.storage == "managed"
    assert est.hours == 10
    assert est.storage_usd == pytest.approx(100 * GB_PER_GIB * EFS * 10 / HOURS_PER_MONTH)
    assert est.total_usd == pytest.approx(est.compute_usd + est.data_usd + est.storage_usd)
    bigger = estimate(east, workload(storage_gib=400), catalog, Policy())
    assert bigger.storage_usd == pytest.approx(4 * est.storage_usd)
    assert bigger.compute_usd == est.compute_usd
    longer = estimate(east, workload(hours=25), catalog, Policy())
    assert longer.storage_usd == pytest.approx(2.5 * est.storage_usd)
    # no volumes: no storage
    none = estimate(east, workload(storage_gib=0), catalog, Policy())
    assert (none.storage, none.storage_usd) == ("", 0.0)
    assert none.total_usd == est.total_usd - est.storage_usd


def test_the_minimum_size_is_paid_even_for_small_volumes(catalog: Catalog, tmp_path: Path) -> None:
    """A catalog folder may carry its own storage prices (here: a made-up Filestore price,
    to see its 1 TiB minimum billed)."""
    folder = tmp_path / "catalog"
    shutil.copytree(CATALOG, folder)
    doc = json.loads(SHIPPED.read_text())
    doc["services"]["gcp"]["prices"] = {
        "us-central1": {"usd_per_month": 0.5, "sources": ["made up for this test"]}
    }
    (folder / "storage.json").write_text(json.dumps(doc))
    ours = load(folder)
    central = site(ours, "gcp:us-central1")
    est = estimate(central, workload(storage_gib=10), ours, Policy())
    assert est.storage_usd == pytest.approx(1024 * 0.5 * 10 / HOURS_PER_MONTH)
    assert est.guesses == []
    assert load(CATALOG).storage == shipped().storage  # a folder without one: the shipped


def test_one_node_or_a_first_node_share_costs_no_file_system(catalog: Catalog) -> None:
    east = site(catalog, "aws:us-east-1")
    one = estimate(east, workload(nodes=1), catalog, Policy())
    assert (one.storage, one.storage_usd) == ("node-local", 0.0)
    shared = estimate(
        site(catalog, "aws:us-east-1", "nfs-first-node"), workload(), catalog, Policy()
    )
    assert (shared.storage, shared.storage_usd) == ("nfs-first-node", 0.0)
    paid = estimate(site(catalog, "aws:us-east-1", "managed"), workload(nodes=1), catalog, Policy())
    assert (paid.storage, paid.storage_usd > 0) == ("managed", True)


def test_node_local_storage_on_several_nodes_makes_the_site_infeasible(catalog: Catalog) -> None:
    est = estimate(site(catalog, "aws:us-east-1", "node-local"), workload(), catalog, Policy())
    assert not est.feasible
    assert est.reasons == [
        "storage: node-local storage is for a cluster of one node; this one has 2 "
        "(use nfs-first-node or managed)"
    ]


def test_storage_can_decide_between_clouds(catalog: Catalog) -> None:
    """Where the file system is priced and elsewhere it is not known, the guess says so; the
    priced site's total carries its storage."""
    found = compare(workload(storage_gib=5000), catalog, cloud_sites(catalog), Policy())
    aws = next(e for e in found if e.site.name == "aws:us-east-1")
    gcp = next(e for e in found if e.site.name == "gcp:us-central1")
    assert aws.storage_usd == pytest.approx(5000 * GB_PER_GIB * EFS * 10 / HOURS_PER_MONTH)
    assert gcp.storage_usd == 0
    assert any(g.startswith("storage: no Filestore Zonal") for g in gcp.guesses)


# ---- one rule with the cluster spec's -----------------------------------------------------------


def _outcome(rule: Callable[..., object], *args: object) -> str:
    """What a rule answers: the class it chooses, or the error it raises."""
    try:
        chosen = rule(*args)
    except ValueError as exc:
        return f"error: {exc}"
    return chosen if isinstance(chosen, str) else str(getattr(chosen, "storage_class", chosen))


def test_the_storage_rule_is_the_cluster_specs() -> None:
    clouds, sizes = ("aws", "gcp", "azure", "onprem"), (1, 2, 5)
    choices = (None, "node-local", "nfs-first-node", "managed", "x")
    outcomes = set()
    for cloud, nodes, preferred in itertools.product(clouds, sizes, choices):
        ours = _outcome(storage_class, cloud, nodes, preferred)
        assert ours == _outcome(storage_for, cloud, nodes, 10, preferred)
        outcomes.add(ours.split(":")[0])
    assert outcomes == {"node-local", "nfs-first-node", "managed", "error"}


# ---- site configuration ------------------------------------------------------------------------


def test_sites_name_their_storage(tmp_path: Path, catalog: Catalog) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(
        "sites:\n"
        "  lab: {region: us-west-2, nodes: 4, shape: {cores: 64}, storage: nfs-first-node}\n"
        "storage:\n"
        "  aws: nfs-first-node\n"
        "  aws:us-east-2: managed\n"
    )
    [lab] = onprem_sites(path)
    assert lab.storage == "nfs-first-node"
    chosen = {s.name: s.storage for s in with_storage(cloud_sites(catalog), cloud_storage(path))}
    assert chosen["aws:us-east-1"] == "nfs-first-node"
    assert chosen["aws:us-east-2"] == "managed"  # the region's own wins
    assert chosen["gcp:us-central1"] is None
    path.write_text("storage:\n  aws: lustre\n")
    with pytest.raises(PolicyError, match="storage is one of node-local, nfs-first-node, managed"):
        cloud_storage(path)


def test_sites_name_the_share_that_keeps_persistent_volumes(
    tmp_path: Path, catalog: Catalog
) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(
        "persistent:\n"
        "  aws: fs-1.efs.us-east-1.amazonaws.com:/\n"
        "  aws:us-east-2: {share: '10.0.8.9:/team', subnet: subnet-0abc, cidr: 10.0.8.0/24}\n"
    )
    shares = persistent_shares(path)
    sites = {s.name: s for s in with_persistent_shares(cloud_sites(catalog), shares)}
    assert sites["aws:us-east-1"].persistent_share == "fs-1.efs.us-east-1.amazonaws.com:/"
    assert sites["aws:us-east-1"].persistent_subnet is None  # a run's own network reaches it
    assert sites["aws:us-east-2"].persistent_share == "10.0.8.9:/team"  # the region's own wins
    assert sites["aws:us-east-2"].persistent_subnet == ("subnet-0abc", "10.0.8.0/24")
    assert sites["gcp:us-central1"].persistent_share is None
    refused = {
        "fs-1.efs.amazonaws.com": "an NFS share is HOST:/PATH",
        "host:relative": "an NFS share is HOST:/PATH",
        "'host:/a b'": "an NFS share is HOST:/PATH",
        "{share: 'h:/x', subnet: subnet-1}": "give the subnet and its range",
        "{share: 'h:/x', subnet: subnet-1, cidr: nowhere}": "cidr: ",
        "{share: 'h:/x', subnet: subnet-1, cidr: 10.0.8.1/24}": "cidr: .* has host bits",
        "{share: 'h:/x', subnet: subnet-1, cidr: 0.0.0.0/0}": "cidr 0.0.0.0/0 is wider",
        "{share: 'h:/x', subnet: [subnet-1], cidr: 10.0.8.0/24}": "subnet is the id of one",
        "{share: 'h:/x', vpc: vpc-1}": "unknown vpc",
    }
    for value, message in refused.items():
        path.write_text(f"persistent:\n  aws:us-east-1: {value}\n")
        with pytest.raises(PolicyError, match=f"persistent of aws:us-east-1: {message}"):
            persistent_shares(path)
    # a subnet is a region's: not for every region of a cloud
    path.write_text("persistent:\n  aws: {share: 'h:/x', subnet: subnet-1, cidr: 10.0.8.0/24}\n")
    with pytest.raises(PolicyError, match="name it under CLOUD:REGION"):
        persistent_shares(path)
    path.write_text(
        "persistent:\n  gcp:us-central1: {share: '10.1.0.2:/vol', subnet: "
        "projects/p/regions/us-central1/subnetworks/team, cidr: 10.1.0.0/24}\n"
    )
    [(where, gcp)] = persistent_shares(path).items()
    assert where == "gcp:us-central1"
    assert gcp.subnet == ("projects/p/regions/us-central1/subnetworks/team", "10.1.0.0/24")
