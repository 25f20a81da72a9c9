"""The orchestrator's count of each node's free room follows the agent's own rules (whole
cores, memory, GPUs by kind, an exclusive lease alone), so a lease is asked for only where
it fits: checked here on its own, and move by move against the agent's lease table."""

from __future__ import annotations

import random
from collections.abc import Callable

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.capacity import Capacity, NodeTotal, Shape
from substrate.inventory import Cpu, Gpu, Inventory
from substrate.leases import LeaseError, LeaseSpec, LeaseTable

GIB = 2**30


def node(cores: int, memory: int, gpus: int = 0, threads: int = 1) -> NodeTotal:
    cpus = [
        pb.Cpu(id=c * threads + t, core=c, socket=0, numa_node=0)
        for c in range(cores)
        for t in range(threads)
    ]
    return NodeTotal.of(
        pb.InventoryResponse(
            cpus=cpus,
            memory_bytes=memory,
            gpus=[pb.Gpu(index=i, vendor="nvidia") for i in range(gpus)],
        )
    )


def test_the_total_counts_whole_cores_and_gpus_by_kind() -> None:
    total = node(cores=4, memory=8 * GIB, gpus=2, threads=2)
    assert (total.cores, total.memory, dict(total.devices)) == (4, 8 * GIB, {"nvidia.com/gpu": 2})


def test_tasks_go_where_they_fit_and_their_room_comes_back() -> None:
    c = Capacity([node(2, 4 * GIB), node(4, 4 * GIB)])
    one = Shape(cores=1, memory=GIB)
    assert c.room(one) == 2 + 4
    assert [c.take(one) for _ in range(6)] == [0, 0, 1, 1, 1, 1]
    assert c.take(one) is None  # every core is held
    c.give_back(1, one)
    assert c.take(one) == 1
    big = Shape(cores=3, memory=GIB)
    assert not c.fits_somewhere(big)
    assert not c.never_fits(big)  # the second node could hold it, once it is free
    assert c.never_fits(Shape(cores=5, memory=GIB))
    assert c.never_fits(Shape(cores=1, memory=5 * GIB))


def test_memory_and_gpus_limit_as_cores_do() -> None:
    c = Capacity([node(8, 4 * GIB, gpus=2)])
    gpu = Shape(cores=1, memory=GIB, devices=(("nvidia.com/gpu", 1),))
    assert c.room(gpu) == 2
    assert c.take(gpu) == 0
    assert c.take(gpu) == 0
    assert c.take(gpu) is None  # cores are left, GPUs are not
    assert c.room(Shape(cores=1, memory=GIB)) == 2  # 2 GiB left
    assert c.never_fits(Shape(cores=1, memory=0, devices=(("amd.com/gpu", 1),)))


def test_an_exclusive_task_needs_an_idle_node_and_holds_it_alone() -> None:
    c = Capacity([node(4, 4 * GIB)])
    small, alone = Shape(cores=1, memory=0), Shape(cores=1, memory=0, exclusive=True)
    assert c.take(small) == 0
    assert c.take(alone) is None  # something runs there
    c.give_back(0, small)
    assert c.take(alone) == 0
    assert c.room(small) == 0  # nothing else while it holds the node
    c.give_back(0, alone)
    assert c.room(small) == 4


def test_a_refusal_the_count_did_not_foresee_blocks_that_shape_until_room_comes_back() -> None:
    c = Capacity([node(4, 4 * GIB)])
    one, two = Shape(cores=1, memory=0), Shape(cores=2, memory=0)
    assert c.take(one) == 0
    assert c.take(two) == 0
    c.refused(0, two)  # the agent said no: its own count differs (a lease not yet expired)
    assert c.take(two) is None  # not asked again there...
    assert c.take(one) == 0  # ...though other shapes still are
    c.give_back(0, one)  # something ended there
    assert c.take(two) == 0


def test_the_count_grants_exactly_what_the_agents_lease_table_grants() -> None:
    """Random leases taken and given back on one node (2 sockets of 4 cores with 2 threads
    each, 16 GiB, 2 GPUs): the count says a shape fits exactly when the agent grants it."""
    cpus = tuple(
        Cpu(id=s * 8 + c * 2 + t, core=c, socket=s, numa_node=s)
        for s in range(2)
        for c in range(4)
        for t in range(2)
    )
    gpus = (Gpu(0, "nvidia", "t4", 16 * GIB), Gpu(1, "nvidia", "t4", 16 * GIB))
    inventory = Inventory("n", cpus, 16 * GIB, gpus)
    total = NodeTotal.of(
        pb.InventoryResponse(
            cpus=[
                pb.Cpu(id=c.id, core=c.core, socket=c.socket, numa_node=c.numa_node) for c in cpus
            ],
            memory_bytes=inventory.memory_bytes,
            gpus=[pb.Gpu(index=g.index, vendor=g.vendor) for g in gpus],
        )
    )

    def random_spec(rng: random.Random) -> LeaseSpec:
        return LeaseSpec(
            holder="run",
            cores=rng.choice([1, 1, 2, 3, 5]),
            affinity=rng.choice(["CORE", "SOCKET", "NUMA"]),
            threads=rng.random() < 0.3,
            memory_bytes=rng.choice([0, GIB, 3 * GIB]),
            memory_by_core=rng.random() < 0.3,
            devices={"nvidia.com/gpu": 1} if rng.random() < 0.2 else {},
            exclusive=rng.random() < 0.05,
        )

    replay(lambda: LeaseTable(inventory), total, random_spec, random.Random(7))


def replay(
    new_table: Callable[[], LeaseTable],
    total: NodeTotal,
    random_spec: Callable[[random.Random], LeaseSpec],
    rng: random.Random,
) -> None:
    """Random leases taken and given back, 20 times 60 moves: the count must say a shape
    fits exactly when the agent's table grants it."""
    for _ in range(20):
        table, count = new_table(), Capacity([total])
        held: list[tuple[str, Shape]] = []
        for _ in range(60):
            if held and rng.random() < 0.4:
                lease_id, shape = held.pop(rng.randrange(len(held)))
                table.release(lease_id)
                count.give_back(0, shape)
                continue
            spec = random_spec(rng)
            memory = spec.memory_bytes * (spec.cores if spec.memory_by_core else 1)
            devices = tuple(sorted(spec.devices.items()))
            shape = Shape(spec.cores, memory, devices, spec.exclusive)
            node = count.take(shape)
            try:
                lease = table.acquire(spec)
            except LeaseError:
                assert node is None, spec
                continue
            assert node == 0, spec
            held.append((lease.id, shape))


def test_an_oversubscribed_node_counts_each_core_once_per_lease_that_may_hold_it() -> None:
    """An agent with --oversubscribe 3 on 2 cores: the count reads K from the inventory and
    agrees with the agent's lease table move by move for one-core tasks (the agent spreads
    them over its cores, so a core has room whenever any slot is free)."""
    cpus = (Cpu(0, 0, 0, 0), Cpu(1, 1, 0, 0))
    inventory = Inventory("n", cpus, 8 * GIB, ())
    total = NodeTotal.of(
        pb.InventoryResponse(
            cpus=[pb.Cpu(id=c.id, core=c.core, socket=0, numa_node=0) for c in cpus],
            memory_bytes=8 * GIB,
            oversubscribe=3,
        )
    )
    assert (total.cores, total.per_core) == (2, 3)
    assert not total.holds(Shape(3, 0))  # a lease still needs that many distinct cores
    replay(
        lambda: LeaseTable(inventory, oversubscribe=3),
        total,
        lambda rng: LeaseSpec("run", memory_bytes=rng.choice([0, GIB, 3 * GIB])),
        random.Random(11),
    )
    assert Capacity([total]).room(Shape(1, 0)) == 6
