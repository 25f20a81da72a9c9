"""The agent: one node's inventory, leases, tasks and logs, and the loop that expires leases."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__
from .cgroups import Cgroups
from .confine import UserNamespace
from .images import ImageCache, ImageError
from .interruption import InterruptionWatch
from .inventory import Inventory
from .leases import Lease, LeaseSpec, LeaseTable, NoSuchLease
from .logstore import LogStore
from .network import DENY, POOL, HostNetwork, PodNetwork, node_address
from .runtimes import CrunRuntime, Runtime, TaskSpec
from .tasks import Task, TaskError, TaskManager, TaskState

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("substrate")
OCI_RUNTIMES = ("crun", "bwrap")  # preferred first (bwrap only where it was accepted)
USERNS_BASE = 0x60000000  # host uid of root in job containers (and the 65535 after it)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    data_dir: Path
    token: str
    default_runtime: str = ""  # empty: the first OCI runtime present (never `process`)
    sif_runtime: str = ""  # for oras:// (SIF) images naming none; empty: the default runtime
    lease_check_interval: float = 0.5
    labels: dict[str, str] = field(default_factory=dict)
    search_registries: tuple[str, ...] = ("docker.io",)
    insecure_registries: tuple[str, ...] = ()
    userns_base: int = USERNS_BASE
    pod_network: bool = True  # job containers on the node's bridge (False: loopback only)
    pod_pool: str = POOL
    pod_subnet: str | None = None  # the node's container subnet, given; None: a free one
    deny_networks: tuple[str, ...] = DENY  # never forwarded to from a job
    # the node's address for the containers of multi-node jobs on its own network
    # ("auto": where its default route leaves from); empty: no task gets the host network
    host_network: str = ""
    image_dir: Path | None = None  # the image cache (None: <data_dir>/images); may be shared
    oversubscribe: int = 1  # leases that may hold one core at once
    # where volumes may be made, filled and read (MakeVolume, Transfer, ReadFile); none: the
    # agent serves no volume
    volume_roots: tuple[Path, ...] = ()
    # volume roots this node keeps on a share mounted elsewhere: {the root: the mount}
    shared_roots: dict[Path, Path] = field(default_factory=dict)
    cache_dir: Path | None = None  # the ingress cache (None: <data_dir>/cache/ingress); sharable

    @property
    def userns(self) -> UserNamespace:
        return UserNamespace(self.userns_base)

    @property
    def agent_id(self) -> str:
        """Stable across restarts on one data dir: names this agent's cgroups."""
        return hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]


def _host_network(config: AgentConfig) -> HostNetwork:
    """The node's own network for multi-node jobs: kept from the denied networks, but for
    the one the node is on (the job's other nodes are there)."""
    address = node_address("" if config.host_network == "auto" else config.host_network)
    ip = ipaddress.ip_address(address)
    deny = [n for n in config.deny_networks if ip not in ipaddress.ip_network(n, strict=False)]
    first = config.userns.base
    return HostNetwork(config.agent_id, address, (first, first + config.userns.size - 1), deny)


class Agent:
    """Everything the API serves, without gRPC."""

    def __init__(self, config: AgentConfig, inventory: Inventory, runtimes: dict[str, Runtime]):
        self.config = config
        self.inventory = inventory
        self.runtimes = runtimes
        self.started = time.time()
        self.interruptions: InterruptionWatch | None = None  # the cloud's notices, if watched
        self.version = __version__
        self.leases = LeaseTable(inventory, oversubscribe=config.oversubscribe)
        self.logs = LogStore(config.data_dir / "logs")
        self.images = ImageCache(
            config.image_dir or config.data_dir / "images",
            config.search_registries,
            config.insecure_registries,
            userns=config.userns,
        )
        self.cgroups = Cgroups(config.agent_id)
        self.network = (
            PodNetwork(
                config.agent_id,
                pool=config.pod_pool,
                deny=config.deny_networks,
                subnet=config.pod_subnet,
            )
            if config.pod_network
            else None
        )
        self.host_network = _host_network(config) if config.host_network else None
        self.tasks = TaskManager(
            config.data_dir, self.logs, runtimes, self.cgroups, self.network, self.host_network
        )
        self.default_runtime = config.default_runtime or next(
            (name for name in OCI_RUNTIMES if name in runtimes), ""
        )
        self._stop = threading.Event()
        # leases with a Run between its lease check and its task's record: their last task's
        # end does not release them (the task starting there would run in a released lease)
        self._starting: dict[str, int] = {}
        self._starting_lock = threading.Lock()
        self._expirer = threading.Thread(target=self._expire_loop, name="lease-expiry", daemon=True)

    def start(self) -> None:
        for task_id in self.tasks.reap_orphans(log.warning):
            log.warning("reaped task %s", task_id)
        if self.network is not None:
            self.network.start()
        self._expirer.start()

    def stop(self) -> None:
        """Refuse new work, end every task (and anything left in their cgroups), then
        remove the node's network and cgroups."""
        self._stop.set()
        self.tasks.shutdown()
        self._remove_node_state()

    def clean_up(self) -> list[str]:
        """What an agent that died on this data dir left, removed without serving: its
        tasks' processes, roots, containers and namespaces, its network and cgroups."""
        reaped = self.tasks.reap_orphans(log.warning)
        self._remove_node_state()
        return reaped

    def serving(self, port: int) -> None:
        """The API listens on `port`: the host network, which keeps jobs from it, opens."""
        if self.host_network is not None:
            self.host_network.start(port)

    def _remove_node_state(self) -> None:
        if self.host_network is not None:
            self.host_network.stop()
        if self.network is not None:
            self.network.stop()
        for runtime in self.runtimes.values():
            if isinstance(runtime, CrunRuntime):
                runtime.remove_roots()
        self.cgroups.remove_parent()

    # ---- leases -----------------------------------------------------------------------

    def acquire(self, spec: LeaseSpec) -> Lease:
        lease = self.leases.acquire(spec)
        log.info("lease %s for %s: cpus %s", lease.id, lease.holder, list(lease.cpus))
        return lease

    def release(self, lease_id: str) -> list[str]:
        self.leases.get(lease_id)
        stopped = self.tasks.cancel_lease(lease_id, "its lease was released")
        with contextlib.suppress(NoSuchLease):  # its last task's end released it meanwhile
            self.leases.release(lease_id)
        return stopped

    def _release_if_last(self, task: Task) -> None:
        with self._starting_lock:
            if self._starting.get(task.lease_id):
                return
            # a task's state is final before its hook runs (`done` only after): of two tasks
            # of the lease that end at once, the hook that looks last sees the other ended
            others = [t for t in self.tasks.in_lease(task.lease_id) if t is not task]
            if any(t.state is TaskState.RUNNING for t in others):
                return
            try:
                self.leases.release(task.lease_id)
            except NoSuchLease:  # released or expired meanwhile
                return
        task.lease_released = True

    def _expire_loop(self) -> None:
        while not self._stop.wait(self.config.lease_check_interval):
            for lease in self.leases.expired():
                log.warning("lease %s of %s expired; stopping its tasks", lease.id, lease.holder)
                self.tasks.cancel_lease(lease.id, "its lease expired (the holder stopped renewing)")
                with contextlib.suppress(NoSuchLease):  # released as its last task ended
                    self.leases.release(lease.id)

    # ---- tasks ------------------------------------------------------------------------

    def run(self, spec: TaskSpec, lease_id: str, *, release_at_end: bool = False) -> Task:
        """Start a task in a lease, pulling its image first when the cache lacks it; with
        `release_at_end`, the lease is released as the task ends, unless another task of the
        lease still runs."""
        with self._starting_lock:  # the lease is not released by a task's end meanwhile
            lease = self.leases.get(lease_id)
            self._starting[lease_id] = self._starting.get(lease_id, 0) + 1
        try:
            return self._run(spec, lease, release_at_end)
        finally:
            with self._starting_lock:
                self._starting[lease_id] -= 1
                if not self._starting[lease_id]:
                    del self._starting[lease_id]

    def _run(self, spec: TaskSpec, lease: Lease, release_at_end: bool) -> Task:
        lease_id = lease.id
        if not spec.runtime and spec.image.startswith("oras://") and self.config.sif_runtime:
            spec = replace(spec, runtime=self.config.sif_runtime)  # e.g. apptainer, if chosen
        if not spec.runtime:
            if not self.default_runtime:
                raise TaskError(
                    "no runtime named and no OCI runtime on this node; name one of: "
                    + ", ".join(sorted(self.runtimes))
                )
            spec = replace(spec, runtime=self.default_runtime)
        runtime = self.runtimes.get(spec.runtime)
        image = None
        if runtime is not None and spec.host_network:
            self.tasks.host_network_for(runtime)  # refused before anything is pulled
        if runtime is not None and runtime.needs_image:
            if not spec.image:
                raise TaskError(f"the {spec.runtime} runtime needs an image")
            try:  # the holder pulled it with its login (PullImage); a Run carries none
                image = self.images.get(spec.image, check_access=False)
            except ImageError as exc:
                raise TaskError(str(exc)) from None
        spec = with_devices(spec, lease.devices)
        on_end = self._release_if_last if release_at_end else None
        task = self.tasks.run(spec, lease_id, lease.cpus, lease.memory_bytes, image, on_end)
        try:  # released (or expired) while the task was prepared: it would run on cores
            self.leases.get(lease_id)  # given back; once recorded, a release ends it itself
        except NoSuchLease:
            self.tasks.cancel(task.id, 0, "its lease was released while it started")
        log.info("task %s (%s) in lease %s: %s", task.id, spec.name, lease_id, task.state.value)
        return task


# Device kind -> (environment variables naming the visible devices, host nodes per index,
# host nodes every user of that kind needs).
_DEVICE_ACCESS = {
    "nvidia.com/gpu": (
        ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"),
        "/dev/nvidia{}",
        ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"),
    ),
    "amd.com/gpu": (("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"), "", ("/dev/kfd",)),
}


def with_devices(spec: TaskSpec, devices: tuple[tuple[str, int], ...]) -> TaskSpec:
    """The spec limited to the lease's devices: they are named in the environment (which the
    job cannot override), and their device files, where this node has them, are exposed.

    A task of a lease without GPUs sees none (empty *_VISIBLE_DEVICES)."""
    env = dict(spec.env)
    nodes: list[str] = []
    for kind, (variables, per_index, shared) in _DEVICE_ACCESS.items():
        indexes = [i for k, i in devices if k == kind]
        for var in variables:
            env[var] = ",".join(map(str, indexes))
        if indexes:
            candidates = [per_index.format(i) for i in indexes if per_index] + list(shared)
            nodes += [n for n in candidates if Path(n).exists()]
    if not any(kind == "nvidia.com/gpu" for kind, _ in devices):
        env["NVIDIA_VISIBLE_DEVICES"] = "void"  # the NVIDIA container toolkit's "no GPU"
    return replace(spec, env=env, device_nodes=tuple(nodes))
