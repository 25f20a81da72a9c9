"""The cost model and the optimizer: what a workload costs at each site, and the cheapest.

A workload runs whole at one site. At a site, each job gets its own node group: the instance
type (or on-prem node shape) that makes that job cheapest while meeting its per-node needs
(cores, memory, GPU count and model; an HPC fabric for a multinode job where the site has
one). A task array runs `concurrency` tasks at once, packed onto as few nodes as fit them,
in as many waves as it takes. Compute costs price x nodes x hours. Data costs the fees of the
cloud the bytes leave: ingress from where the data lives into the site, egress from the site
to where results go, tiered by volume, grouped by the region that bills them. Storage costs
the cloud's managed file system, when the cluster's volumes live on one (`storage.py`), for
the run's expected hours.

Because the jobs' choices are independent once the site is fixed, the cheapest placement is
the cheapest site of per-job minima: exact for this model, and linear in sites x jobs x types.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .catalog import Catalog, EgressFees, InstanceType, continent
from .policy import Policy
from .storage import storage_class, storage_cost
from .workload import DataMove, JobNeeds, Place, Workload

__all__ = [
    "JobPlan",
    "Site",
    "SiteEstimate",
    "cloud_sites",
    "compare",
    "gpu_key",
    "gpu_matches",
    "transfer_fee",
]

GB = 1e9


@dataclass(frozen=True, slots=True)
class Site:
    """Somewhere to run: a cloud region (its catalog types), or an on-prem or local site
    (node shapes with an internal price and a node count)."""

    name: str
    kind: str  # cloud, onprem, local
    cloud: str = ""
    region: str = ""
    types: tuple[InstanceType, ...] = ()
    max_nodes: int | None = None  # on-prem: how many nodes there are
    free_from: frozenset[str] = frozenset()  # places (str(Place)) it reads without fees
    # what it cannot run yet, declared by its provider: (feature of a workload, why) pairs
    cannot: tuple[tuple[str, str], ...] = ()
    # where its clusters keep a run's volumes (a `storage.CLASSES` value, from the site's
    # configuration); None: node-local for one node, else the cloud's file system
    storage: str | None = None
    # a cloud region's NFS share (`HOST:/PATH`) that keeps persistent volumes across runs,
    # from the site's configuration; None: it keeps none
    persistent_share: str | None = None
    # the existing subnet a run there joins to reach that share, and its range; None: the
    # run's own new network reaches it
    persistent_subnet: tuple[str, str] | None = None
    # why it cannot take a run at the moment priced (an outlook's: busy until...); "": it can
    busy: str = ""

    @property
    def place(self) -> Place:
        if self.kind == "cloud":
            return Place("cloud", self.cloud, self.region)
        return Place("site", site=self.name, region=self.region)


def cloud_sites(catalog: Catalog) -> list[Site]:
    by_region: defaultdict[tuple[str, str], list[InstanceType]] = defaultdict(list)
    for t in catalog.instances:
        by_region[(t.cloud, t.region)].append(t)
    return [
        Site(f"{cloud}:{region}", "cloud", cloud, region, tuple(types))
        for (cloud, region), types in sorted(by_region.items())
    ]


def gpu_key(model: str) -> tuple[str, int | None]:
    """('H100', 80) from 'NVIDIA H100 80GB HBM3' or 'H100-80GB'; memory None if not given."""
    words = model.upper().replace("-", " ").replace("_", " ").split()
    name, memory = [], None
    for w in words:
        if w in ("NVIDIA", "AMD", "TESLA", "HBM3", "HBM3E", "HBM2E", "SXM", "SXM4", "SXM5", "PCIE"):
            continue
        if w.endswith("GB") and w[:-2].isdigit():
            memory = int(w[:-2])
            continue
        name.append(w)
    return "".join(name), memory


def gpu_matches(wanted: str, model: str) -> bool:
    """Whether a catalog GPU model is the one a job asks for (by name, and by memory when
    both say it)."""
    if not wanted:
        return True
    w, wm = gpu_key(wanted)
    m, mm = gpu_key(model)
    return w == m and (wm is None or mm is None or wm == mm)


@dataclass(frozen=True, slots=True)
class JobPlan:
    job: str
    instance: str
    nodes: int
    hours: float
    usd_per_hour: float
    spot: bool
    cost: float
    runtime_source: str


@dataclass(slots=True)
class SiteEstimate:
    site: Site
    feasible: bool
    reasons: list[str] = field(default_factory=list)
    jobs: list[JobPlan] = field(default_factory=list)
    compute_usd: float = 0.0
    data_usd: float = 0.0
    storage_usd: float = 0.0  # the managed file system of the run's volumes, for `hours`
    storage: str = ""  # where the volumes live (a storage class); "": no volumes
    hours: float = 0.0  # expected duration: the critical path
    guesses: list[str] = field(default_factory=list)  # which figures rest on guesses

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.data_usd + self.storage_usd


# ---- data ------------------------------------------------------------------------------------


def transfer_fee(
    source: Place, dest: Place, catalog: Catalog
) -> tuple[EgressFees | None, str, float]:
    """Who bills bytes going from `source` to `dest`, how (a class), and the flat per-GB rate
    (class "internet" is tiered: use the fees' internet tiers instead)."""
    if source.kind != "cloud":
        return None, "free", 0.0  # the internet and our own sites charge us nothing
    fees = catalog.egress.get((source.cloud, source.region))
    if fees is None:
        return None, "unknown", 0.0
    if dest.kind == "cloud" and dest.cloud == source.cloud:
        if dest.region == source.region:
            return fees, "same-region", fees.same_region
        if dest.region in fees.pairs:
            return fees, "region-pair", fees.pairs[dest.region]
        if continent(dest.cloud, dest.region) == continent(source.cloud, source.region):
            return fees, "same-continent", fees.same_continent
        return fees, "other-continent", fees.other_continent
    return fees, "internet", 0.0


def _data_cost(
    site: Site, moves: Sequence[DataMove], catalog: Catalog, free_allowance: bool
) -> tuple[float, list[str]]:
    guesses = []
    internet: defaultdict[tuple[str, str], float] = defaultdict(float)
    flat = 0.0
    for move in moves:
        src, dst = (
            (move.place, site.place) if move.direction == "ingress" else (site.place, move.place)
        )
        if move.direction == "ingress" and str(move.place) in site.free_from:
            continue
        if move.size_bytes is None:
            guesses.append(f"{move.uri}: size unknown, priced at 0")
            continue
        if move.size_source != "object metadata":
            guesses.append(f"{move.uri}: size from {move.size_source}")
        fees, how, rate = transfer_fee(src, dst, catalog)
        gb = move.size_bytes / GB
        if how == "internet" and fees is not None:
            internet[(fees.cloud, fees.region)] += gb
        else:
            flat += gb * rate
    cost = flat + sum(
        catalog.egress[key].internet_cost(gb, free_allowance=free_allowance)
        for key, gb in internet.items()
    )
    return cost, guesses


# ---- storage ---------------------------------------------------------------------------------


def _storage(est: SiteEstimate, workload: Workload, catalog: Catalog) -> None:
    """Where a cloud cluster keeps the run's volumes, and what that costs for the run's hours
    (a reason when it cannot hold them). Off the clouds the volumes live on the site's own
    disks, which its rates include."""
    site = est.site
    if workload.storage_gib <= 0 or site.kind != "cloud" or not est.jobs:
        return
    nodes = sum(p.nodes for p in est.jobs)  # one node group per job, as the cluster is made
    try:
        est.storage = storage_class(site.cloud, nodes, site.storage)
        if est.storage == "managed":
            est.storage_usd, guesses = storage_cost(
                catalog.storage, site.cloud, site.region, workload.storage_gib, est.hours
            )
            est.guesses += guesses
    except ValueError as exc:
        est.reasons.append(f"storage: {exc}")


# ---- compute ---------------------------------------------------------------------------------


def _price(t: InstanceType, spot: bool) -> tuple[float, bool] | None:
    if spot and t.price_spot is not None:
        return t.price_spot, True
    if t.price_ondemand is not None:
        return t.price_ondemand, False
    return None


def _fits(t: InstanceType, job: JobNeeds, policy: Policy) -> bool:
    if t.vcpus < job.cores or t.memory_gib < job.memory_gib or t.arch != job.arch:
        return False
    if job.gpus:
        if t.gpu_count < job.gpus or not gpu_matches(job.gpu_model, t.gpu_model):
            return False
        if policy.gpu_models and not any(gpu_matches(m, t.gpu_model) for m in policy.gpu_models):
            return False
    return True


def _plan_job(site: Site, job: JobNeeds, policy: Policy) -> tuple[JobPlan | None, str]:
    candidates = [t for t in site.types if _fits(t, job, policy)]
    if not candidates:
        return None, f"{job.name}: no node here has {_needs(job)}"
    if job.multinode:
        fabric = [t for t in candidates if t.hpc_fabric]
        if fabric:
            candidates = fabric
    hours = job.runtime_hours if job.runtime_hours is not None else 1.0
    best: tuple[float, float, str, int, int, bool] | None = None  # cost, rate, type, ...
    for t in candidates:
        priced = _price(t, policy.spot)
        if priced is None:
            continue
        rate, spot = priced
        if job.multinode or job.tasks == 1:
            nodes, waves = job.nodes, 1
        else:
            per_node = t.vcpus // job.cores
            if job.memory_gib:
                per_node = min(per_node, int(t.memory_gib // job.memory_gib))
            if job.gpus:
                per_node = min(per_node, int(t.gpu_count // job.gpus))
            parallel = min(job.tasks, job.concurrency or job.tasks)
            nodes = -(-parallel // max(per_node, 1))
            waves = -(-job.tasks // parallel)
        if site.max_nodes is not None and nodes > site.max_nodes:
            if job.multinode and job.nodes > site.max_nodes:
                continue
            nodes = site.max_nodes
            per_wave = max(nodes * max(t.vcpus // job.cores, 1), 1)
            waves = -(-job.tasks // per_wave)
        option = (rate * nodes * hours * waves, rate, t.name, nodes, waves, spot)
        if best is None or option[:3] < best[:3]:
            best = option
    if best is None:
        return None, f"{job.name}: nothing that fits has a price here"
    cost, rate, name, nodes, waves, spot = best
    plan = JobPlan(job.name, name, nodes, hours * waves, rate, spot, cost, job.runtime_source)
    return plan, ""


def _shape(job: JobNeeds) -> tuple[object, ...]:
    """What a job's plan depends on (not its name or dependencies)."""
    return (
        job.cores,
        job.memory_gib,
        job.gpus,
        job.gpu_model,
        job.nodes,
        job.multinode,
        job.tasks,
        job.concurrency,
        job.runtime_hours,
        job.runtime_source,
        job.arch,
    )


def _needs(job: JobNeeds) -> str:
    parts = [f"{job.cores} cores", f"{job.memory_gib:g} GiB"]
    if job.gpus:
        parts.append(f"{job.gpus} x {job.gpu_model or 'any'} GPU")
    return ", ".join(parts)


def _critical_path(jobs: Iterable[JobNeeds], hours: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    pending = {j.name: j for j in jobs}
    while pending:
        progressed = False
        for name, job in list(pending.items()):
            if all(d in finish or d not in hours for d in job.depends_on):
                start = max((finish.get(d, 0.0) for d in job.depends_on), default=0.0)
                finish[name] = start + hours.get(name, 0.0)
                del pending[name]
                progressed = True
        if not progressed:  # a cycle (the validator refuses those): sum what is left
            return max(finish.values(), default=0.0) + sum(hours[n] for n in pending)
    return max(finish.values(), default=0.0)


# ---- policy and the optimizer ----------------------------------------------------------------


def _policy_reasons(site: Site, workload: Workload, policy: Policy) -> list[str]:
    reasons = []
    if site.kind == "cloud":
        if policy.allowed_clouds and site.cloud not in policy.allowed_clouds:
            reasons.append(f"policy: cloud {site.cloud} is not allowed")
        if policy.allowed_regions and site.region not in policy.allowed_regions:
            reasons.append(f"policy: region {site.region} is not allowed")
    elif policy.allowed_sites and site.name not in policy.allowed_sites:
        reasons.append(f"policy: site {site.name} is not allowed")
    tags = set(workload.tags) | {t for m in workload.data for t in m.place.tags}
    for tag in sorted(tags):
        regions = policy.residency.get(tag)
        if regions is not None and site.region not in regions:
            reasons.append(f"policy: data tagged {tag!r} must stay in {', '.join(sorted(regions))}")
    return reasons


def estimate(
    site: Site,
    workload: Workload,
    catalog: Catalog,
    policy: Policy,
    *,
    free_allowance: bool = False,
) -> SiteEstimate:
    gaps = [why for feature, why in site.cannot if feature in workload.features]
    if site.busy:
        gaps.append(site.busy)
    est = SiteEstimate(
        site=site, feasible=True, reasons=[*gaps, *_policy_reasons(site, workload, policy)]
    )
    plans: dict[tuple[object, ...], tuple[JobPlan | None, str]] = {}  # DAGs repeat shapes
    for job in workload.jobs:
        shape = _shape(job)
        if shape not in plans:
            plans[shape] = _plan_job(site, replace(job, name=""), policy)
        plan, why = plans[shape]
        if plan is not None:
            plan = JobPlan(
                job.name,
                plan.instance,
                plan.nodes,
                plan.hours,
                plan.usd_per_hour,
                plan.spot,
                plan.cost,
                plan.runtime_source,
            )
        else:
            why = job.name + why
        if plan is None:
            est.reasons.append(why)
            continue
        est.jobs.append(plan)
        if job.runtime_source != "annotation":
            est.guesses.append(
                f"{job.name}: runtime "
                + (
                    "assumed 1 h (no annotation, history or timeout)"
                    if job.runtime_hours is None
                    else f"from {job.runtime_source}"
                )
            )
    est.compute_usd = sum(p.cost for p in est.jobs)
    est.data_usd, data_guesses = _data_cost(site, workload.data, catalog, free_allowance)
    est.guesses += data_guesses
    est.hours = _critical_path(workload.jobs, {p.job: p.hours for p in est.jobs})
    _storage(est, workload, catalog)
    if policy.budget_usd is not None and est.total_usd > policy.budget_usd and not est.reasons:
        est.reasons.append(
            f"policy: costs ${est.total_usd:,.2f}, over the budget of ${policy.budget_usd:,.2f}"
        )
    est.feasible = not est.reasons
    return est


def compare(
    workload: Workload,
    catalog: Catalog,
    sites: Sequence[Site],
    policy: Policy,
    *,
    free_allowance: bool = False,
) -> list[SiteEstimate]:
    """Every site's estimate: the feasible ones cheapest first, then the others with why. At
    equal cost, this machine comes before an on-prem site, and that before a cloud."""
    estimates = [
        estimate(s, workload, catalog, policy, free_allowance=free_allowance) for s in sites
    ]
    rank = {"local": 0, "onprem": 1}
    return sorted(
        estimates,
        key=lambda e: (not e.feasible, e.total_usd, rank.get(e.site.kind, 2), e.site.name),
    )
