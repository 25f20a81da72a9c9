"""The local site, the embedded default: an engine whose clusters are agent processes on this
machine, with Squall's state, volumes and secrets in the user's data directory.

Settings come from the environment (flags in the CLI override them):

- `SQUALL_DATA_DIR`: state, volumes, logs, secrets (default `$XDG_DATA_HOME/squall`)
- `SQUALL_STORE_URL`: the store (default SQLite in the data directory; PostgreSQL by URL)
- `SQUALL_SEARCH_REGISTRIES`, `SQUALL_INSECURE_REGISTRIES`: comma-separated registries for
  unqualified image names, and those reached over plain HTTP (a registry on this machine)
- `SQUALL_NODE_LOST_AFTER`: seconds a node's agent may not answer before the node is lost
  (default 10)
- `SQUALL_SPOT_HISTORY`: observed spot prices (CSV, `federate.outlook`) that schedules'
  windows foresee prices by
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data.staging import volume_roots
from .engine import Engine
from .placing import Placer
from .provision import LocalProvisioner
from .provision.cloud import CloudProvisioner, CloudSettings
from .provision.local import separate_nodes, whole_machine
from .provision.stacks import StackDriver, StackSettings
from .provision.vm import VmProvisioner, VmSettings
from .run_threads import RunThreads
from .runloop import LOST_AFTER
from .schedules import Scheduler, ScheduleSpec, placer_pricer
from .secrets import SecretStore
from .store import Store

__all__ = ["LocalSettings", "local_engine", "local_scheduler", "stack_driver"]


def _data_dir() -> Path:
    if os.environ.get("SQUALL_DATA_DIR"):
        return Path(os.environ["SQUALL_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "squall"


def _list(name: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


@dataclass(slots=True)
class LocalSettings:
    data_dir: Path = field(default_factory=_data_dir)
    store_url: str = field(default_factory=lambda: os.environ.get("SQUALL_STORE_URL", ""))
    search_registries: Sequence[str] = field(
        default_factory=lambda: _list("SQUALL_SEARCH_REGISTRIES")
    )
    insecure_registries: Sequence[str] = field(
        default_factory=lambda: _list("SQUALL_INSECURE_REGISTRIES")
    )
    # nodes of each local cluster: one (the default) may lease the whole machine; more are
    # separate, each a network namespace, address, hostname and CPU slice of its own (root)
    nodes: int = 1
    oversubscribe: int = 1  # tasks that may share one core of an agent (agent --oversubscribe)
    site: str | None = None  # force a site (`--site local`); None: federation decides
    # where `file:///` egress may write (None: anywhere this process may, for `squall run`)
    egress_dirs: Sequence[Path] | None = None

    def store(self) -> Store:
        return Store(self.store_url or f"sqlite:///{self.data_dir / 'squall.db'}")


def _seconds(name: str, default: float) -> float:
    from .errors import UsageError

    value = os.environ.get(name, "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise UsageError(f"${name} is a number of seconds, not {value!r}") from None
    if not seconds > 0:
        raise UsageError(f"${name} is a number of seconds above 0, not {value!r}")
    return seconds


def local_engine(settings: LocalSettings) -> Engine:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # private, whatever made it: it holds secrets and tokens, and volumes whose files jobs
    # wrote as root (a job's setuid file there must be out of every other user's reach)
    settings.data_dir.chmod(0o700)
    here = LocalProvisioner(
        settings.data_dir / "site",
        nodes=separate_nodes(settings.nodes) if settings.nodes > 1 else whole_machine(),
        namespaced=settings.nodes > 1,
        search_registries=settings.search_registries,
        insecure_registries=settings.insecure_registries,
        oversubscribe=settings.oversubscribe,
        volume_roots=functools.partial(volume_roots, settings.data_dir),
    )
    store = settings.store()
    secrets = SecretStore(
        store, settings.data_dir / "secrets.key", legacy_dir=settings.data_dir / "secrets"
    )
    placer = Placer.from_environment(settings.site, secrets, store, local_nodes=settings.nodes)
    placer.check_site()  # a --site that names no site is refused before anything is recorded
    clouds = CloudProvisioner(stack_driver(settings, store), CloudSettings.from_environment())
    vms = VmProvisioner(
        settings.data_dir / "site" / "vm",
        VmSettings.from_environment(),
        search_registries=settings.search_registries,
        insecure_registries=settings.insecure_registries,
    )
    engine = Engine(
        store,
        [here, clouds, vms],
        data_dir=settings.data_dir,
        secrets=secrets,
        placer=placer.decide,
        egress_dirs=settings.egress_dirs,
        home=here.site,
        lost_after=_seconds("SQUALL_NODE_LOST_AFTER", LOST_AFTER),
    )
    # a cancel stops the wait for booting nodes
    vms.cancelled = clouds.cancelled = engine.cancel_requested
    return engine


def stack_driver(settings: LocalSettings, store: Store | None = None) -> StackDriver:
    """The Pulumi stacks of this data directory's runs, and their ledger."""
    return StackDriver(store or settings.store(), StackSettings.from_environment(settings.data_dir))


def local_scheduler(engine: Engine, runs: RunThreads, nodes: int = 1) -> Scheduler:
    """The scheduler of this store's schedules: each firing priced by federation as
    configured ($SQUALL_CATALOG, $SQUALL_SITES, $SQUALL_POLICY or the schedule's, and
    $SQUALL_SPOT_HISTORY), its run driven by `runs`. Raises UsageError for a spot history
    that cannot be read."""
    from federate.outlook import SpotHistory

    from .errors import UsageError

    spot = None
    if os.environ.get("SQUALL_SPOT_HISTORY"):
        try:
            spot = SpotHistory.load(Path(os.environ["SQUALL_SPOT_HISTORY"]))
        except (OSError, ValueError) as exc:
            raise UsageError(f"SQUALL_SPOT_HISTORY: {exc}") from None
    placer = Placer.from_environment(None, engine.secrets, engine.store, local_nodes=nodes)

    def start(run_name: str, spec: ScheduleSpec) -> None:
        runs.launch(run_name, spec.fuzzfile, spec.owner, spec.budget_usd, spec.policy)

    return Scheduler(engine.store, placer_pricer(placer, engine.store, spot), start)
