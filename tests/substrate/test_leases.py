"""Lease placement on a synthetic two-socket node, and lease lifetimes with a fake clock."""

from __future__ import annotations

import pytest

from substrate.inventory import Cpu, Gpu, Inventory
from substrate.leases import (
    BadLeaseRequest,
    LeaseError,
    LeaseNeverFits,
    LeaseSpec,
    LeaseTable,
    NoSuchLease,
)

GiB = 2**30


def node(
    sockets: int = 2,
    numa_per_socket: int = 2,
    cores_per_numa: int = 4,
    threads: int = 2,
    gpus: int = 2,
) -> Inventory:
    """CPU ids like Linux numbers them: first threads of every core, then the siblings."""
    cores = sockets * numa_per_socket * cores_per_numa
    cpus = []
    for t in range(threads):
        for c in range(cores):
            numa = c // cores_per_numa
            cpus.append(
                Cpu(id=t * cores + c, core=c, socket=numa // numa_per_socket, numa_node=numa)
            )
    return Inventory(
        hostname="n1",
        cpus=tuple(cpus),
        memory_bytes=64 * GiB,
        gpus=tuple(Gpu(i, "nvidia", "NVIDIA H100", 80 * GiB) for i in range(gpus)),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def numa_nodes(table: LeaseTable, cpus: tuple[int, ...]) -> set[int]:
    by_id = {c.id: c for c in table.inventory.cpus}
    return {by_id[c].numa_node for c in cpus}


def test_core_affinity_takes_free_cores_one_thread_each() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", cores=3))
    assert lease.cpus == (0, 1, 2)
    assert len(lease.cores) == 3


def test_threads_hand_out_every_hardware_thread_of_the_cores() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", cores=2, threads=True))
    assert lease.cpus == (0, 1, 16, 17)


def test_numa_affinity_fits_in_one_node_and_prefers_the_fullest() -> None:
    table = LeaseTable(node())
    table.acquire(LeaseSpec("filler", cores=3))  # leaves 1 free core on NUMA node 0
    lease = table.acquire(LeaseSpec("a", cores=1, affinity="NUMA"))
    assert numa_nodes(table, lease.cpus) == {0}  # best fit: the one core left on node 0
    big = table.acquire(LeaseSpec("b", cores=4, affinity="NUMA"))
    assert len(numa_nodes(table, big.cpus)) == 1


def test_numa_affinity_spans_the_fewest_nodes() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", cores=6, affinity="NUMA"))
    assert len(numa_nodes(table, lease.cpus)) == 2


def test_numa_affinity_on_a_fragmented_node() -> None:
    table = LeaseTable(node())
    for holder in "wxyz":  # best fit puts each on its own NUMA node, leaving 1 core on each
        table.acquire(LeaseSpec(holder, cores=3, affinity="NUMA"))
    lease = table.acquire(LeaseSpec("a", cores=2, affinity="NUMA"))
    assert len(numa_nodes(table, lease.cpus)) == 2


def test_socket_affinity() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", cores=8, affinity="SOCKET"))
    sockets = {c.socket for c in table.inventory.cpus if c.id in lease.cpus}
    assert sockets == {0}


def test_memory_by_core_and_memory_shortage() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", cores=4, memory_bytes=4 * GiB, memory_by_core=True))
    assert lease.memory_bytes == 16 * GiB
    with pytest.raises(LeaseError, match="bytes of memory"):
        table.acquire(LeaseSpec("b", cores=1, memory_bytes=49 * GiB))


def test_cores_shortage_says_what_is_free() -> None:
    table = LeaseTable(node())
    table.acquire(LeaseSpec("a", cores=15))
    with pytest.raises(LeaseError, match="asked for 2 cores; 1 of 16 are free"):
        table.acquire(LeaseSpec("b", cores=2))


def test_devices() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", devices={"nvidia.com/gpu": 1}))
    assert lease.devices == (("nvidia.com/gpu", 0),)
    second = table.acquire(LeaseSpec("b", devices={"nvidia.com/gpu": 1}))
    assert second.devices == (("nvidia.com/gpu", 1),)
    with pytest.raises(LeaseError, match="0 of 2 are free"):
        table.acquire(LeaseSpec("c", devices={"nvidia.com/gpu": 1}))
    with pytest.raises(LeaseError, match=r"amd\.com/gpu"):
        table.acquire(LeaseSpec("d", devices={"amd.com/gpu": 1}))


def test_exclusive_needs_and_keeps_an_idle_node() -> None:
    table = LeaseTable(node())
    held = table.acquire(LeaseSpec("a"))
    with pytest.raises(LeaseError, match="idle node"):
        table.acquire(LeaseSpec("b", exclusive=True))
    table.release(held.id)
    table.acquire(LeaseSpec("b", exclusive=True))
    with pytest.raises(LeaseError, match="exclusive lease"):
        table.acquire(LeaseSpec("c"))


def test_release_frees_everything() -> None:
    table = LeaseTable(node())
    lease = table.acquire(LeaseSpec("a", cores=16, memory_bytes=64 * GiB))
    table.release(lease.id)
    assert table.acquire(LeaseSpec("b", cores=16, memory_bytes=64 * GiB)).cpus == lease.cpus
    with pytest.raises(NoSuchLease):
        table.release(lease.id)


def test_expiry_and_renewal() -> None:
    clock = Clock()
    table = LeaseTable(node(), clock=clock)
    lease = table.acquire(LeaseSpec("a", ttl=10))
    clock.now += 9
    renewed = table.renew(lease.id)
    assert renewed.expires_at == clock.now + 10
    clock.now += 9
    assert table.expired() == []
    clock.now += 2
    assert [x.id for x in table.expired()] == [lease.id]
    with pytest.raises(NoSuchLease, match="expired"):
        table.renew(lease.id)


@pytest.mark.parametrize(
    ("cores", "affinity", "error"),
    [(0, "CORE", "at least one core"), (1, "NODE", "unknown affinity")],
)
def test_bad_requests(cores: int, affinity: str, error: str) -> None:
    with pytest.raises(LeaseError, match=error):
        LeaseTable(node()).acquire(LeaseSpec("a", cores=cores, affinity=affinity))


def test_a_request_the_node_can_never_grant_is_told_apart_from_no_room_now() -> None:
    table = LeaseTable(node())
    held = table.acquire(LeaseSpec("a", cores=15))
    with pytest.raises(LeaseError) as now:  # waits: cores come free when `a` ends
        table.acquire(LeaseSpec("b", cores=2))
    assert not isinstance(now.value, LeaseNeverFits)
    table.release(held.id)
    table.acquire(LeaseSpec("x", exclusive=True))  # the answer does not depend on what is held
    with pytest.raises(LeaseNeverFits, match="asked for 17 cores; this node has 16"):
        table.acquire(LeaseSpec("b", cores=17))
    with pytest.raises(LeaseNeverFits, match="bytes of memory; this node has"):
        table.acquire(LeaseSpec("b", cores=2, memory_bytes=40 * GiB, memory_by_core=True))
    with pytest.raises(LeaseNeverFits, match=r"asked for 3 nvidia\.com/gpu; this node has 2"):
        table.acquire(LeaseSpec("b", devices={"nvidia.com/gpu": 3}))
    with pytest.raises(BadLeaseRequest):
        table.acquire(LeaseSpec("b", cores=0))


def test_an_oversubscribed_node_lets_k_leases_share_a_core_and_spreads_them_first() -> None:
    """oversubscribe=3 on a node of 2 cores: six one-core leases, each core held by three;
    leases go to the core held by the fewest first; memory is never shared."""
    small = Inventory("n", (Cpu(0, 0, 0, 0), Cpu(1, 1, 0, 0)), 4 * GiB, ())
    table = LeaseTable(small, oversubscribe=3)
    leases = [table.acquire(LeaseSpec("a")) for _ in range(6)]
    assert [x.cpus for x in leases] == [(0,), (1,), (0,), (1,), (0,), (1,)]
    with pytest.raises(LeaseError, match="0 of 2 are free"):
        table.acquire(LeaseSpec("a"))
    table.release(leases[1].id)
    assert table.acquire(LeaseSpec("a")).cpus == (1,)  # the core with room
    table.release(leases[0].id)
    table.release(leases[2].id)  # core 0 held once, core 1 three times: one core has room
    with pytest.raises(LeaseError, match="asked for 2 cores; 1 of 2 are free"):
        table.acquire(LeaseSpec("a", cores=2))
    table.release(leases[3].id)
    two = table.acquire(LeaseSpec("a", cores=2))  # two distinct cores, each with room
    assert two.cpus == (0, 1)
    with pytest.raises(LeaseError, match="memory"):
        table.acquire(LeaseSpec("a", memory_bytes=5 * GiB))
    with pytest.raises(ValueError, match="at least 1"):
        LeaseTable(small, oversubscribe=0)


def test_without_oversubscription_a_core_is_one_leases() -> None:
    small = Inventory("n", (Cpu(0, 0, 0, 0), Cpu(1, 1, 0, 0)), 4 * GiB, ())
    table = LeaseTable(small)
    table.acquire(LeaseSpec("a"))
    table.acquire(LeaseSpec("a"))
    with pytest.raises(LeaseError, match="0 of 2 are free"):
        table.acquire(LeaseSpec("a"))
