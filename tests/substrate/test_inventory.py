"""Topology from a sysfs tree, CPU lists, and slicing the machine for one agent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from substrate.inventory import parse_cpu_list, read_cpus, read_inventory


@pytest.mark.parametrize(
    ("text", "cpus"), [("0-3", [0, 1, 2, 3]), ("0,2,4-5\n", [0, 2, 4, 5]), ("7", [7]), ("", [])]
)
def test_cpu_lists(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


def _sysfs(root: Path) -> Path:
    """Two sockets, one NUMA node each, two cores with two threads each."""
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "online").write_text("0-7\n")
    for cpu in range(8):
        topo = root / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        socket = (cpu % 4) // 2
        (topo / "physical_package_id").write_text(f"{socket}\n")
        (topo / "core_id").write_text(f"{cpu % 2}\n")
    for node, cpus in ((0, "0-1,4-5"), (1, "2-3,6-7")):
        (root / "node" / f"node{node}").mkdir(parents=True)
        (root / "node" / f"node{node}" / "cpulist").write_text(cpus + "\n")
    return root


def test_topology_from_sysfs(tmp_path: Path) -> None:
    cpus = {c.id: c for c in read_cpus(_sysfs(tmp_path))}
    assert len(cpus) == 8
    assert (cpus[2].socket, cpus[2].numa_node, cpus[2].core) == (1, 1, 0)
    assert (cpus[5].socket, cpus[5].numa_node, cpus[5].core) == (0, 0, 1)
    assert cpus[1].core == cpus[5].core
    assert cpus[1].socket == cpus[5].socket


def test_this_machine() -> None:
    inv = read_inventory()
    assert len(inv.cpus) == os.cpu_count()
    assert inv.memory_bytes > 0


def test_a_slice_of_this_machine() -> None:
    inv = read_inventory(cpus=[0], memory_bytes=2**30)
    assert [c.id for c in inv.cpus] == [0]
    assert inv.memory_bytes == 2**30
    with pytest.raises(ValueError, match="not online"):
        read_inventory(cpus=[4096])
    with pytest.raises(ValueError, match="the machine has"):
        read_inventory(memory_bytes=2**60)
