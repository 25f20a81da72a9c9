"""Pricing and placement against the dated reference catalog (tests/catalog, a copy of the
shared snapshot, 2026). Every expected figure is worked out by hand from its rows."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from federate.catalog import Catalog, load
from federate.placement import Site, cloud_sites, compare, estimate, gpu_matches
from federate.policy import Policy
from federate.workload import DataMove, JobNeeds, Place, Workload

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
US_WEST_2 = Place("cloud", "aws", "us-west-2")


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load(CATALOG)


def cpu_workload(gb: float) -> Workload:
    crunch = JobNeeds(
        "crunch", cores=32, memory_gib=64, runtime_hours=10, runtime_source="annotation"
    )
    data = DataMove("ingress", "s3://bucket/input", US_WEST_2, int(gb * 1e9), "object metadata")
    return Workload("cpu", (crunch,), (data,))


def test_big_data_pulls_the_run_to_its_region_and_small_data_does_not(catalog: Catalog) -> None:
    sites = cloud_sites(catalog)
    far = compare(cpu_workload(10), catalog, sites, Policy())
    best = far[0]
    # n2-standard-32 at 1.55389 $/h for 10 h, plus 10 GB leaving AWS at 0.09 $/GB
    assert best.site.name == "gcp:us-central1"
    assert best.jobs[0].instance == "n2-standard-32"
    assert best.compute_usd == pytest.approx(15.5389)
    assert best.data_usd == pytest.approx(0.90)
    home = next(e for e in far if e.site.name == "aws:us-west-2")
    assert home.total_usd == pytest.approx(32.6592)  # c8in.12xlarge 3.26592 $/h, data free

    near = compare(cpu_workload(2000), catalog, sites, Policy())
    assert near[0].site.name == "aws:us-west-2"
    assert near[0].total_usd == pytest.approx(32.6592)
    gcp = next(e for e in near if e.site.name == "gcp:us-central1")
    assert gcp.data_usd == pytest.approx(2000 * 0.09)  # every band of AWS's first 10 TB
    east = next(e for e in near if e.site.name == "aws:us-east-1")
    assert east.data_usd == pytest.approx(2000 * 0.02)  # between AWS regions in the US


def test_a_four_node_gpu_mpi_job_gets_an_efa_type(catalog: Catalog) -> None:
    mpi = JobNeeds(
        "train",
        cores=32,
        memory_gib=256,
        gpus=8,
        gpu_model="NVIDIA H100 80GB HBM3",
        nodes=4,
        multinode=True,
        runtime_hours=2,
        runtime_source="annotation",
    )
    result = compare(
        Workload("mpi", (mpi,)),
        catalog,
        cloud_sites(catalog),
        Policy(allowed_clouds=frozenset({"aws"})),
    )
    best = result[0]
    assert best.feasible
    plan = best.jobs[0]
    chosen = next(t for t in best.site.types if t.name == plan.instance)
    assert chosen.fabric == "efa"
    assert chosen.efa_interfaces > 1
    assert gpu_matches("H100", chosen.gpu_model)
    assert plan.nodes == 4
    assert plan.cost == pytest.approx(chosen.price_ondemand * 4 * 2)  # type: ignore[operator]


def test_residency_keeps_eu_data_in_the_eu(catalog: Catalog) -> None:
    eu = frozenset({"eu-west-1", "europe-west1", "europe-west4", "westeurope", "swedencentral"})
    data = DataMove(
        "ingress",
        "s3://eu-bucket/x",
        Place("cloud", "aws", "eu-west-1", tags=frozenset({"eu"})),
        10**9,
        "object metadata",
    )
    wl = Workload(
        "eu",
        (JobNeeds("j", cores=4, memory_gib=8, runtime_hours=1, runtime_source="annotation"),),
        (data,),
    )
    result = compare(wl, catalog, cloud_sites(catalog), Policy(residency={"eu": eu}))
    feasible = [e for e in result if e.feasible]
    assert feasible
    assert {e.site.region for e in feasible} <= eu
    us = next(e for e in result if e.site.name == "aws:us-east-1")
    assert not us.feasible
    assert us.reasons == ["policy: data tagged 'eu' must stay in " + ", ".join(sorted(eu))]


def test_a_budget_refuses_a_run_that_costs_more(catalog: Catalog) -> None:
    result = compare(cpu_workload(10), catalog, cloud_sites(catalog), Policy(budget_usd=10.0))
    assert not any(e.feasible for e in result)
    cheapest = min(result, key=lambda e: e.total_usd)
    assert cheapest.reasons == [
        f"policy: costs ${cheapest.total_usd:,.2f}, over the budget of $10.00"
    ]
    allowed = compare(cpu_workload(10), catalog, cloud_sites(catalog), Policy(budget_usd=20.0))
    assert allowed[0].feasible


def test_egress_tiers_follow_the_bands(catalog: Catalog) -> None:
    fees = catalog.egress[("aws", "us-east-1")]
    assert fees.internet_cost(100, free_allowance=True) == 0
    assert fees.internet_cost(20_000, free_allowance=True) == pytest.approx(
        (10_240 - 100) * 0.09 + (20_000 - 10_240) * 0.085
    )
    assert fees.internet_cost(50) == pytest.approx(50 * 0.09)  # the allowance is not counted
    gcp = catalog.egress[("gcp", "us-central1")]
    gib = 100e9 / 2**30  # 100 GB in GiB, the unit GCP bills
    assert gcp.internet_cost(100) == pytest.approx(gib * 0.12)


def test_task_arrays_pack_nodes_and_run_in_waves(catalog: Catalog) -> None:
    site = next(s for s in cloud_sites(catalog) if s.name == "aws:us-east-1")
    array = JobNeeds(
        "sweep",
        cores=1,
        memory_gib=1,
        tasks=100,
        concurrency=10,
        runtime_hours=0.5,
        runtime_source="annotation",
    )
    est = estimate(site, Workload("a", (array,)), catalog, Policy())
    plan = est.jobs[0]
    chosen = next(t for t in site.types if t.name == plan.instance)
    per_node = min(chosen.vcpus, int(chosen.memory_gib))
    assert plan.nodes == math.ceil(10 / per_node)
    assert plan.hours == pytest.approx(0.5 * 10)  # 100 tasks, 10 at a time
    assert est.hours == pytest.approx(5.0)


def _brute_force(workload: Workload, site: Site, policy: Policy) -> float:
    """Every assignment of instance types to jobs; the cheapest."""
    options = []
    for job in workload.jobs:
        costs = []
        for t in site.types:
            one = Site(site.name, site.kind, site.cloud, site.region, (t,))
            plan = estimate(one, Workload("w", (job,)), load(CATALOG), policy).jobs
            if plan:
                costs.append(plan[0].cost)
        options.append(costs or [math.inf])
    return min(sum(combo) for combo in itertools.product(*options))


@pytest.mark.parametrize("seed", range(6))
def test_the_optimizer_equals_brute_force_on_small_cases(catalog: Catalog, seed: int) -> None:
    rng = random.Random(seed)
    sites = rng.sample(cloud_sites(catalog), 3)
    sites = [
        Site(s.name, s.kind, s.cloud, s.region, tuple(rng.sample(s.types, min(4, len(s.types)))))
        for s in sites
    ]
    jobs = tuple(
        JobNeeds(
            f"j{i}",
            cores=rng.choice([1, 2, 4, 8]),
            memory_gib=rng.choice([1, 4, 16]),
            runtime_hours=rng.choice([0.5, 1, 3]),
            runtime_source="annotation",
        )
        for i in range(3)
    )
    wl = Workload("w", jobs)
    result = compare(wl, catalog, sites, Policy())
    best = min(_brute_force(wl, s, Policy()) for s in sites)
    feasible = [e for e in result if e.feasible]
    if math.isinf(best):
        assert not feasible
    else:
        assert feasible[0].compute_usd == pytest.approx(best)
