"""Leases: the cores, memory and devices a job holds on a node, for as long as it renews them.

Cores are leased as whole physical cores (all their hardware threads are reserved); `threads`
decides whether the task sees every hardware thread or one per core. `affinity` picks where:

- CORE: any free cores.
- NUMA / SOCKET: as few NUMA nodes / sockets as possible. If one group can hold the request,
  the fullest such group is used (best fit, which keeps large groups whole for large jobs);
  otherwise groups are taken largest first, which needs the fewest groups.

A node may be oversubscribed (`oversubscribe` K > 1, as Slurm's OverSubscribe=FORCE:K): each
core may then be held by up to K leases at once, and a lease takes the cores held by the
fewest, so that leases spread over the node before they share a core. Memory and devices are
never shared.

A refusal says whether waiting can help: `LeaseError` (no room now: what is held must be
released first), `LeaseNeverFits` (this node is too small for the request, whatever it holds)
and `BadLeaseRequest` (the request itself is malformed).

The table is pure bookkeeping with an injected clock; the agent stops the tasks of expired
leases before it releases them.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .inventory import Cpu, Inventory

__all__ = [
    "BadLeaseRequest",
    "Lease",
    "LeaseError",
    "LeaseNeverFits",
    "LeaseSpec",
    "LeaseTable",
    "NoSuchLease",
]

DEFAULT_TTL = 30.0
DEVICE_VENDORS = {"nvidia.com/gpu": "nvidia", "amd.com/gpu": "amd"}


class LeaseError(Exception):
    """The node cannot grant the lease now; the message says what is short."""


class LeaseNeverFits(LeaseError):
    """The node can never grant the lease, however much is free: it asks for more cores,
    memory or devices than the node has."""


class BadLeaseRequest(LeaseNeverFits):
    """The request is malformed (no cores, an unknown affinity): no node grants it."""


class NoSuchLease(LeaseError):
    """No lease with that id (never granted, released, or expired)."""


@dataclass(frozen=True, slots=True)
class LeaseSpec:
    """What a job asks for on one node."""

    holder: str
    cores: int = 1
    affinity: str = "CORE"  # CORE, SOCKET or NUMA
    threads: bool = False
    memory_bytes: int = 0
    memory_by_core: bool = False
    devices: dict[str, int] = field(default_factory=dict)
    exclusive: bool = False
    ttl: float = DEFAULT_TTL


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    holder: str
    cpus: tuple[int, ...]  # the logical CPUs the task may use
    cores: tuple[tuple[int, int], ...]  # (socket, core) pairs reserved
    memory_bytes: int
    devices: tuple[tuple[str, int], ...]
    exclusive: bool
    ttl: float
    expires_at: float  # clock seconds


class LeaseTable:
    """Grants, renews, releases and expires leases against one inventory. Thread-safe."""

    def __init__(
        self,
        inventory: Inventory,
        clock: Callable[[], float] = time.time,
        *,
        oversubscribe: int = 1,
    ) -> None:
        if oversubscribe < 1:
            raise ValueError("oversubscribe is at least 1 (a core held by one lease at a time)")
        self.inventory = inventory
        self.clock = clock
        self.oversubscribe = oversubscribe  # leases that may hold one core at once
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        # physical core (socket, core) -> its logical CPUs, in id order
        self._cores: dict[tuple[int, int], list[Cpu]] = defaultdict(list)
        for cpu in sorted(inventory.cpus, key=lambda c: c.id):
            self._cores[(cpu.socket, cpu.core)].append(cpu)

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def get(self, lease_id: str) -> Lease:
        with self._lock:
            return self._get(lease_id)

    def _get(self, lease_id: str) -> Lease:
        try:
            return self._leases[lease_id]
        except KeyError:
            raise NoSuchLease(f"no lease {lease_id!r} (released or expired?)") from None

    def acquire(self, spec: LeaseSpec) -> Lease:
        """Grant `spec` or raise `LeaseError` saying what is short (`LeaseNeverFits` when
        the node is too small for it, `BadLeaseRequest` when it is malformed)."""
        self._check_fits(spec)
        with self._lock:
            if any(lease.exclusive for lease in self._leases.values()):
                raise LeaseError("the node is held by an exclusive lease")
            if spec.exclusive and self._leases:
                raise LeaseError(
                    f"an exclusive lease needs an idle node; {len(self._leases)} lease(s) held"
                )
            cores = self._pick_cores(spec)
            memory = spec.memory_bytes * (spec.cores if spec.memory_by_core else 1)
            free_memory = self.inventory.memory_bytes - sum(
                lease.memory_bytes for lease in self._leases.values()
            )
            if memory > free_memory:
                raise LeaseError(f"asked for {memory} bytes of memory; {free_memory} are free")
            devices = self._pick_devices(spec.devices)
            cpus = [
                cpu.id
                for core in cores
                for cpu in (self._cores[core] if spec.threads else self._cores[core][:1])
            ]
            lease = Lease(
                id=uuid.uuid4().hex[:12],
                holder=spec.holder,
                cpus=tuple(sorted(cpus)),
                cores=tuple(cores),
                memory_bytes=memory,
                devices=tuple(devices),
                exclusive=spec.exclusive,
                ttl=spec.ttl,
                expires_at=self.clock() + spec.ttl,
            )
            self._leases[lease.id] = lease
            return lease

    def renew(self, lease_id: str, ttl: float | None = None) -> Lease:
        with self._lock:
            lease = self._get(lease_id)
            if lease.expires_at <= self.clock():
                raise NoSuchLease(f"lease {lease_id!r} has expired")
            ttl = ttl or lease.ttl
            lease = replace(lease, ttl=ttl, expires_at=self.clock() + ttl)
            self._leases[lease_id] = lease
            return lease

    def release(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._get(lease_id)
            del self._leases[lease_id]
            return lease

    def expired(self) -> list[Lease]:
        """Leases whose time is up (still held until released)."""
        now = self.clock()
        with self._lock:
            return [lease for lease in self._leases.values() if lease.expires_at <= now]

    def _check_fits(self, spec: LeaseSpec) -> None:
        """Refuse what this node could not grant even with nothing held."""
        if spec.cores < 1:
            raise BadLeaseRequest("a lease needs at least one core")
        if spec.affinity not in ("CORE", "SOCKET", "NUMA"):
            raise BadLeaseRequest(f"unknown affinity {spec.affinity!r}; use CORE, SOCKET or NUMA")
        if spec.cores > len(self._cores):
            raise LeaseNeverFits(f"asked for {spec.cores} cores; this node has {len(self._cores)}")
        memory = spec.memory_bytes * (spec.cores if spec.memory_by_core else 1)
        if memory > self.inventory.memory_bytes:
            raise LeaseNeverFits(
                f"asked for {memory} bytes of memory; this node has {self.inventory.memory_bytes}"
            )
        for kind, count in spec.devices.items():
            vendor = DEVICE_VENDORS.get(kind)
            have = sum(1 for g in self.inventory.gpus if vendor and g.vendor == vendor)
            if count > have:
                raise LeaseNeverFits(f"asked for {count} {kind}; this node has {have}")

    # ---- choosing -----------------------------------------------------------------

    def _free_cores(self) -> list[tuple[int, int]]:
        """The cores with room for one more lease, those held by the fewest first."""
        held = Counter(core for lease in self._leases.values() for core in lease.cores)
        room = [core for core in self._cores if held[core] < self.oversubscribe]
        return sorted(room, key=lambda core: held[core])  # stable: in core order otherwise

    def _pick_cores(self, spec: LeaseSpec) -> list[tuple[int, int]]:
        free = self._free_cores()
        if len(free) < spec.cores:
            raise LeaseError(
                f"asked for {spec.cores} cores; {len(free)} of {len(self._cores)} are free"
            )
        if spec.affinity == "CORE":
            return free[: spec.cores]

        def group_of(core: tuple[int, int]) -> int:
            cpu = self._cores[core][0]
            return cpu.numa_node if spec.affinity == "NUMA" else cpu.socket

        groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for core in free:
            groups[group_of(core)].append(core)
        fitting = [g for g in groups.values() if len(g) >= spec.cores]
        if fitting:
            return min(fitting, key=len)[: spec.cores]
        largest_first = sorted(groups.values(), key=len, reverse=True)
        return list(itertools.chain.from_iterable(largest_first))[: spec.cores]

    def _pick_devices(self, wanted: dict[str, int]) -> list[tuple[str, int]]:
        taken = {d for lease in self._leases.values() for d in lease.devices}
        picked: list[tuple[str, int]] = []
        for kind, count in wanted.items():
            if count == 0:
                continue
            vendor = DEVICE_VENDORS.get(kind)
            indexes = [g.index for g in self.inventory.gpus if g.vendor == vendor]
            free = [i for i in indexes if (kind, i) not in taken]
            if len(free) < count:
                raise LeaseError(
                    f"asked for {count} {kind}; {len(free)} of {len(indexes)} are free here"
                )
            picked.extend((kind, i) for i in free[:count])
        return picked
