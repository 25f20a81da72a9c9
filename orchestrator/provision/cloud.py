"""Cloud sites: a cluster per run from a Pulumi stack (see stacks.py), reached, like every
site, only through its agents' gRPC API.

Before anything is made, a cloud run checks what it needs here, in this order, and fails with
one line naming the first thing missing: the Pulumi SDK (`pip install 'squall[cloud]'`), the
`pulumi` CLI, the settings below, the cloud's credentials (`credentials.py`).

Nodes join their run (registrar.py): the boot script carries the run's join token and this
orchestrator's join CA; each node makes its own key and trades the token for its certificate
at the join service, which learns the node's address from the call. So the stack lists no
node addresses, and a scale set's nodes are found like any other. Its public address (the
call's source) is dialled, or the address it reports when the run is in an existing subnet or
$SQUALL_USE_INTERNAL_IPS is set (an orchestrator inside the cloud's network, or reaching it
over a VPN).

What the orchestrator must be told (environment, or `squall doctor` says what is missing):
- $SQUALL_ORCHESTRATOR_CIDR: this orchestrator's address as the clouds see it (a /32, or its
  network). The agent port is opened to it and to nothing else.
- $SQUALL_ORCHESTRATOR_ADDRESS: HOST:PORT where nodes reach this orchestrator's join service
  (written on the nodes; the service listens on that port, on every address, unless
  $SQUALL_JOIN_LISTEN says where). The team's firewall must let the nodes reach it.
- $SQUALL_IMAGE_AWS, $SQUALL_IMAGE_GCP, $SQUALL_IMAGE_AZURE: the node image per cloud (an AMI
  or resolve:ssm: parameter; a GCP image path; an Azure publisher:offer:sku:version), built
  with `squall` in it (`squall image build` / `publish`): each node starts `squall agent` at
  boot.
- optional: $SQUALL_CLUSTER_TTL (hours after which `squall stack gc` destroys a cluster
  whatever its run, default 24), $SQUALL_JOIN_TIMEOUT (seconds the nodes have to join once
  the stack is up, default 900).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from pydantic import SecretStr

from federate.catalog import CLOUDS
from federate.placement import SiteEstimate
from federate.workload import Workload
from infra.spec import PERSISTENT_ROOT, VOLUME_ROOT, Bootstrap, ClusterSpec, Network

from .base import AgentEndpoint, Cancelled, Cluster, Plan, ProvisionError, Report
from .cluster_spec import DEFAULT_TTL, cluster_spec
from .consoles import CONSOLE_HINTS, consoles_of
from .credentials import CREDENTIALS
from .pki import RunAuthority, join_identity
from .registrar import Joined, Registrar
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
    join_listen: str | None = None  # None: every address, on the orchestrator address's port
    join_timeout_s: float = 900.0  # once the stack is up
    use_internal_ips: bool = False  # dial the address a node reports, not its call's source
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
        try:
            join_timeout_s = float(env.get("SQUALL_JOIN_TIMEOUT", "900"))
        except ValueError:
            raise ProvisionError("SQUALL_JOIN_TIMEOUT is a number of seconds") from None
        return cls(
            env.get("SQUALL_ORCHESTRATOR_CIDR") or None,
            env.get("SQUALL_ORCHESTRATOR_ADDRESS") or None,
            images,
            ttl,
            join_listen=env.get("SQUALL_JOIN_LISTEN") or None,
            join_timeout_s=join_timeout_s,
            use_internal_ips=env.get("SQUALL_USE_INTERNAL_IPS", "") not in ("", "0", "false"),
        )

    def missing(self, cloud: str) -> list[str]:
        """What must still be set before a cluster can be made on `cloud`."""
        out = []
        if not self.orchestrator_cidr:
            out.append(
                "SQUALL_ORCHESTRATOR_CIDR (this orchestrator's address, e.g. 203.0.113.7/32)"
            )
        host, _, port = (self.orchestrator_address or "").rpartition(":")
        if not host or not port.isdigit():
            out.append(
                "SQUALL_ORCHESTRATOR_ADDRESS (HOST:PORT where nodes join this orchestrator, "
                "e.g. 203.0.113.7:7443)"
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
        # whether the run was cancelled: its nodes stop being waited for (the engine's)
        self.cancelled: Callable[[str], bool] = lambda _: False
        self._registrar: Registrar | None = None
        self._lock = threading.Lock()

    def _join_service(self) -> tuple[Registrar, str]:
        """This process's join service (started the first time) and the HOST:PORT the nodes
        are told (port 0 in the orchestrator address: the one the service got)."""
        address = self.settings.orchestrator_address or ""
        host, _, port = address.rpartition(":")
        with self._lock:
            if self._registrar is None:
                listen = self.settings.join_listen or f"0.0.0.0:{port}"
                identity = join_identity(self.stacks.settings.state_dir / "join")
                self._registrar = Registrar(identity, listen)
            registrar = self._registrar
        return registrar, f"{host}:{registrar.port if port == '0' else port}"

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
        registrar, orchestrator = self._join_service()
        try:
            return cluster_spec(
                run_id,
                owner,
                workload,
                estimate,
                image=self.settings.images[cloud],
                network=Network(orchestrator_cidr=self.settings.orchestrator_cidr),
                bootstrap=Bootstrap(
                    orchestrator=orchestrator,
                    ca_certificate=registrar.identity.ca.decode(),
                    join_token=SecretStr(secrets.token_urlsafe(32)),
                ),
                ttl=self.settings.ttl,
                buckets=buckets,
            )
        except ValueError as exc:  # pydantic's, with the field that is wrong
            raise ProvisionError(f"cannot size a cluster for {estimate.site.name}: {exc}") from None

    def up(self, plan: Plan[ClusterSpec], report: Report) -> Cluster:
        """The stack up and its nodes joined, as a cluster whose jobs each run on the node
        group priced for them, a multi-node job's containers on their nodes' own network (a
        cloud routes no pod subnets between nodes, and MPI gets the fabric). When the nodes
        do not join in time, or the run is cancelled while they boot, the stack goes."""
        spec = plan.shape
        run_id = spec.run_id
        token = spec.bootstrap.join_token.get_secret_value()
        registrar, _ = self._join_service()
        authority = RunAuthority(run_id)  # its key lives while the run takes nodes
        internal = self.settings.use_internal_ips or spec.network.subnet_id is not None
        registrar.open(
            run_id,
            token,
            authority,
            {g.name: g.count for g in spec.node_groups},
            # the node that keeps the volumes on its disk is its group's node 0
            kept={g.name: frozenset({0}) for g in spec.node_groups if spec.holds_volumes(g, 0)},
            # dialled where it says it is: that must be the run's network
            reported_in=(spec.network.cidr,) if internal else None,
        )
        made = joined_all = False
        try:
            self.stacks.up(spec, report)
            made = True
            joined = registrar.wait(
                run_id,
                self.settings.join_timeout_s,
                consoles=consoles_of(spec.site.cloud, run_id, spec.site.region),
                report=report,
                stop=lambda: self.cancelled(run_id),
            )
            joined_all = True
        except ProvisionError as exc:
            hint = CONSOLE_HINTS.get(spec.site.cloud)
            if not made or not hint or isinstance(exc, Cancelled):
                raise
            raise ProvisionError(f"{exc}\na node's reason is on {hint}") from None
        finally:
            registrar.close(run_id)  # no more certificates for this run: its CA key goes
            if made and not joined_all:  # whatever stopped the wait: the stack goes
                self._destroy_after(run_id, report)
        position = {g.name: n for n, g in enumerate(spec.node_groups)}
        joined.sort(key=lambda j: (position[j.group], j.index))
        job_of = {g["name"]: g["job"] for g in plan.record["cluster"]["groups"]}
        groups: dict[str, list[int]] = {}
        for i, node in enumerate(joined):
            groups.setdefault(job_of[node.group], []).append(i)
        return Cluster(
            run_id=run_id,
            site=f"{spec.site.cloud}:{spec.site.region}",
            agents=tuple(
                AgentEndpoint(j.node, _dial(j, internal), token, tls=authority.orchestrator)
                for j in joined
            ),
            groups={job: tuple(nodes) for job, nodes in groups.items()},
            host_network=True,
            volume_root=self.settings.volume_root if spec.storage is not None else "",
            persistent_root=self.settings.persistent_root if spec.persistent_share else "",
        )

    def _destroy_after(self, run_id: str, report: Report) -> None:
        """Destroy a stack whose nodes did not all join; a destroy that fails too is
        reported, and the ledger keeps the stack for `squall stack gc` (the first error is
        the one the run ends with)."""
        try:
            self.stacks.destroy(self.stacks.name_of(run_id), report)
        except ProvisionError as exc:
            report(f"the stack could not be destroyed: {exc}; `squall stack gc` retries")

    def replace(self, cluster: Cluster, node: int, report: Report) -> AgentEndpoint:
        raise ProvisionError(
            "a cloud cluster's lost node is not replaced in place yet: the run goes on "
            "without it, or moves to another site"
        )

    def down(self, cluster: Cluster, report: Report) -> None:
        self.stacks.destroy(self.stacks.name_of(cluster.run_id), report)


def _dial(node: Joined, internal: bool) -> str:
    """HOST:PORT of a joined node's agent: the address it reported (`internal`), else the
    one its call came from (its public address, behind the cloud's NAT)."""
    host = node.address if internal else node.peer
    return f"[{host}]:{node.agent_port}" if ":" in host else f"{host}:{node.agent_port}"
