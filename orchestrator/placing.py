"""PLACING: ask federation where a workflow should run, and keep its answer with the run.

The candidates are the local site (this machine, free to use, but data pulled from a cloud
costs that cloud's egress), the on-prem sites in the sites file, and, when a catalog is
configured, every cloud region in it. Federation prices each under the team's policy; the
engine runs where it says only if it can provision that site, else the run fails and says
where it would have gone. `--site NAME` forces a site.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federate.catalog import Catalog, load
from federate.placement import Site, SiteEstimate, cloud_sites, compare
from federate.policy import Policy, PolicyError, load_policy
from federate.sites import local_site, onprem_sites
from substrate.inventory import read_cpus, read_gpus, read_memory_bytes

from .data import RemoteFacts, describe
from .errors import InvalidInput
from .federation import workload_of
from .fuzzfile.model import Workflow
from .secrets import SecretStore

__all__ = ["Placer"]


@dataclass(slots=True)
class Placer:
    catalog_dir: Path | None = None
    policy_file: Path | None = None
    sites_file: Path | None = None
    force_site: str | None = None
    secrets: SecretStore | None = None  # to ask s3 sources for their size and region
    ca_file: str | None = None

    @classmethod
    def from_environment(
        cls, force_site: str | None = None, secrets: SecretStore | None = None
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
        )

    def _sites(self, catalog: Catalog | None) -> list[Site]:
        cpus = read_cpus()
        gpus = read_gpus()
        sites = [
            local_site(
                cores=len({(c.socket, c.core) for c in cpus}),
                memory_gib=read_memory_bytes() * 0.9 / 2**30,
                gpus=len(gpus),
                gpu_model=gpus[0].model if gpus else "",
            )
        ]
        if self.sites_file is not None:
            sites += onprem_sites(self.sites_file)
        if catalog is not None:
            sites += cloud_sites(catalog)
        return sites

    def place(self, wf: Workflow, name: str) -> dict[str, Any]:
        """The placement record: the chosen site, its estimate, and the runners-up."""
        try:
            policy = load_policy(self.policy_file) if self.policy_file else Policy()
            catalog = load(self.catalog_dir) if self.catalog_dir else None
            sites = self._sites(catalog)
        except (PolicyError, OSError, ValueError) as exc:
            raise InvalidInput(f"cannot place {name}: {exc}") from None
        if self.force_site is not None:
            sites = [s for s in sites if s.name == self.force_site]
            if not sites:
                raise InvalidInput(f"no site named {self.force_site!r}")
            policy = Policy(spot=policy.spot, gpu_models=policy.gpu_models)  # forced: no rules
        estimates = compare(
            workload_of(wf, name, look=self._look), catalog or Catalog("", [], {}), sites, policy
        )
        chosen = next((e for e in estimates if e.feasible), None)
        record: dict[str, Any] = {
            "catalog_date": catalog.date if catalog else None,
            "forced": self.force_site is not None,
            "site": chosen.site.name if chosen else None,
            "estimate": _brief(chosen) if chosen else None,
            "alternatives": [_brief(e) for e in estimates[:6] if e is not chosen],
        }
        return record

    def _look(self, uri: str, secret: str | None) -> RemoteFacts:
        credentials = self.secrets.credentials(secret) if secret and self.secrets else None
        return describe(uri, credentials=credentials, ca_file=self.ca_file)


def _brief(e: SiteEstimate) -> dict[str, Any]:
    return {
        "site": e.site.name,
        "feasible": e.feasible,
        "reasons": e.reasons,
        "total_usd": e.total_usd,
        "compute_usd": e.compute_usd,
        "data_usd": e.data_usd,
        "hours": e.hours,
        "jobs": {p.job: f"{p.instance} x{p.nodes}" for p in e.jobs},
        "guesses": e.guesses,
    }
