"""What each node of a cluster has free, as the orchestrator keeps count of its leases.

Each agent reports its cores, memory and GPUs once (`Inventory`); from then on the run loop
counts what its own leases hold, so it asks for a lease only on a node where the task fits,
and a node that frees a slot is offered to the jobs that fit it, not to every pending job.
The model is the agent's own rule (whole cores, memory, devices by kind, an exclusive lease
alone on its node; on an oversubscribed node, each core counted once per lease that may hold
it): the agent still has the final word, and a refusal the model did not foresee (a lease of
several cores on an oversubscribed node where few cores are left with room) marks that node
full for that shape of request until something ends there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from api.substrate.v1 import agent_pb2 as pb
from substrate.leases import DEVICE_VENDORS

from .fuzzfile.model import Resource

__all__ = ["Capacity", "NodeTotal", "Shape"]


@dataclass(frozen=True, slots=True)
class Shape:
    """What one task asks of its node."""

    cores: int
    memory: int
    devices: tuple[tuple[str, int], ...] = ()
    exclusive: bool = False

    @classmethod
    def of(cls, r: Resource) -> Shape:
        devices = tuple(sorted((k, v) for k, v in r.devices.items() if v))
        return cls(r.cores, r.memory_per_node or 0, devices, r.exclusive)


@dataclass(frozen=True, slots=True)
class NodeTotal:
    """What a node has: whole cores, memory, and GPUs by device kind."""

    cores: int
    memory: int
    devices: Mapping[str, int] = field(default_factory=dict)
    per_core: int = 1  # leases that may hold one core at once (the agent's --oversubscribe)

    @classmethod
    def of(cls, inventory: pb.InventoryResponse) -> NodeTotal:
        vendors = Counter(g.vendor for g in inventory.gpus)
        return cls(
            cores=len({(c.socket, c.core) for c in inventory.cpus}),
            memory=inventory.memory_bytes,
            devices={kind: vendors[v] for kind, v in DEVICE_VENDORS.items() if vendors[v]},
            per_core=max(inventory.oversubscribe, 1),
        )

    def holds(self, shape: Shape) -> bool:
        """Whether the node could hold `shape` with nothing else on it."""
        return (
            shape.cores <= self.cores
            and shape.memory <= self.memory
            and all(n <= self.devices.get(kind, 0) for kind, n in shape.devices)
        )


class _Node:
    __slots__ = ("blocked", "cores", "devices", "exclusive", "leases", "lost", "memory", "total")

    def __init__(self, total: NodeTotal) -> None:
        self.total = total
        # core slots: a core counts once per lease that may hold it (oversubscribed nodes)
        self.cores, self.memory = total.cores * total.per_core, total.memory
        self.devices: Counter[str] = Counter(total.devices)
        self.leases = 0
        self.exclusive = False
        self.blocked: set[Shape] = set()  # refused by the agent though the count said yes
        self.lost = False  # its agent cannot be reached: nothing goes there

    def fits(self, shape: Shape) -> bool:
        return (
            not self.lost
            and not self.exclusive
            and not (shape.exclusive and self.leases)
            and shape not in self.blocked
            and shape.cores <= min(self.cores, self.total.cores)
            and shape.memory <= self.memory
            and all(n <= self.devices[kind] for kind, n in shape.devices)
        )

    def room(self, shape: Shape) -> int:
        """How many tasks of `shape` fit on this node now."""
        if not self.fits(shape):
            return 0
        if shape.exclusive:
            return 1
        counts = [self.cores // shape.cores if shape.cores else self.leases + 1]
        if shape.memory:
            counts.append(self.memory // shape.memory)
        counts += [self.devices[kind] // n for kind, n in shape.devices]
        return min(counts)

    def take(self, shape: Shape, sign: int) -> None:
        self.cores -= sign * shape.cores
        self.memory -= sign * shape.memory
        for kind, n in shape.devices:
            self.devices[kind] -= sign * n
        self.leases += sign
        if shape.exclusive:
            self.exclusive = sign > 0


class Capacity:
    """Free capacity of each node (by index), kept as leases are taken and given back."""

    def __init__(self, totals: list[NodeTotal]) -> None:
        self.nodes = [_Node(t) for t in totals]

    def _among(self, among: Sequence[int] | None) -> list[tuple[int, _Node]]:
        """The nodes (index, node) of `among` (a job's node group), or every node."""
        if among is None:
            return list(enumerate(self.nodes))
        return [(i, self.nodes[i]) for i in among]

    def never_fits(self, shape: Shape, among: Sequence[int] | None = None) -> bool:
        """No node (of `among`) could hold `shape` even empty."""
        return not any(n.total.holds(shape) for _, n in self._among(among))

    def nodes_that_hold(self, shape: Shape, among: Sequence[int] | None = None) -> int:
        """How many nodes (of `among`) could hold `shape` with nothing else on them (a gang
        needs as many as it has members)."""
        return sum(n.total.holds(shape) for _, n in self._among(among))

    def fits_somewhere(self, shape: Shape) -> bool:
        return any(n.fits(shape) for n in self.nodes)

    def room(self, shape: Shape, among: Sequence[int] | None = None) -> int:
        """How many tasks of `shape` fit now, all nodes (of `among`) together."""
        return sum(n.room(shape) for _, n in self._among(among))

    def take(self, shape: Shape, among: Sequence[int] | None = None) -> int | None:
        """Reserve `shape` on the first node (of `among`) where it fits now; that node, or
        None."""
        for i, node in self._among(among):
            if node.fits(shape):
                node.take(shape, 1)
                return i
        return None

    def take_gang(
        self, shape: Shape, count: int, among: Sequence[int] | None = None
    ) -> list[int] | None:
        """Reserve `shape` on `count` distinct nodes (of `among`) where it fits now, all of
        them or none (a gang holds nothing while it waits); those nodes, or None."""
        nodes = [i for i, node in self._among(among) if node.fits(shape)][:count]
        if len(nodes) < count:
            return None
        for i in nodes:
            self.nodes[i].take(shape, 1)
        return nodes

    def give_back(self, node: int, shape: Shape) -> None:
        """A lease of `shape` on `node` ended (or was never granted): its room is free again,
        and the node may be asked again for shapes it refused."""
        n = self.nodes[node]
        if n.lost:
            return  # whatever it held went with it
        n.take(shape, -1)
        n.blocked.clear()

    def lose(self, node: int, *, replacing: bool) -> None:
        """Node `node` was lost: nothing more goes there. While a replacement is on its way,
        what it could hold still counts (a job that only it holds waits for it); without
        one, it holds nothing."""
        n = self.nodes[node]
        n.lost = True
        if not replacing:
            n.total = NodeTotal(0, 0)

    def restore(self, node: int, total: NodeTotal) -> None:
        """Node `node` was replaced by an empty one with `total`."""
        self.nodes[node] = _Node(total)

    def refused(self, node: int, shape: Shape) -> None:
        """The agent had no room for `shape` though the count said it had: do not ask that
        node for it again until something ends there."""
        self.give_back(node, shape)
        self.nodes[node].blocked.add(shape)
