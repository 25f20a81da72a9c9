"""The network of a local cluster whose nodes are separate the way a cluster's machines are.

Each node of a run is a network namespace of its own (`/run/netns/sqn<key>-<i>`, where <key>
names the run) whose `eth0` is a veth on a bridge the run owns (`sqr<key>`, the first free /24
of NODE_POOL, the bridge at .1, node i at .i+2). The node's agent joins that namespace and takes
a hostname of its own (substrate/node.py), listens at the node's address alone, and puts its
job containers on a pod subnet of its own (a /24 of the pod pool that nothing on this machine
uses), to which every other node of the run, and this machine, have a route through the node's
address: containers of different nodes talk directly, as on a cloud's routed VPC ("host-gw"),
and the orchestrator reaches them (readiness probes) as it does a single node's.

An nftables table of the run's own on this machine keeps the run's nodes to themselves: nothing
from the bridge is delivered to this machine but replies (its services are not the nodes'),
nothing is forwarded from it to link-local addresses, to other runs' nodes or to the pod
networks of this machine's own agents, and nothing but replies is forwarded into it; what
leaves for elsewhere is masqueraded. Registries on this machine's loopback (a registry on
127.0.0.1, as the demo and the tests use) are relayed to the same port of each node's loopback
(LoopbackRelay), so that an image named there is the same image on every node.

Everything is named after the run, so that what a crashed orchestrator left is found and
removed by the run id alone (`RunNetwork(run_id).remove()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from substrate.netlink import Rtnl
from substrate.network import DENY, POOL, NetworkError, enslave, host_lock, new_netns, unpin

from .base import ProvisionError

__all__ = ["NODE_POOL", "LoopbackRelay", "NodePlace", "RunNetwork", "loopback_ports", "run_key"]

NODE_POOL = "10.216.0.0/13"  # one /24 for each run's nodes (pods: substrate's POOL)
NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")  # this machine's interfaces, by name
MAX_NODES = 250
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def run_key(run_id: str) -> str:
    """Eight hex digits that name a run's bridge, namespaces and firewall table."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class NodePlace:
    """Where node `index` of a run lives: what its agent is started with."""

    index: int
    name: str  # node-<index>: its hostname
    netns: Path
    address: ipaddress.IPv4Address
    pod_subnet: ipaddress.IPv4Network

    @property
    def node_network(self) -> ipaddress.IPv4Network:
        """The run's node subnet (every node's address, and the bridge's)."""
        return ipaddress.IPv4Interface(f"{self.address}/24").network


def _nft(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)


def _free_subnets(
    pool: str, used: Sequence[ipaddress.IPv4Network], count: int
) -> list[ipaddress.IPv4Network]:
    """The first `count` /24s of `pool` that overlap nothing in `used`."""
    free = []
    for subnet in ipaddress.IPv4Network(pool).subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            free.append(subnet)
            if len(free) == count:
                return free
    raise ProvisionError(f"no {count} free /24s left in {pool}")


class RunNetwork:
    """The bridge, firewall table and node namespaces of one run."""

    def __init__(self, run_id: str, routed: Sequence[str] = ()) -> None:
        """`routed`: networks the nodes reach from their own addresses (not masqueraded as
        this machine): data servers that route the node pool back here, and should see
        which node fetched."""
        self.key = run_key(run_id)
        self.routed = tuple(str(ipaddress.ip_network(n, strict=False)) for n in routed)
        self.bridge = f"sqr{self.key}"
        self.table = f"squall_run_{self.key}"

    def netns(self, index: int) -> Path:
        return NETNS_DIR / f"sqn{self.key}-{index}"

    @staticmethod
    def check() -> None:
        """Refuse, saying why, where the namespaces cannot be made."""
        if os.geteuid() != 0:
            raise ProvisionError(
                "separate nodes (--nodes N) each get a network namespace, an address on a "
                "bridge and a hostname of their own, which needs root: run as root, or with "
                "one node"
            )
        if shutil.which("nft") is None:
            raise ProvisionError(
                "separate nodes need `nft` for their firewall (Debian: nftables; "
                "scripts/setup.sh --runtime installs it)"
            )

    def make(self, count: int) -> list[NodePlace]:
        """The bridge, its firewall, `count` node namespaces and this machine's routes to
        their containers; everything made is removed again when a part fails."""
        self.check()
        if not 1 <= count <= MAX_NODES:
            raise ProvisionError(f"a local cluster has 1 to {MAX_NODES} nodes, not {count}")
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            # held until the routes are in: what is in use is read from them
            with host_lock(), Rtnl() as rtnl:  # the agents' too
                used = rtnl.ipv4_networks() + rtnl.ipv4_routes()
                (subnet,) = _free_subnets(NODE_POOL, used, 1)
                pods = _free_subnets(POOL, used, count)
                hosts = list(subnet.hosts())
                gateway = hosts[0]
                rtnl.add_bridge(self.bridge)
                rtnl.add_address(self.bridge, ipaddress.IPv4Interface(f"{gateway}/24"))
                rtnl.set_up(self.bridge)
                self._firewall(subnet)
                # the nodes reach registries and the internet through this machine
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
                places = [
                    NodePlace(i, f"node-{i}", self.netns(i), hosts[i + 1], pods[i])
                    for i in range(count)
                ]
                for place in places:
                    self._make_node(place, gateway, places)
                for place in places:  # this machine reaches containers as the nodes do
                    rtnl.add_route(place.address, place.pod_subnet)
        except BaseException as exc:
            self.remove()
            if isinstance(exc, OSError | NetworkError):
                raise ProvisionError(f"cannot make the run's node network: {exc}") from None
            raise
        return places

    def _firewall(self, subnet: ipaddress.IPv4Network) -> None:
        br = self.bridge
        closed = ", ".join((*DENY, NODE_POOL, POOL))
        routed = (
            f"    ip saddr {subnet} ip daddr {{ {', '.join(self.routed)} }} accept\n"
            if self.routed
            else ""
        )
        done = _nft(
            f"table inet {self.table} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter - 10; policy accept;\n"
            f'    iifname "{br}" ct state established,related accept\n'
            f'    iifname "{br}" drop\n'
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter - 10; policy accept;\n"
            # between the run's nodes (seen here when bridged traffic is filtered too)
            f'    iifname "{br}" oifname "{br}" accept\n'
            f'    iifname "{br}" ip daddr {{ {closed} }} drop\n'
            f'    iifname "{br}" accept\n'
            f'    oifname "{br}" ct state established,related accept\n'
            f'    oifname "{br}" drop\n'
            "  }\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"{routed}"
            f'    ip saddr {subnet} oifname != "{br}" masquerade\n'
            "  }\n"
            "}\n"
        )
        if done.returncode != 0:
            raise ProvisionError(f"cannot make the run's firewall: nft: {done.stderr.strip()}")

    def _make_node(
        self,
        place: NodePlace,
        gateway: ipaddress.IPv4Address,
        places: Sequence[NodePlace],
    ) -> None:
        veth = f"sqh{self.key}n{place.index}"

        def wire() -> None:  # inside the node: its end is eth0, the other end comes here
            with Rtnl() as rtnl:
                rtnl.add_veth("eth0", veth, os.getpid())
                rtnl.add_address("eth0", ipaddress.IPv4Interface(f"{place.address}/24"))
                rtnl.set_up("lo")
                rtnl.set_up("eth0")
                rtnl.add_default_route(gateway)
                for other in places:  # the other nodes' containers, through those nodes
                    if other is not place:
                        rtnl.add_route(other.address, other.pod_subnet)

        new_netns(place.netns, {"net.ipv4.ip_forward": "1"}, wire)
        enslave(veth, self.bridge)

    def remove(self) -> None:
        """Remove the run's node namespaces, firewall table and bridge, whoever made them;
        call once the run's agents are gone (their containers' veths go with the nodes)."""
        pinned = sorted(NETNS_DIR.glob(f"sqn{self.key}-*"))
        for path in pinned:
            unpin(path)
        try:
            socket.if_nametoindex(self.bridge)
        except OSError:
            if not pinned:
                return  # nothing of this run's network was ever made (bridge first, last gone)
        _nft(f"delete table inet {self.table}\n")
        with Rtnl() as rtnl:
            # the nodes' veths now, not when the kernel gets to destroying their namespaces
            for link in [*sorted(SYS_NET.glob(f"sqh{self.key}n*")), SYS_NET / self.bridge]:
                with contextlib.suppress(OSError):
                    rtnl.delete_link(link.name)


def loopback_ports(registries: Sequence[str]) -> list[int]:
    """The ports of the registries (HOST[:PORT]) that are on this machine's loopback: those
    the nodes reach through LoopbackRelay."""
    ports = set()
    for registry in registries:
        parts = urllib.parse.urlsplit(f"//{registry}")
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name
            loopback = False
        if loopback:
            ports.add(parts.port or 443)
    return sorted(ports)


def _in_netns(netns: Path, make: Callable[[], T]) -> T:
    """`make()` called by a thread of its own that has joined `netns` (a socket it makes
    stays in that namespace)."""
    made: list[T] = []
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(make())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=inside, name="netns")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return made[0]


class LoopbackRelay:
    """Ports of this machine's loopback, served on the same port of nodes' loopbacks: each
    connection a node makes there is carried to this machine's port by two threads."""

    def __init__(self) -> None:
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()

    def serve(self, netns: Path, port: int) -> None:
        """Listen on 127.0.0.1:`port` in `netns`, relaying to 127.0.0.1:`port` here."""
        try:
            listener = _in_netns(netns, lambda: socket.create_server(("127.0.0.1", port)))
        except OSError as exc:
            message = f"cannot relay port {port} to the node {netns.name}: {exc}"
            raise ProvisionError(message) from None
        self._keep(listener, port)

    def serve_on(self, host: str, port: int) -> None:
        """Listen on `host`:`port` of this machine (a bridge's address, which VMs reach),
        relaying to 127.0.0.1:`port`."""
        try:
            listener = socket.create_server((host, port))
        except OSError as exc:
            raise ProvisionError(f"cannot relay port {port} to {host}: {exc}") from None
        self._keep(listener, port)

    def _keep(self, listener: socket.socket, port: int) -> None:
        with self._lock:
            self._listeners.append(listener)
        threading.Thread(
            target=self._accept, args=(listener, port), name=f"relay-{port}", daemon=True
        ).start()

    @staticmethod
    def _accept(listener: socket.socket, port: int) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=_relay, args=(conn, port), daemon=True).start()

    def close(self) -> None:
        """Stop listening (connections in flight end with their peers)."""
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes its accept()
            listener.close()


def _relay(conn: socket.socket, port: int) -> None:
    """Carry one connection to 127.0.0.1:`port` and back until both sides have ended."""
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_copy, args=(upstream, conn), daemon=True)
    back.start()
    _copy(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """Copy until `source` ends (or fails), then end what `sink` is sent."""
    room = memoryview(bytearray(1 << 16))
    with contextlib.suppress(OSError):
        while n := source.recv_into(room):
            sink.sendall(room[:n])
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
