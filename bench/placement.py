"""Placement speed and exactness, next to an ILP of the same model, in one run.

Run: .venv/bin/python bench/placement.py [--jobs 1000] [--sizes 5,10,20,50]

1. Squall's optimizer places a random 1,000-job DAG (random cores, memory, GPUs, task
   arrays, runtimes; 3 data moves) over every site of the reference catalog: best of 3.
2. For DAGs of 5 to 50 jobs, the same model as an integer program (one binary per site,
   one per site x job x instance type; each job takes one type at the chosen site), solved by
   CBC through PuLP as in the SkyPilot paper: both costs, and the time of each.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pulp  # noqa: E402

from federate.catalog import Catalog, load  # noqa: E402
from federate.placement import Site, cloud_sites, compare, estimate  # noqa: E402
from federate.policy import Policy  # noqa: E402
from federate.workload import DataMove, JobNeeds, Place, Workload  # noqa: E402

CATALOG = ROOT / "tests" / "catalog"


def random_workload(rng: random.Random, n: int) -> Workload:
    jobs = []
    for i in range(n):
        gpu = rng.random() < 0.15
        jobs.append(
            JobNeeds(
                name=f"j{i}",
                cores=rng.choice([1, 2, 4, 8, 16, 32]),
                memory_gib=rng.choice([1, 4, 16, 64]),
                gpus=rng.choice([1, 2, 8]) if gpu else 0,
                tasks=rng.choice([1, 1, 1, 10, 100]),
                concurrency=rng.choice([None, 4, 16]),
                runtime_hours=rng.choice([0.25, 1, 4]),
                runtime_source="annotation",
                depends_on=tuple(f"j{d}" for d in rng.sample(range(i), min(i, 2))),
            )
        )
    places = [
        Place("cloud", "aws", "us-west-2"),
        Place("cloud", "gcp", "europe-west4"),
        Place("internet"),
    ]
    data = tuple(
        DataMove(
            "ingress" if k < 2 else "egress",
            f"s3://b{k}/x",
            places[k],
            rng.choice([10, 500, 5000]) * 10**9,
            "object metadata",
        )
        for k in range(3)
    )
    return Workload(f"random-{n}", tuple(jobs), data)


def ilp(workload: Workload, catalog: Catalog, sites: list[Site], policy: Policy) -> float:
    """The same model as a 0-1 program, solved by CBC; the optimal total cost."""
    problem = pulp.LpProblem("placement", pulp.LpMinimize)
    x = {s.name: pulp.LpVariable(f"site_{i}", cat="Binary") for i, s in enumerate(sites)}
    objective = []
    problem += pulp.lpSum(x.values()) == 1
    for i, site in enumerate(sites):
        whole = estimate(site, workload, catalog, policy)
        if whole.reasons:  # infeasible under the policy, or a job fits nowhere here
            problem += x[site.name] == 0
            continue
        objective.append(whole.data_usd * x[site.name])
        for j, job in enumerate(workload.jobs):
            ys = []
            for k, t in enumerate(site.types):
                one = Site(site.name, site.kind, site.cloud, site.region, (t,), site.max_nodes)
                plans = estimate(one, Workload("w", (job,)), catalog, policy).jobs
                if not plans:
                    continue
                y = pulp.LpVariable(f"y_{i}_{j}_{k}", cat="Binary")
                ys.append(y)
                objective.append(plans[0].cost * y)
            problem += pulp.lpSum(ys) == x[site.name]
    problem += pulp.lpSum(objective)
    problem.solve(pulp.PULP_CBC_CMD(msg=False))
    return float(pulp.value(problem.objective))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--sizes", default="5,10,20,50")
    args = p.parse_args()
    catalog = load(CATALOG)
    sites = cloud_sites(catalog)
    policy = Policy()
    rng = random.Random(7)
    big = random_workload(rng, args.jobs)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        best = compare(big, catalog, sites, policy)[0]
        times.append(time.perf_counter() - t0)
    types = sum(len(s.types) for s in sites)
    print(
        f"{args.jobs}-job DAG over {len(sites)} sites ({types} site x type rows): "
        f"{min(times) * 1000:.0f} ms best of 3 -> {best.site.name} ${best.total_usd:,.2f}"
    )
    print(f"{'jobs':>5} {'Squall $':>14} {'ILP $':>14} {'Squall ms':>10} {'ILP ms':>10}")
    for n in map(int, args.sizes.split(",")):
        wl = random_workload(random.Random(n), n)
        t0 = time.perf_counter()
        ours = compare(wl, catalog, sites, policy)[0].total_usd
        t1 = time.perf_counter()
        theirs = ilp(wl, catalog, sites, policy)
        t2 = time.perf_counter()
        same = "same" if abs(ours - theirs) <= 1e-6 * max(1.0, ours) else "DIFFERENT"
        ms_ours, ms_ilp = (t1 - t0) * 1000, (t2 - t1) * 1000
        print(f"{n:>5} {ours:>14,.4f} {theirs:>14,.4f} {ms_ours:>10.1f} {ms_ilp:>10.0f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
