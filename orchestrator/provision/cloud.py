"""Cloud sites: a cluster per run from a Pulumi stack (see stacks.py), reached, like every
site, only through its agents' gRPC API.

Before anything is made, a cloud run checks what it needs here, in this order, and fails with
one line naming the first thing missing: the Pulumi SDK (`pip install 'squall[cloud]'`), the
`pulumi` CLI, the settings below, the cloud's credentials (`credentials.py`).

What the orchestrator must be told (environment, or `squall doctor` says what is missing):
- $SQUALL_ORCHESTRATOR_CIDR: this orchestrator's address as the clouds see it (a /32, or its
  network). The agent port is opened to it and to nothing else.
- $SQUALL_IMAGE_AWS, $SQUALL_IMAGE_GCP, $SQUALL_IMAGE_AZURE: the node image per cloud (an AMI
  or resolve:ssm: parameter; a GCP image path; an Azure publisher:offer:sku:version), built
  with `squall` in it: each node starts `squall agent` at boot.
- optional: $SQUALL_ORCHESTRATOR_ADDRESS (host:port, written on the nodes), $SQUALL_CLUSTER_TTL
  (hours after which `squall stack gc` destroys a cluster whatever its run, default 24).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from pydantic import SecretStr

from federate.catalog import CLOUDS
from federate.placement import SiteEstimate
from federate.workload import Workload
from infra.spec import PERSISTENT_ROOT, VOLUME_ROOT, Bootstrap, ClusterSpec, Network
from substrate.tls import ClientTLS

from .base import AgentEndpoint, Cluster, Plan, ProvisionError, Report
from .cluster_spec import DEFAULT_TTL, cluster_spec
from .credentials import CREDENTIALS
from .pki import make_run_pki
from .stacks import StackDriver

if TYPE_CHECKING:
    from ..fuzzfile import Workflow
    from ..placing import Placement

__all__ = ["CloudProvisioner", "CloudSettings"]


@dataclass(frozen=True, slots=True)
class CloudSettings:
    orchestrator_cidr: str | None = None
    orchestrator_address: str | None = None
    images: dict[str, str] = field(default_factory=dict)
    ttl: timedelta = DEFAULT_TTL
    # where the boot script mounts the cluster's storage on every node (the cloud-run tests'
    # stand-in nodes keep theirs in the test's folder)
    volume_root: str = VOLUME_ROOT
    # where the boot script mounts the share of persistent volumes (the tests' stand-ins, in
    # the test's folder)
    persistent_root: str = PERSISTENT_ROOT

    @classmethod
    def from_environment(cls) -> CloudSettings:
        env = os.environ
        images = {
            cloud: env[f"SQUALL_IMAGE_{cloud.upper()}"]
            for cloud in ("aws", "gcp", "azure")
            if env.get(f"SQUALL_IMAGE_{cloud.upper()}")
        }
        try:
            ttl = timedelta(hours=float(env.get("SQUALL_CLUSTER_TTL", "24")))
        except ValueError:
            raise ProvisionError("SQUALL_CLUSTER_TTL is a number of hours") from None
        return cls(
            env.get("SQUALL_ORCHESTRATOR_CIDR") or None,
            env.get("SQUALL_ORCHESTRATOR_ADDRESS") or None,
            images,
            ttl,
        )

    def missing(self, cloud: str) -> list[str]:
        """What must still be set before a cluster can be made on `cloud`."""
        out = []
        if not self.orchestrator_cidr:
            out.append(
                "SQUALL_ORCHESTRATOR_CIDR (this orchestrator's address, e.g. 203.0.113.7/32)"
            )
        if cloud not in self.images:
            out.append(f"SQUALL_IMAGE_{cloud.upper()} (the node image, with squall in it)")
        return out


class CloudProvisioner:
    """A cluster of cloud VMs per run, as a Pulumi stack (a site is `CLOUD:REGION` of aws,
    gcp or azure)."""

    cannot: Mapping[str, str] = {
        "persistent volumes": "a cloud cluster's storage goes with its stack, and this region "
        "has no share for persistent volumes (`persistent:` in the sites file)",
    }

    def __init__(self, stacks: StackDriver, settings: CloudSettings) -> None:
        self.stacks = stacks
        self.settings = settings
        # run -> this orchestrator's certificate for its nodes, from plan to up (memory only)
        self._client_tls: dict[str, ClientTLS] = {}

    def serves(self, site: str) -> bool:
        cloud, _, region = site.partition(":")
        return cloud in CLOUDS and bool(region)

    def plan(
        self, run_id: str, owner: str, wf: Workflow, placement: Placement
    ) -> Plan[ClusterSpec]:
        """Size the cluster as federation priced it (its workload, the chosen site's
        estimate). When federation chose the site (it was not forced), a cluster that cannot
        be made says where the run went, and why, before what is missing."""
        del wf  # federation's workload says what the run needs
        chosen, workload = placement.chosen, placement.workload
        if chosen is None or workload is None:
            raise ProvisionError(
                f"{placement.record.get('site')} is a cloud site: federation prices a run "
                "before it goes there"
            )
        try:
            spec = self.spec_for(run_id, owner, workload, chosen)
        except ProvisionError as exc:
            if placement.record.get("forced"):
                raise
            site, total = chosen.site.name, chosen.total_usd
            raise ProvisionError(
                f"federation placed it on {site} (estimated ${total:,.2f}; `squall federate "
                f"compare` shows why): {exc}"
            ) from None
        # federation priced one node group per job, in its order (cluster_spec)
        jobs = [plan.job for plan in chosen.jobs]
        cluster = {
            "stack": spec.stack_name,
            "expires_at": spec.expires_at.isoformat(),
            "groups": [
                {"name": g.name, "job": job, "type": g.instance_type, "count": g.count}
                for g, job in zip(spec.node_groups, jobs, strict=True)
            ],
        }
        return Plan(run_id, spec, {"cluster": cluster})

    def check(self, site: str, cloud: str) -> None:
        """Everything a cluster on `cloud` needs from this machine, before anything is made:
        the Pulumi SDK and CLI, the settings, the cloud's credentials. The first one missing
        is a ProvisionError of one line that says what to install or set."""
        self.stacks.check()
        missing = self.settings.missing(cloud)
        if missing:
            raise ProvisionError(f"{site} needs {'; '.join(missing)}")
        found, detail = CREDENTIALS[cloud]()
        if not found:
            raise ProvisionError(
                f"{site} needs {cloud} credentials: {detail}; `squall doctor` checks"
            )

    def spec_for(
        self,
        run_id: str,
        owner: str,
        workload: Workload,
        estimate: SiteEstimate,
        buckets: tuple[str, ...] = (),
    ) -> ClusterSpec:
        cloud = estimate.site.cloud
        self.check(estimate.site.name, cloud)
        assert self.settings.orchestrator_cidr is not None
        pki = make_run_pki(run_id)  # its key is forgotten: the nodes get theirs through the stack
        self._client_tls[run_id] = pki.orchestrator
        try:
            return cluster_spec(
                run_id,
                owner,
                workload,
                estimate,
                image=self.settings.images[cloud],
                network=Network(orchestrator_cidr=self.settings.orchestrator_cidr),
                bootstrap=Bootstrap(
                    orchestrator=self.settings.orchestrator_address,
                    join_token=SecretStr(secrets.token_urlsafe(32)),
                    tls_ca=pki.ca.decode(),
                    node_certificate=pki.node_certificate.decode(),
                    node_key=SecretStr(pki.node_key.decode()),
                ),
                ttl=self.settings.ttl,
                buckets=buckets,
            )
        except ValueError as exc:  # pydantic's, with the field that is wrong
            raise ProvisionError(f"cannot size a cluster for {estimate.site.name}: {exc}") from None

    def up(self, plan: Plan[ClusterSpec], report: Report) -> Cluster:
        """The stack up, as a cluster whose jobs each run on the node group priced for them,
        a multi-node job's containers on their nodes' own network (a cloud routes no pod
        subnets between nodes, and MPI gets the fabric)."""
        spec = plan.shape
        token = spec.bootstrap.join_token.get_secret_value()
        tls = self._client_tls.pop(spec.run_id, None)
        if tls is None:
            raise ProvisionError(
                f"run {spec.run_id}: no certificate for its nodes in this orchestrator (it was "
                "planned by another process); plan it again"
            )
        agents = self.stacks.up(spec, report)
        job_of = {g["name"]: g["job"] for g in plan.record["cluster"]["groups"]}
        groups: dict[str, list[int]] = {}
        for i, agent in enumerate(agents):
            groups.setdefault(job_of[agent["group"]], []).append(i)
        return Cluster(
            run_id=spec.run_id,
            site=f"{spec.site.cloud}:{spec.site.region}",
            agents=tuple(AgentEndpoint(a["name"], a["address"], token, tls=tls) for a in agents),
            groups={job: tuple(nodes) for job, nodes in groups.items()},
            host_network=True,
            volume_root=self.settings.volume_root if spec.storage is not None else "",
            persistent_root=self.settings.persistent_root if spec.persistent_share else "",
        )

    def down(self, cluster: Cluster, report: Report) -> None:
        self.stacks.destroy(self.stacks.name_of(cluster.run_id), report)
