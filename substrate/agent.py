"""The agent: one node's inventory, leases, tasks and logs, and the loop that expires leases."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .inventory import Inventory
from .leases import Lease, LeaseSpec, LeaseTable
from .logstore import LogStore
from .runtimes import Runtime, TaskSpec
from .tasks import Task, TaskError, TaskManager

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("substrate")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    data_dir: Path
    token: str
    default_runtime: str = ""
    lease_check_interval: float = 0.5
    labels: dict[str, str] = field(default_factory=dict)


class Agent:
    """Everything the API serves, without gRPC."""

    def __init__(self, config: AgentConfig, inventory: Inventory, runtimes: dict[str, Runtime]):
        self.config = config
        self.inventory = inventory
        self.runtimes = runtimes
        self.started = time.time()
        self.version = __version__
        self.leases = LeaseTable(inventory)
        self.logs = LogStore(config.data_dir / "logs")
        self.tasks = TaskManager(config.data_dir, self.logs, runtimes)
        self._stop = threading.Event()
        self._expirer = threading.Thread(target=self._expire_loop, name="lease-expiry", daemon=True)

    def start(self) -> None:
        for task_id in self.tasks.reap_orphans(log.warning):
            log.warning("reaped task %s", task_id)
        self._expirer.start()

    def stop(self) -> None:
        self._stop.set()
        self.tasks.shutdown()

    # ---- leases -----------------------------------------------------------------------

    def acquire(self, spec: LeaseSpec) -> Lease:
        lease = self.leases.acquire(spec)
        log.info("lease %s for %s: cpus %s", lease.id, lease.holder, list(lease.cpus))
        return lease

    def release(self, lease_id: str) -> list[str]:
        self.leases.get(lease_id)
        stopped = self.tasks.cancel_lease(lease_id, "its lease was released")
        self.leases.release(lease_id)
        return stopped

    def _expire_loop(self) -> None:
        while not self._stop.wait(self.config.lease_check_interval):
            for lease in self.leases.expired():
                log.warning("lease %s of %s expired; stopping its tasks", lease.id, lease.holder)
                self.tasks.cancel_lease(lease.id, "its lease expired (the holder stopped renewing)")
                self.leases.release(lease.id)

    # ---- tasks ------------------------------------------------------------------------

    def run(self, spec: TaskSpec, lease_id: str) -> Task:
        lease = self.leases.get(lease_id)
        if not spec.runtime:
            if not self.config.default_runtime:
                raise TaskError(
                    "no runtime named and this agent has no default; name one of: "
                    + ", ".join(sorted(self.runtimes))
                )
            spec = _with_runtime(spec, self.config.default_runtime)
        task = self.tasks.run(spec, lease_id, lease.cpus)
        log.info("task %s (%s) in lease %s: %s", task.id, spec.name, lease_id, task.state.value)
        return task


def _with_runtime(spec: TaskSpec, runtime: str) -> TaskSpec:
    from dataclasses import replace

    return replace(spec, runtime=runtime)
