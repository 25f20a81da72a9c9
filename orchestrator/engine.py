"""The engine: one run of a workflow, from records to a cluster, through its DAG, and back.

A run moves through PLACING, PROVISIONING, STAGING (volumes, ingress, images), RUNNING,
EGRESS and TEARDOWN, and ends FINISHED, FAILED or CANCELLED with its reason. Every state
change is committed to the store before the engine acts on it; the cluster is taken down
and ephemeral volumes released in a `finally`, whatever happened. While it works the engine
writes a heartbeat into the run, so that another process can tell a run whose orchestrator
died (see `recovery`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.substrate.v1 import agent_pb2 as pb
from federate.spend import usd
from substrate.client import connect

from .data import TransferError
from .data.data_agent import DataAgent
from .data.staging import Staging
from .errors import (
    AlreadyExists,
    Category,
    Conflict,
    InvalidInput,
    SquallError,
    StoreError,
    describe,
    rpc_gist,
)
from .fuzzfile import Workflow, load_text
from .fuzzfile.model import Image
from .identity import groups_of
from .metering import Meter, team_month
from .placing import Decide, Placement
from .provision import AgentEndpoint, Cancelled, Cluster, Provisioner, ProvisionError
from .redaction import Redactor, forget, register, scrub
from .runloop import LOST_AFTER, MOVE_AFTER, NodesLost, RunLoop
from .scheduler import tasks_of
from .secrets import SecretNotSet, SecretStore, SecretView, parse_reference, referenced_secrets
from .states import move_run, restart
from .store import RUN_ENDED, Agent, Event, Job, Run, RunState, Store, Task, Volume
from .views import run_named

__all__ = [
    "HEARTBEAT",
    "Engine",
    "PullError",
    "RunOutcome",
    "identity",
    "request_cancel",
]

MAX_MOVES = 2  # sites a run may move to after losing its nodes
HEARTBEAT = 5.0  # seconds between heartbeats of a live run
METER = 1.0  # seconds between readings of a live run's meter (what it spent, its budget)


def identity() -> str:
    """This orchestrator process, as runs record their owner: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PullError(SquallError):
    """An image of the workflow could not be pulled on a node; says which and why."""

    category = Category.PULL


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: str
    state: RunState
    reason: str


def _now() -> datetime:
    return datetime.now(UTC)


class Engine:
    """Runs workflows on clusters from `providers`, recording everything in `store`.

    A run goes to the provider that serves the site federation placed it on (`placer`; none:
    always `home`, this orchestrator's own site), and only through the provider's calls: it
    sizes the cluster, brings it up and takes it down. `data_dir` holds volumes, logs and the
    ingress cache; secrets are read from `secrets` (default: sealed in `store` with the key
    file `data_dir/secrets.key`), for the run's owner, when a container starts, an image is
    pulled or data moves. While the engine drives a run, the values of the secrets it uses
    are masked in its events, reasons and kept logs (`orchestrator.redaction`).
    """

    def __init__(
        self,
        store: Store,
        providers: Sequence[Provisioner[Any]],
        *,
        data_dir: Path,
        secrets: SecretStore | None = None,
        ca_file: str | None = None,
        placer: Decide | None = None,
        egress_dirs: Sequence[Path] | None = None,
        home: str = "local",
        lost_after: float = LOST_AFTER,
        move_after: int = MOVE_AFTER,
    ) -> None:
        self.store = store
        self.providers = tuple(providers)
        self.home = home
        self.data_dir = data_dir
        self.secrets = secrets or SecretStore(
            store, data_dir / "secrets.key", legacy_dir=data_dir / "secrets"
        )
        self.staging = Staging(
            store, data_dir, self.secrets, ca_file=ca_file, egress_dirs=egress_dirs
        )
        self.placer = placer  # None: always the home site
        self.lost_after = lost_after  # seconds a node's agent may not answer before it is lost
        self.move_after = move_after  # nodes a run may lose at one site before it moves

    def provider(self, site: str) -> Provisioner[Any] | None:
        """The provider that makes clusters on `site`; None when this engine has none."""
        return next((p for p in self.providers if p.serves(site)), None)

    # ---- submitting -----------------------------------------------------------------------

    def submit(
        self,
        name: str,
        text: str,
        owner: str | None = None,
        budget_usd: float | None = None,
        policy: str = "",
    ) -> str:
        """Check a workflow and record it as a PENDING run; nothing starts. Its id.
        `budget_usd`: the run's own budget (else the policy's, if any); `policy`: the policy
        file that places it (a schedule's; "": the configured one)."""
        if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd > 0):
            raise InvalidInput(f"a budget is a number of USD above 0, not {budget_usd}")
        workflow = load_text(text, name).unwrap()
        owner = owner or getpass.getuser()
        self._check_secrets(workflow, owner)
        self.staging.check_egress(workflow)
        run_id = str(uuid.uuid4())
        run = Run(
            id=run_id,
            name=name,
            owner=owner,
            fuzzfile=text,
            site=self.home,
            budget_usd=budget_usd,
            policy=policy,
        )
        for job_name, container in workflow.containers.items():
            run.jobs.append(
                Job(
                    name=job_name,
                    kind="job" if job_name in workflow.jobs else "service",
                    tasks=[Task(index=k.index) for k in tasks_of(container)],
                )
            )
        run.events.append(Event(kind="run", state=RunState.PENDING.value, message="submitted"))
        try:
            with self.store.session() as s:
                s.add(run)
        except IntegrityError:
            raise AlreadyExists(f"a run named {name!r} exists already; pick another name") from None
        return run_id

    def secrets_of(self, owner: str) -> SecretView:
        """The secrets as `owner` sees them now (its own, its groups', the organization's)."""
        return self.secrets.view(owner, groups_of(self.store, owner))

    def _check_secrets(self, wf: Workflow, owner: str) -> None:
        """Every secret the workflow names is set for `owner` (image secrets hold a login),
        or nothing is recorded: env values (`secret://` and legacy placeholders), image
        credentials (`image.secret` and the legacy `secrets:` map) and transfer
        credentials."""
        missing = []
        view = self.secrets_of(owner)
        for ref in referenced_secrets(wf):
            parse_reference(ref)
            try:
                view.get(ref)
            except SecretNotSet:
                missing.append(ref)
        if missing:
            raise InvalidInput(
                f"the workflow uses secrets that are not set: {', '.join(missing)} (for "
                f"{owner}); set each with `squall secret set REF` (the value is read from stdin)"
            )
        for ref in sorted({c.image.secret for c in wf.containers.values() if c.image.secret}):
            view.login(ref)  # refuses a secret that holds no username and password

    # ---- running --------------------------------------------------------------------------

    def run(
        self, name: str, text: str, owner: str | None = None, budget_usd: float | None = None
    ) -> RunOutcome:
        """Submit and execute a workflow in this process."""
        return self.execute(self.submit(name, text, owner, budget_usd))

    def execute(self, run_id: str) -> RunOutcome:
        """Drive a submitted run to its end. Only its owner (this process) may do this."""
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            if run.state is not RunState.PENDING:
                raise Conflict(f"run {run.name} is {run.state.value}, not PENDING")
            run.orchestrator = identity()
            run.heartbeat_at = _now()
            text, name, owner = run.fuzzfile, run.name, run.owner
        workflow = load_text(text, name).unwrap()
        # what it writes from here on (events, reasons, kept logs) has its secrets masked
        refs = referenced_secrets(workflow)
        try:
            register(run_id, Redactor(self.secrets_of(owner).values(refs) if refs else ()))
        except SquallError as exc:  # the key file cannot open them: nothing starts
            self._set_run(run_id, RunState.FAILED, describe(exc))
            return RunOutcome(run_id, RunState.FAILED, describe(exc))
        try:
            return self._execute(run_id, workflow, name)
        finally:
            forget(run_id)

    def _execute(self, run_id: str, workflow: Workflow, name: str) -> RunOutcome:
        meter = Meter(self.store, run_id)
        stop_tending = threading.Event()
        tend = threading.Thread(
            target=self._tend, args=(run_id, meter, stop_tending), name="tend", daemon=True
        )
        tend.start()
        # the cluster, and who made it: taken down even if a later phase raises
        brought_up: list[tuple[Provisioner[Any], Cluster]] = []
        state, reason = RunState.FAILED, "the orchestrator stopped"
        lost_at: dict[str, str] = {}  # sites this run lost its nodes at, with why
        try:
            while True:
                try:
                    state, reason = self._phases(run_id, workflow, brought_up, meter, lost_at)
                    break
                except NodesLost as lost:
                    site = self._move_off(run_id, brought_up, str(lost), meter)
                    lost_at[site] = f"this run lost its nodes there ({lost})"
                    if len(lost_at) > MAX_MOVES:
                        state = RunState.FAILED
                        reason = f"lost its nodes at {len(lost_at)} sites, the last {site}: {lost}"
                        break
        except Exception as exc:
            reason = describe(exc)
            if not isinstance(exc, SquallError) or isinstance(exc, StoreError):
                raise  # a defect, or the store failing: the volumes stay, as after a crash
            if isinstance(exc, Cancelled):  # its provider stopped bringing the cluster up
                state, reason = RunState.CANCELLED, self.cancel_reason(run_id)
            self.staging.skip_egress(run_id)  # it failed before any result was made
        finally:
            if brought_up:
                self._set_run(run_id, RunState.TEARDOWN)
                reason += self._down(run_id, *brought_up[0])
            stop_tending.set()
            tend.join()
            with contextlib.suppress(StoreError):
                meter.release()  # the final cost: the hours until the cluster was down
            kept = self.staging.release(run_id)
            if kept:
                reason += (
                    f"; volume(s) {', '.join(kept)} kept until the egress succeeds: "
                    f"`squall workflow egress {name}` retries it, `--release` lets it go"
                )
            self._set_run(run_id, state, reason)
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            return RunOutcome(run_id, run.state, run.reason)

    def _phases(
        self,
        run_id: str,
        wf: Workflow,
        brought_up: list[tuple[Provisioner[Any], Cluster]],
        meter: Meter,
        lost_at: dict[str, str],
    ) -> tuple[RunState, str]:
        if not lost_at:
            self._set_run(run_id, RunState.PLACING)  # a moving run is PLACING already
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            name, owner, budget, policy = run.name, run.owner, run.budget_usd, run.policy
        if self.placer is not None:
            decision = self.placer(
                wf, name, budget_usd=budget, policy=policy, exclude=lost_at, owner=owner
            )
        elif self.home in lost_at:
            return RunState.FAILED, f"it lost its nodes at {self.home}, its only site"
        else:
            decision = Placement({"site": self.home})
        placement = decision.record
        site = placement.get("site")
        provider = self.provider(site) if site is not None else None
        money = placement.get("budget") or {}
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            run.placement = placement
            run.team = money.get("team") or ""
            if "run_usd" in money:  # the run's own, or the policy's when that is smaller
                run.budget_usd = money["run_usd"]
        if provider is None:
            why = _not_here(placement, self.home)
            if lost_at:
                why = f"it lost its nodes at {', '.join(lost_at)}, and then: {why}"
            return RunState.FAILED, why
        refused = self._within_month(run_id, placement)
        if refused:
            return RunState.FAILED, refused
        if placement.get("estimate"):
            estimate = placement["estimate"]
            self._event(
                run_id,
                "placement",
                f"{site}: estimated ${estimate['total_usd']:,.2f} "
                f"(compute ${estimate['compute_usd']:,.2f}, data ${estimate['data_usd']:,.2f}"
                + (
                    f", {estimate['storage']} storage ${estimate.get('storage_usd', 0):,.2f})"
                    if estimate.get("storage")
                    else ")"
                ),
            )
        if self._cancelled(run_id):
            return RunState.CANCELLED, self.cancel_reason(run_id)
        self._set_run(run_id, RunState.PROVISIONING)
        meter.hold()
        plan = provider.plan(run_id, owner, wf, decision)
        if plan.record:
            with self.store.session() as s:
                s.get_one(Run, run_id).placement = {**placement, **plan.record}
        cluster = provider.up(plan, self._progress(run_id))
        brought_up.append((provider, cluster))
        with self.store.session() as s:
            s.get_one(Run, run_id).site = cluster.site
            s.add_all(
                Agent(
                    run_id=run_id,
                    name=a.name,
                    address=a.address,
                    token=a.token,
                    pid=a.pid,
                    tls_ca=a.tls.ca.decode() if a.tls else "",
                    tls_certificate=a.tls.certificate.decode() if a.tls else "",
                    tls_key=a.tls.key.decode() if a.tls else "",
                )
                for a in cluster.agents
            )
        self._set_run(run_id, RunState.STAGING)
        transfers = self._reporter(run_id, "transfer")
        with DataAgent(cluster.agents[0]) as data:  # the node that moves the run's bytes
            paths = self.staging.create(
                run_id, wf, data, cluster.volume_root, cluster.persistent_root
            )
            self.staging.plan_egress(run_id, wf)
            self.staging.ingress(run_id, wf, paths, transfers, data)
        self._pull_images(run_id, wf, cluster, owner)
        if self._cancelled(run_id):
            return RunState.CANCELLED, self.cancel_reason(run_id)
        self._set_run(run_id, RunState.RUNNING)
        loop = RunLoop(
            self.store,
            run_id,
            wf,
            cluster,
            mounts=paths,
            secrets=self.secrets,
            data_dir=self.data_dir,
            report=lambda kind, subject, message: self._event(run_id, kind, message, subject),
            replace=self._replacer(run_id, provider, cluster),
            lost_after=self.lost_after,
            move_after=self.move_after,
        )
        state, reason = loop.drive()
        # nodes replaced during the run: the cluster as it is now (egress, teardown)
        cluster = dataclasses.replace(cluster, agents=tuple(loop.agents))
        brought_up[-1] = (provider, cluster)
        # a run stopped by its budget keeps what it made: its egress runs as if it finished
        keeps = state is RunState.FINISHED or (state is RunState.CANCELLED and meter.stopped)
        if keeps and any(v.egress for v in wf.volumes.values()):
            self._set_run(run_id, RunState.EGRESS)
            with DataAgent(cluster.agents[0]) as data:
                try:
                    self.staging.egress(run_id, paths, transfers, data)
                except TransferError as exc:
                    return RunState.FAILED, str(exc) + self._keep_owed(run_id, cluster, data)
        elif any(v.egress for v in wf.volumes.values()):
            self.staging.skip_egress(run_id)
            self._event(run_id, "transfer", "egress skipped: the run did not finish")
        return state, reason

    def _replacer(
        self, run_id: str, provider: Provisioner[Any], cluster: Cluster
    ) -> Callable[[int, tuple[AgentEndpoint, ...]], AgentEndpoint]:
        """What the run loop calls for a node in place of a lost one (with the cluster's
        agents as they are now): the provider's replacement, recorded as the run's agent of
        that name."""

        def replace(node: int, agents: tuple[AgentEndpoint, ...]) -> AgentEndpoint:
            now = dataclasses.replace(cluster, agents=agents)
            agent = provider.replace(now, node, self._progress(run_id))
            with self.store.session() as s:
                row = s.scalars(
                    select(Agent).where(Agent.run_id == run_id, Agent.name == agent.name)
                ).first()
                if row is not None:  # None: the run moved or ended meanwhile
                    row.address, row.token, row.pid = agent.address, agent.token, agent.pid
            return agent

        return replace

    def _move_off(
        self,
        run_id: str,
        brought_up: list[tuple[Provisioner[Any], Cluster]],
        why: str,
        meter: Meter,
    ) -> str:
        """The run lost its nodes where it ran: take that cluster down, forget its volumes
        and agents, and put every job back in line; the site it leaves."""
        provider, cluster = brought_up.pop()
        self._event(run_id, "run", f"moving off {cluster.site}: {why}")
        failed = self._down(run_id, provider, cluster)
        if failed:
            self._event(run_id, "stack", failed.removeprefix("; "))
        meter.move_on()  # before the transfers it counts are forgotten
        self.staging.start_over(run_id)
        with self.store.session() as s:
            for row in s.scalars(select(Agent).where(Agent.run_id == run_id)):
                s.delete(row)
            restart(s, s.get_one(Run, run_id), why)
        return cluster.site

    def _keep_owed(self, run_id: str, cluster: Cluster, data: DataAgent) -> str:
        """After a failed egress: a cluster's own storage goes with its stack, so the files
        still owed come to this machine first; what to add to the reason if they could not."""
        if not (cluster.volume_root or cluster.persistent_root):
            return ""  # the volumes are on this machine already
        try:
            self.staging.bring_home(run_id, self._reporter(run_id, "transfer"), data)
        except (TransferError, OSError) as exc:
            return f"; the results still owed could not be kept: {exc}"
        return ""

    def _down(self, run_id: str, provider: Provisioner[Any], cluster: Cluster) -> str:
        """Take the cluster down; what to add to the run's reason if that failed."""
        try:
            provider.down(cluster, self._progress(run_id))
        except ProvisionError as exc:
            return f"; {exc} (`squall stack gc` retries)"
        return ""

    def retry_egress(self, name: str, *, release: bool = False) -> list[str]:
        """Retry the failed egress of an ended run (or, with `release`, give up and free
        its volumes). Raises TransferError if it fails again; returns volumes still kept."""
        with self.store.session() as s:
            run = run_named(s, name)
            if run.state not in RUN_ENDED:
                raise Conflict(f"run {name} is {run.state.value}; wait for it to end")
            run_id = run.id
            paths = {
                v.name: Path(v.path)
                for v in s.scalars(select(Volume).where(Volume.run_id == run_id)).all()
            }
        if not release:
            self.staging.retry_egress(run_id, paths, self._reporter(run_id, "transfer"))
            self._event(run_id, "transfer", "egress retried: every result is out")
        return self.staging.release(run_id, force=release)

    def _pull_images(self, run_id: str, wf: Workflow, cluster: Cluster, owner: str) -> None:
        """Pull every image on every node, with its registry credentials, read from the
        secrets of `owner` now and handed to the agent in the request (its puller keeps them
        off disk). A pull that fails raises PullError: the image, the node and the
        registry's reason."""
        images: dict[tuple[str, str, tuple[tuple[str, str], ...]], Image] = {}
        for c in wf.containers.values():
            legacy = tuple(sorted((c.image.legacy_secrets or {}).items()))
            images.setdefault((c.image.uri, c.image.secret or "", legacy), c.image)
        view = self.secrets_of(owner) if any(key[1] or key[2] for key in images) else None

        def pull_on(agent: AgentEndpoint) -> None:
            channel, stub = connect(agent.address, agent.token, agent.tls)
            try:
                for key in sorted(images):
                    image = images[key]
                    request = pb.PullImageRequest(
                        reference=image.uri, credentials=_login(image, view)
                    )
                    try:
                        for progress in stub.PullImage(request):
                            if progress.done:
                                message = f"{agent.name}: {progress.message}"
                                self._event(run_id, "image", message, image.uri)
                    except grpc.RpcError as exc:
                        why = " ".join((exc.details() or rpc_gist(exc)).split())
                        raise PullError(
                            f"image {image.uri} cannot be pulled on {agent.name}: {why}"
                        ) from None
            finally:
                channel.close()

        # the nodes pull side by side; the first node's failure (in node order) is raised
        with ThreadPoolExecutor(len(cluster.agents), thread_name_prefix="pull") as pool:
            for pulled in [pool.submit(pull_on, agent) for agent in cluster.agents]:
                pulled.result()

    # ---- records ---------------------------------------------------------------------------

    def cancel_requested(self, run_id: str) -> bool:
        """Whether someone asked to cancel the run (a provisioner that waits long, such as
        for its nodes to join, stops waiting then)."""
        with self.store.session() as s:
            return bool(s.get_one(Run, run_id).cancel_requested)

    _cancelled = cancel_requested

    def cancel_reason(self, run_id: str) -> str:
        """Why the run was asked to stop: its budget, or (by default) a user."""
        with self.store.session() as s:
            return s.get_one(Run, run_id).cancel_reason or "cancelled by request"

    def _within_month(self, run_id: str, placement: dict[str, Any]) -> str:
        """Why the run would break its team's monthly budget ("" when it would not); when it
        would not, its budget becomes at most what is left of the month's."""
        money = placement.get("budget") or {}
        monthly = money.get("monthly_usd")
        if monthly is None:
            return ""
        team = money.get("team") or ""
        estimate = (placement.get("estimate") or {}).get("total_usd", 0.0)
        spent = team_month(self.store, team, _now(), besides=run_id)
        if spent + estimate > monthly:
            whose = f"team {team}" if team else "the team"
            return (
                f"refused: {whose} has spent or committed {usd(spent)} of its {usd(monthly)} "
                f"monthly budget, and this run is estimated at {usd(estimate)}"
            )
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            left = monthly - spent
            run.budget_usd = left if run.budget_usd is None else min(run.budget_usd, left)
        return ""

    def _tend(self, run_id: str, meter: Meter, stop: threading.Event) -> None:
        """While the run lives: read its meter every METER seconds (a budget reached cancels
        it) and write its heartbeat every HEARTBEAT."""
        beat = time.monotonic()
        while not stop.wait(METER):
            with contextlib.suppress(Exception):
                meter.read()
            if time.monotonic() - beat >= HEARTBEAT:
                beat = time.monotonic()
                with contextlib.suppress(Exception), self.store.session() as s:
                    s.get_one(Run, run_id).heartbeat_at = _now()

    def _set_run(self, run_id: str, state: RunState, reason: str = "") -> None:
        with self.store.session() as s:
            move_run(s, s.get_one(Run, run_id), state, reason)

    def _event(self, run_id: str, kind: str, message: str, subject: str = "") -> None:
        message = scrub(run_id, message)
        with self.store.session() as s:
            s.add(Event(run_id=run_id, kind=kind, subject=subject, message=message))

    def _reporter(self, run_id: str, kind: str) -> Callable[[str, str], None]:
        return lambda subject, message: self._event(run_id, kind, message, subject)

    def _progress(self, run_id: str) -> Callable[[str], None]:
        """A provider's progress, as the run's `provision` events."""
        return partial(self._reporter(run_id, "provision"), "")


def request_cancel(store: Store, name: str) -> RunState:
    """Ask the owner of run `name` (or id) to cancel it, from any process; its state now."""
    with store.session() as s:
        run = run_named(s, name)
        if run.state not in RUN_ENDED:
            run.cancel_requested = True
            s.add(Event(run_id=run.id, kind="run", message="cancel requested"))
        return run.state


def _login(image: Image, view: SecretView | None) -> pb.RegistryCredentials | None:
    """The registry credentials of `image`, from its secret or its legacy map, as `view`'s
    user sees them."""
    if view is None:
        return None
    if image.secret:
        username, password = view.login(image.secret)
    elif image.legacy_secrets:
        username = view.fill(image.legacy_secrets["username"])
        password = view.fill(image.legacy_secrets["password"])
    else:
        return None
    return pb.RegistryCredentials(username=username, password=password)


def _not_here(placement: dict[str, Any], here: str) -> str:
    """Why a run placed elsewhere (or nowhere) does not run on this orchestrator's site."""
    site = placement.get("site")
    if site is None:
        why = "; ".join(
            f"{a['site']}: {', '.join(a['reasons'])}" for a in placement.get("alternatives", [])[:3]
        )
        return f"no site is feasible ({why})"
    total = placement["estimate"]["total_usd"] if placement.get("estimate") else 0.0
    return (
        f"federation placed it on {site} (estimated ${total:,.2f}); this orchestrator provisions "
        f"only {here} so far: force it with --site {here}"
    )
