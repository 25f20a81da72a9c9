"""PLACING: ask federation where a workflow should run, and keep its answer with the run.

The candidates are the local site (this machine, free to use, but data pulled from a cloud
costs that cloud's egress), the on-prem sites in the sites file, and every cloud region of
the catalog (the one shipped with Squall unless $SQUALL_CATALOG names another). Federation
prices each under the team's policy; the engine runs where it says only if it can provision
that site, else the run fails and says where it would have gone. `--site NAME` forces a site.

`Placer.compare` is the one code path: PLACING decides from it and `squall federate compare`
shows it, so for the same workflow, configuration and history they give the same answer. A
script can call it too:

    placer = Placer.from_environment()
    comparison = placer.compare(workflow, "me/pipeline-1")
    comparison.chosen, comparison.as_dict()
"""

from __future__ import annotations

import getpass
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select

from federate.catalog import Catalog, open_catalog
from federate.outlook import Outlook
from federate.placement import Site, SiteEstimate, cloud_sites, compare
from federate.policy import Policy, PolicyError, load_policy, narrow, parse_policy
from federate.sites import (
    bucket_locations,
    cloud_storage,
    local_price,
    local_site,
    onprem_sites,
    persistent_shares,
    vm_site,
    with_persistent_shares,
    with_storage,
)
from federate.spend import Rates, rates_of
from federate.workload import Workload

from .data import RemoteFacts, describe
from .errors import UsageError
from .federation import workload_of
from .fuzzfile.model import Workflow
from .identity import groups_of
from .provision import LocalProvisioner, this_machine
from .provision.cloud import CloudProvisioner
from .provision.vm import SITE as VM_SITE
from .provision.vm import VmProvisioner, VmSettings
from .secrets import SecretStore
from .store import Job as JobRow
from .store import Run, RunState, Store, Task, TaskState

__all__ = ["Comparison", "Decide", "Placement", "Placer", "candidate_sites"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Federation's answer: the record kept with the run, and (to size a cloud cluster) the
    chosen site's estimate and the workload it priced."""

    record: dict[str, Any]
    chosen: SiteEstimate | None = None
    workload: Workload | None = None


class Decide(Protocol):
    """What the engine places a run with (`Placer.decide`)."""

    def __call__(
        self,
        wf: Workflow,
        name: str,
        *,
        budget_usd: float | None = None,
        policy: str = "",
        exclude: Mapping[str, str] | None = None,
        owner: str = "",
    ) -> Placement: ...


@dataclass(frozen=True, slots=True)
class Comparison:
    """Every candidate site's estimate for one workflow, the feasible ones cheapest first,
    then the others with why: what PLACING chooses from and what `compare` shows."""

    workload: Workload
    estimates: list[SiteEstimate]
    catalog_date: str
    catalog_origin: str
    forced: bool = False
    policy: Policy = field(default_factory=Policy)
    rates: Rates | None = None  # what the chosen site costs while the run holds it

    @property
    def chosen(self) -> SiteEstimate | None:
        return next((e for e in self.estimates if e.feasible), None)

    def record(self) -> dict[str, Any]:
        """What is kept with the run: the chosen site, its estimate, and the runners-up."""
        chosen = self.chosen
        return {
            "catalog_date": self.catalog_date,
            "forced": self.forced,
            "site": chosen.site.name if chosen else None,
            "estimate": _brief(chosen) if chosen else None,
            "alternatives": [_brief(e) for e in _runners_up(self.estimates, chosen)],
            "rates": self.rates.as_dict() if self.rates else None,
            "budget": {
                "run_usd": self.policy.budget_usd,
                "team": self.policy.team,
                "monthly_usd": self.policy.monthly_budget_usd,
            },
        }

    def refusals(self, count: int = 3) -> str:
        """Why the first `count` sites could not take it (a site's own reasons before a
        policy's refusal of whole clouds or sites)."""
        shown = _runners_up(self.estimates, self.chosen)[:count]
        return "; ".join(f"{e.site.name}: {', '.join(e.reasons)}" for e in shown) or "no sites"

    def as_dict(self) -> dict[str, Any]:
        """Everything, as plain data (what `compare -o json` prints)."""
        chosen = self.chosen
        return {
            "workflow": self.workload.name,
            "catalog": self.catalog_origin,
            "catalog_date": self.catalog_date,
            "chosen": chosen.site.name if chosen else None,
            "total_usd": round(chosen.total_usd, 4) if chosen else None,
            "sites": [_row(e) for e in self.estimates],
        }


@dataclass(slots=True)
class Placer:
    catalog_dir: Path | None = None  # None: the catalog shipped with Squall
    policy_file: Path | None = None
    sites_file: Path | None = None
    force_site: str | None = None
    # to ask s3 sources for their size and region, with the credentials the run's owner has
    secrets: SecretStore | None = None
    ca_file: str | None = None
    store: Store | None = None  # earlier runs, for runtimes
    # what `squall federate compare` may add to the configuration
    buckets: Mapping[str, str] = field(default_factory=dict)  # BUCKET -> CLOUD:REGION
    spot: bool | None = None  # overrides the policy
    budget_usd: float | None = None  # overrides the policy
    free_allowance: bool = False
    clouds_only: bool = False
    look_up_sources: bool = True  # ask sources for sizes and buckets for regions
    local_nodes: int = 1  # nodes of the local site's clusters (`squall run --nodes`)
    outlook: Outlook | None = None  # how sites change over time (schedules' windows)
    # what sources said of their size and region, kept (a scheduler prices one workflow at
    # many moments); None: asked each time
    looked: dict[tuple[str, str | None], RemoteFacts] | None = None

    @classmethod
    def from_environment(
        cls,
        force_site: str | None = None,
        secrets: SecretStore | None = None,
        store: Store | None = None,
        local_nodes: int = 1,
    ) -> Placer:
        """$SQUALL_CATALOG, $SQUALL_POLICY, $SQUALL_SITES (each optional)."""

        def path(name: str) -> Path | None:
            return Path(os.environ[name]) if os.environ.get(name) else None

        return cls(
            path("SQUALL_CATALOG"),
            path("SQUALL_POLICY"),
            path("SQUALL_SITES"),
            force_site,
            secrets,
            store=store,
            local_nodes=local_nodes,
        )

    def _sites(self, catalog: Catalog) -> list[Site]:
        if self.clouds_only:
            return _clouds(catalog, self.sites_file)
        sites = candidate_sites(catalog, self.sites_file, self.local_nodes)
        if self.force_site == VM_SITE:  # VMs of the node image here: only when asked for
            vms = VmSettings.from_environment()
            sites.append(vm_site(vms.cpus, vms.memory_mib / 1024, vms.max_nodes))
        return sites

    def site_names(self) -> frozenset[str]:
        """The names of the sites that are not clouds' regions: this machine, the VM site and
        the on-prem sites (what an access policy's `sites` may name besides clouds)."""
        sites = candidate_sites(open_catalog(self.catalog_dir), self.sites_file, self.local_nodes)
        return frozenset({VM_SITE} | {s.name for s in sites if s.kind != "cloud"})

    def place(self, wf: Workflow, name: str) -> dict[str, Any]:
        """The placement record: the chosen site, its estimate, and the runners-up."""
        return self.decide(wf, name).record

    def decide(
        self,
        wf: Workflow,
        name: str,
        *,
        budget_usd: float | None = None,
        policy: str = "",
        exclude: Mapping[str, str] | None = None,
        owner: str = "",
    ) -> Placement:
        """Where `wf` runs as `name`. `budget_usd` (the run's own) and `policy` (a
        schedule's, as YAML text) can only narrow the configured policy; `exclude`: sites
        it may not go to, with why (those a moving run lost its nodes at); `owner`: whose
        secrets open its sources ("": this machine's user)."""
        comparison = self.compare(
            wf, name, budget_usd=budget_usd, policy=policy, exclude=exclude, owner=owner
        )
        return Placement(comparison.record(), comparison.chosen, comparison.workload)

    def compare(
        self,
        wf: Workflow,
        name: str,
        *,
        budget_usd: float | None = None,
        policy: str = "",
        at: datetime | None = None,
        exclude: Mapping[str, str] | None = None,
        owner: str = "",
    ) -> Comparison:
        """Price `wf` (to run as `name`) at every candidate site, as they stand `at` (None:
        now; a later moment as the outlook foresees it); its sources are asked with the
        secrets of `owner` ("": this machine's user). Raises UsageError, in one line,
        when the configuration cannot be read or the forced site does not exist."""
        try:
            team = load_policy(self.policy_file) if self.policy_file else Policy()
            if policy:
                team = narrow(team, parse_policy(policy, "its schedule's policy"))
            catalog = open_catalog(self.catalog_dir)
            sites = [_with_gaps(site) for site in self._sites(catalog)]
            if self.outlook is not None:
                sites = self.outlook.sites_at(sites, at or datetime.now(UTC))
            if exclude:
                sites = [
                    replace(x, busy=exclude[x.name]) if x.name in exclude else x for x in sites
                ]
            buckets = bucket_locations(self.sites_file) if self.sites_file else {}
        except (PolicyError, OSError, ValueError) as exc:
            raise UsageError(f"cannot place {name}: {exc}") from None
        buckets |= self.buckets
        if self.spot is not None:  # `compare --spot/--no-spot`: a what-if
            team = replace(team, spot=self.spot)
        if self.budget_usd is not None:  # `compare --budget`: a what-if
            team = replace(team, budget_usd=self.budget_usd)
        if budget_usd is not None:  # a run's own budget: below the policy's, never above
            team = narrow(team, Policy(budget_usd=budget_usd, spot=True))
        rules = team
        if self.force_site is not None:  # forced: no rules, but the budgets still hold
            sites = [self._forced(sites)]
            rules = Policy(spot=team.spot, gpu_models=team.gpu_models)
        workload = workload_of(
            wf,
            name,
            buckets,
            look=partial(self._look, owner or getpass.getuser()) if self.look_up_sources else None,
            history=self._history(name),
        )
        estimates = compare(workload, catalog, sites, rules, free_allowance=self.free_allowance)
        chosen = next((e for e in estimates if e.feasible), None)
        return Comparison(
            workload,
            estimates,
            catalog.date,
            catalog.origin,
            forced=self.force_site is not None,
            policy=team,
            rates=rates_of(chosen, workload, catalog) if chosen else None,
        )

    def check_site(self) -> None:
        """Raise UsageError, in one line, when the forced site is not one of the candidates:
        called before a run is recorded, so that a typo records nothing."""
        if self.force_site is None:
            return
        try:
            sites = self._sites(open_catalog(self.catalog_dir))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the sites: {exc}") from None
        self._forced(sites)

    def _forced(self, sites: list[Site]) -> Site:
        for site in sites:
            if site.name == self.force_site:
                return site
        known = ", ".join(s.name for s in sites)
        raise UsageError(f"no site named {self.force_site!r}; the sites are {known}")

    def _history(self, name: str) -> dict[str, float]:
        """Median hours per task of each job over the last ten finished runs named like this
        one (`me/pipeline-7` is like `me/pipeline-3`)."""
        if self.store is None:
            return {}
        stem = name.rsplit("-", 1)[0]
        with self.store.session() as s:
            runs = s.scalars(
                select(Run.id)
                .where(Run.state == RunState.FINISHED, Run.name.like(f"{stem}-%"))
                .order_by(Run.finished_at.desc())
                .limit(10)
            ).all()
            rows = s.execute(
                select(JobRow.name, JobRow.started_at, JobRow.finished_at, func.count(Task.id))
                .join(Task, Task.job_id == JobRow.id)
                .where(JobRow.run_id.in_(runs), JobRow.state == TaskState.FINISHED)
                .group_by(JobRow.id)
            ).all()
        hours: dict[str, list[float]] = {}
        for job, started, finished, tasks in rows:
            if started is not None and finished is not None:
                elapsed = (finished - started).total_seconds() / 3600
                hours.setdefault(job, []).append(elapsed / max(tasks, 1))
        return {job: statistics.median(values) for job, values in hours.items()}

    def _look(self, owner: str, uri: str, secret: str | None) -> RemoteFacts:
        """What `uri` says of itself, asked with `owner`'s secret `secret`."""
        key = (uri, f"{secret} of {owner}" if secret else None)  # another owner's differs
        if self.looked is not None and key in self.looked:
            return self.looked[key]
        credentials = None
        if secret and self.secrets:
            view = self.secrets.view(owner, groups_of(self.secrets.store, owner))
            credentials = view.credentials(secret)
        facts = describe(uri, credentials=credentials, ca_file=self.ca_file)
        if self.looked is not None:
            self.looked[key] = facts
        return facts


def _with_gaps(site: Site) -> Site:
    """`site` with what its provider declares it cannot run yet (federation reads it); a
    cloud region with a share for persistent volumes keeps them."""
    cannot = {
        "local": LocalProvisioner.cannot,
        "cloud": CloudProvisioner.cannot,
        "vm": VmProvisioner.cannot,
    }.get(site.kind)
    if cannot and site.persistent_share:
        cannot = {k: v for k, v in cannot.items() if k != "persistent volumes"}
    return replace(site, cannot=tuple(cannot.items())) if cannot else site


def candidate_sites(catalog: Catalog, sites_file: Path | None, local_nodes: int = 1) -> list[Site]:
    """This machine (as `local_nodes` nodes that share it), the on-prem sites of
    `sites_file`, and the catalog's cloud regions."""
    machine = this_machine()
    sites = [
        local_site(
            cores=max(machine.cores // local_nodes, 1),
            memory_gib=machine.memory_bytes / local_nodes / 2**30,
            gpus=len(machine.gpus) // local_nodes,
            gpu_model=machine.gpus[0].model if machine.gpus else "",
            nodes=local_nodes,
            price=local_price(sites_file) if sites_file is not None else None,
        )
    ]
    if sites_file is not None:
        sites += onprem_sites(sites_file)
    return sites + _clouds(catalog, sites_file)


def _clouds(catalog: Catalog, sites_file: Path | None) -> list[Site]:
    """The catalog's cloud regions, each with the storage and the share for persistent
    volumes the sites file chose for it."""
    clouds = cloud_sites(catalog)
    if sites_file is None:
        return clouds
    clouds = with_storage(clouds, cloud_storage(sites_file))
    return with_persistent_shares(clouds, persistent_shares(sites_file))


def _runners_up(estimates: list[SiteEstimate], chosen: SiteEstimate | None) -> list[SiteEstimate]:
    """The five or six sites shown besides the chosen one: the feasible ones, cheapest first,
    then those that could not take it for a reason of their own (its budget, its size), and
    last the sites the policy does not allow at all."""

    def excluded(e: SiteEstimate) -> bool:
        return bool(e.reasons) and all(r.endswith("is not allowed") for r in e.reasons)

    others = [e for e in estimates if e is not chosen]
    return sorted(others, key=excluded)[: 6 if chosen is None else 5]


def _brief(e: SiteEstimate) -> dict[str, Any]:
    return {
        "site": e.site.name,
        "feasible": e.feasible,
        "reasons": e.reasons,
        "total_usd": e.total_usd,
        "compute_usd": e.compute_usd,
        "data_usd": e.data_usd,
        "storage_usd": e.storage_usd,
        "storage": e.storage,
        "hours": e.hours,
        "jobs": {p.job: f"{p.instance} x{p.nodes}" for p in e.jobs},
        "guesses": e.guesses,
    }


def _row(e: SiteEstimate) -> dict[str, Any]:
    return {
        "site": e.site.name,
        "feasible": e.feasible,
        "reasons": e.reasons,
        "jobs": [
            {
                "job": p.job,
                "instance": p.instance,
                "nodes": p.nodes,
                "hours": p.hours,
                "usd_per_hour": p.usd_per_hour,
                "spot": p.spot,
                "cost_usd": round(p.cost, 4),
                "runtime_source": p.runtime_source,
            }
            for p in e.jobs
        ],
        "compute_usd": round(e.compute_usd, 4),
        "data_usd": round(e.data_usd, 4),
        "storage_usd": round(e.storage_usd, 4),
        "storage": e.storage,
        "total_usd": round(e.total_usd, 4),
        "hours": e.hours,
        "guesses": e.guesses,
    }
