"""The node's pod network: every job container gets a network namespace of its own.

The agent owns one bridge per node (`sqb<agent id>`, the first free /24 of the pool) in the
network namespace it runs in. Each task gets a namespace (`/run/netns/sq<task id>`) with a
veth on that bridge, an address of the subnet and a default route through the bridge, so
containers of the node reach each other, the containers of other nodes (routed), and the
outside (masqueraded). An nftables table of the agent's own keeps them away from the node
itself: nothing arriving from the bridge is delivered to the node (not the agent's port, not
a control plane listening on it, not loopback), and nothing is forwarded to the addresses in
`deny` (by default link-local, where clouds serve instance credentials).

Everything is made at agent start and per task, and removed at task end and agent stop; an
agent that starts on the data directory of one that died removes what that one left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .netlink import Rtnl

__all__ = [
    "Attachment",
    "HostNetwork",
    "NetworkError",
    "PodNetwork",
    "enslave",
    "host_lock",
    "netns_path",
    "new_netns",
    "node_address",
    "remove",
    "unpin",
]

POOL = "10.224.0.0/12"
DENY = ("169.254.0.0/16",)
# a node's own IPv6 (the host network's alone: pods have none): where AWS and GCP serve
# instance metadata and credentials over IPv6
DENY6 = ("fd00:ec2::254/128", "fd20:ce::254/128")
NETNS_DIR = Path("/run/netns")
LOCK = Path("/run/squall-network.lock")
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
MS_BIND = 0x1000
SIOCBRADDIF, SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x89A2, 0x8913, 0x8914, 0x1
SIOCGIFADDR = 0x8915
POD_INTERFACE = "eth0"  # a task's on the pod network
_libc = ctypes.CDLL(None, use_errno=True)


class NetworkError(Exception):
    """The pod network cannot be set up or a task cannot be attached; says why."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A task's network namespace and its address on the node's bridge."""

    netns: str  # the namespace's path, for the runtime to join
    address: str


def netns_path(task_id: str) -> Path:
    return NETNS_DIR / f"sq{task_id}"


def _nft(script: str) -> None:
    result = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise NetworkError(f"nft: {result.stderr.strip()}")


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """One agent at a time picks a subnet on this machine."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def new_netns(
    path: Path, settings: dict[str, str], wire: Callable[[], None] = lambda: None
) -> None:
    """A network namespace pinned at `path` (as `ip netns add` makes them), with `settings`
    (sysctls) written in it and `wire` run in it. A thread of its own makes it: unshare
    changes only the calling thread, and /proc/sys/net and new sockets follow the thread."""
    errors: list[OSError] = []

    def inside() -> None:
        try:
            path.touch(mode=0o444, exist_ok=False)
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare: {os.strerror(err)}")
            for key, value in settings.items():
                Path("/proc/sys", *key.split(".")).write_text(value)
            wire()  # before it is pinned: should this fail, the namespace goes with the thread
            ns = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _libc.mount(ns, os.fsencode(path), None, MS_BIND, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount {path}: {os.strerror(err)}")
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    if errors:
        raise NetworkError(f"cannot make the network namespace {path}: {errors[0]}")


def enslave(veth: str, bridge: str) -> None:
    """Put `veth` on `bridge` and bring it up (two ioctls, no process)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            index = socket.if_nametoindex(veth)
            fcntl.ioctl(sock, SIOCBRADDIF, struct.pack("16si20x", bridge.encode(), index))
            request = struct.pack("16sH22x", veth.encode(), 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", veth.encode(), flags | IFF_UP))
    except OSError as exc:
        raise NetworkError(f"cannot put {veth} on {bridge}: {exc.strerror or exc}") from None


class HostNetwork:
    """The node's own network, for the containers of a multi-node job (MPI over the node's
    interfaces and fabric, as HPC clusters run it; a cloud's nodes do not route each other's
    pod subnets). Such a container shares the agent's network namespace, so an nftables table
    of the agent's own keeps it, by the owner of its sockets (its user namespace's host ids),
    from the denied networks and from every agent's port."""

    def __init__(
        self, agent_id: str, address: str, uids: tuple[int, int], deny: Sequence[str] = DENY
    ) -> None:
        self.address = address  # the node's, where the job's other nodes reach it
        self.interface = interface_of(address)  # MPI is pinned to it (MULTINODE_NODE_INTERFACE)
        self.uids = uids  # first and last host id of the containers' users
        self.deny = tuple(deny)
        self.table = f"squallh_{agent_id[:12]}"
        self.agent_port = 0
        self.ready = False  # set once the table is in place: no container shares it before

    def start(self, agent_port: int) -> None:
        owners = f"{self.uids[0]}-{self.uids[1]}"
        rules = [f"    meta skuid {owners} tcp dport {agent_port} drop\n"]
        deny = (*self.deny, *DENY6)
        for family, version in (("ip", 4), ("ip6", 6)):
            nets = [n for n in deny if ipaddress.ip_network(n, strict=False).version == version]
            if nets:
                closed = ", ".join(nets)
                rules.append(f"    meta skuid {owners} {family} daddr {{ {closed} }} drop\n")
        _nft(
            f"table inet {self.table}\n"
            f"delete table inet {self.table}\n"
            f"table inet {self.table} {{\n"
            "  chain output {\n"
            "    type filter hook output priority filter - 10; policy accept;\n"
            # replies pass (the orchestrator may probe what a job serves)
            "    ct state established,related accept\n"
            f"{''.join(rules)}"
            "  }\n"
            "}\n"
        )
        self.agent_port = agent_port  # port-forward to a host-network task refuses it too
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        with contextlib.suppress(NetworkError):
            _nft(f"table inet {self.table}\ndelete table inet {self.table}\n")


def interface_of(address: str) -> str:
    """The name of this namespace's interface whose address is `address`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                data = fcntl.ioctl(sock, SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(data[20:24]) == address:
                return name
    raise NetworkError(f"no interface of this node has the address {address}")


def node_address(listen_host: str) -> str:
    """This node's address for its host network: the agent's listen address, or, where it
    listens on every address, the one its default route leaves from (no packet is sent)."""
    if listen_host not in ("", "0.0.0.0", "::", "[::]"):
        return listen_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError as exc:
            raise NetworkError(f"cannot tell this node's address (no route out?): {exc}") from None
        return str(sock.getsockname()[0])


class PodNetwork:
    """The bridge, firewall and per-task namespaces of one agent."""

    def __init__(
        self,
        agent_id: str,
        *,
        pool: str = POOL,
        deny: Sequence[str] = DENY,
        subnet: str | None = None,
    ) -> None:
        """`subnet`: the node's container subnet, given (a namespaced node of a local
        cluster, whose nodes cannot see each other's); None: the first free /24 of `pool`.
        Traffic to `pool` is routed as it is, to anywhere else masqueraded."""
        self.bridge = f"sqb{agent_id[:12]}"
        self.table = f"squall_{agent_id[:12]}"
        self.pool = ipaddress.IPv4Network(pool)
        self.deny = [str(ipaddress.ip_network(d)) for d in deny]
        self.given_subnet = ipaddress.IPv4Network(subnet) if subnet else None
        self.subnet: ipaddress.IPv4Network | None = None
        self._free: list[ipaddress.IPv4Address] = []
        self._given: dict[str, ipaddress.IPv4Address] = {}
        self._lock = threading.Lock()

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        assert self.subnet is not None
        return next(self.subnet.hosts())

    def start(self) -> None:
        """Make (or take back, after a crash) the bridge, then the firewall."""
        if os.geteuid() != 0:
            raise NetworkError(
                "the pod network needs root (a bridge, namespaces, a firewall): run the agent "
                "as root, or with --no-pod-network to give jobs loopback alone"
            )
        if shutil.which("nft") is None:
            raise NetworkError(
                "the pod network needs `nft` (Debian: nftables; scripts/setup.sh --runtime "
                "installs it)"
            )
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            with host_lock():
                self.subnet = self._existing() or self._make_bridge()
        except OSError as exc:  # what the kernel said to a netlink request
            raise NetworkError(f"cannot make the bridge {self.bridge}: {exc}") from None
        hosts = list(self.subnet.hosts())
        self._free = hosts[1:]
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        self._firewall()

    def _existing(self) -> ipaddress.IPv4Network | None:
        try:
            index = socket.if_nametoindex(self.bridge)
        except OSError:
            return None
        with Rtnl() as rtnl:
            for network in rtnl.ipv4_networks(index):
                return network
            rtnl.delete_link(self.bridge)  # a bridge without its address: start again
        return None

    def _make_bridge(self) -> ipaddress.IPv4Network:
        with Rtnl() as rtnl:
            used = rtnl.ipv4_networks() + rtnl.ipv4_routes()
            if self.given_subnet is not None:
                subnet = self.given_subnet
                if any(subnet.overlaps(u) for u in used):
                    raise NetworkError(f"the pod subnet {subnet} is in use on this node")
            else:
                for subnet in self.pool.subnets(new_prefix=24):
                    if not any(subnet.overlaps(u) for u in used):
                        break
                else:
                    raise NetworkError(f"no free /24 left in the pod pool {self.pool}")
            gateway = next(subnet.hosts())
            rtnl.add_bridge(self.bridge)
            rtnl.add_address(self.bridge, ipaddress.IPv4Interface(f"{gateway}/{subnet.prefixlen}"))
            rtnl.set_up(self.bridge)
        return subnet

    def _firewall(self) -> None:
        assert self.subnet is not None
        br, table = self.bridge, self.table
        deny = ", ".join(self.deny)
        # replies pass: a node's side (the orchestrator probing a service) may start them
        deny_rule = (
            f'iifname "{br}" ip daddr {{ {deny} }} ct state != {{ established, related }} drop'
            if self.deny
            else ""
        )
        _nft(
            f"table inet {table}\n"
            f"delete table inet {table}\n"
            f"table inet {table} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter - 10; policy accept;\n"
            f'    iifname "{br}" ct state established,related accept\n'
            f'    iifname "{br}" drop\n'
            # containers of other nodes, routed here unmasqueraded (at this bridge's address)
            f"    ip saddr {self.pool} ct state != {{ established, related }} drop\n"
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter - 10; policy accept;\n"
            f"    {deny_rule}\n"
            f'    iifname "{br}" accept\n'
            f'    oifname "{br}" ct state established,related accept\n'
            "  }\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    ip saddr {self.subnet} ip daddr != {self.pool} oifname != "{br}" masquerade\n'
            "  }\n"
            "}\n"
        )

    def stop(self) -> None:
        """Remove the firewall table and the bridge (call after every task has ended)."""
        with contextlib.suppress(NetworkError):
            _nft(f"table inet {self.table}\ndelete table inet {self.table}\n")
        with contextlib.suppress(OSError), Rtnl() as rtnl:
            rtnl.delete_link(self.bridge)

    # ---- tasks --------------------------------------------------------------------------

    def attach(self, task_id: str) -> Attachment:
        """A new namespace for the task, on the bridge, with an address of the subnet."""
        assert self.subnet is not None, "start() the network first"
        with self._lock:
            if not self._free:
                raise NetworkError(f"every address of {self.subnet} is in use on this node")
            address = self._free.pop(0)
            self._given[task_id] = address
        veth = f"sqv{task_id}"[:15]
        interface = ipaddress.IPv4Interface(f"{address}/{self.subnet.prefixlen}")
        gateway = self.gateway

        def wire() -> None:  # inside: the pair is made there, its other end sent to the node
            with Rtnl() as rtnl:
                rtnl.add_veth(POD_INTERFACE, veth, os.getpid())
                rtnl.add_address("eth0", interface)
                rtnl.set_up("lo")
                rtnl.set_up("eth0")
                rtnl.add_default_route(gateway)

        try:
            # root in the job is not root of this namespace: let it bind low ports and ping
            new_netns(
                netns_path(task_id),
                {
                    "net.ipv4.ip_unprivileged_port_start": "0",
                    "net.ipv4.ping_group_range": "0 2147483647",
                },
                wire,
            )
            enslave(veth, self.bridge)
        except NetworkError:
            self.detach(task_id)
            raise
        return Attachment(str(netns_path(task_id)), str(address))

    def detach(self, task_id: str) -> None:
        """Remove the task's veth and namespace and give its address back."""
        remove(task_id)
        with self._lock:
            address = self._given.pop(task_id, None)
            if address is not None:
                self._free.append(address)


def remove(task_id: str) -> None:
    """Remove a task's namespace, whoever made it (an agent that died): its name goes at once,
    and the kernel destroys the namespace, and the veth pair with it, once the task's last
    process has gone. (Done here rather than by `ip netns del` and `ip link del`, which
    wait on the kernel: 30 ms of every task's end.)"""
    unpin(netns_path(task_id))


def unpin(path: Path) -> None:
    """Remove the name of a pinned network namespace (`ip netns del` without its wait)."""
    _libc.umount2(os.fsencode(path), MNT_DETACH)  # EINVAL/ENOENT: not (or no longer) mounted
    path.unlink(missing_ok=True)
