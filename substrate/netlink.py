"""The few rtnetlink requests that make a node's bridge and wire a task's network namespace,
sent from this process.

The agent's bridge is made at start (after listing the IPv4 networks in use, to pick a free
subnet) and deleted at stop. A task's namespace gets a veth pair (one end inside, the other
out in the agent's namespace), an address, its links up and a default route. `ip` does this
in one process per task, which costs more CPU than the rest of the namespace's set-up (a
Python netlink library measured no cheaper here: 4.6 ms of CPU per namespace against 3.6 ms
for `ip`); these requests are a few packed structs on a socket of the calling thread's
namespace (rtnetlink(7), netlink(7)).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

__all__ = ["NetlinkError", "Rtnl"]

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_GETADDR = 16, 17, 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_PID = 3, 18, 19
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_GATEWAY, RTA_TABLE = 1, 5, 15
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
IFF_UP = 0x1
NLA_F_NESTED = 0x8000

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg


class NetlinkError(OSError):
    """The kernel refused a request."""


def _attr(kind: int, payload: bytes) -> bytes:
    """One attribute (rtattr), padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


class Rtnl:
    """A route netlink socket in the namespace of the thread that opens it."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *_: object) -> None:
        self._sock.close()

    def _send(self, kind: int, flags: int, body: bytes) -> None:
        self._seq += 1
        header = _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | flags, self._seq, 0)
        self._sock.send(header + body)

    def _replies(self, what: str) -> Iterator[bytes]:
        """The payload of each reply to the last request until its end (its acknowledgement,
        or the end of a dump); the kernel's refusal raises."""
        while True:
            reply = self._sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(reply):
                length, rtype, _, seq, _ = _HEADER.unpack_from(reply, offset)
                payload = reply[offset + _HEADER.size : offset + length]
                offset += max(length, _HEADER.size) + (-length % 4)
                if seq != self._seq:
                    continue
                if rtype == NLMSG_ERROR:  # an error code of 0 is the acknowledgement
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, f"{what}: {os.strerror(code)}")
                    return
                if rtype == NLMSG_DONE:
                    return
                yield payload

    def _dump(self, kind: int, body: bytes, what: str) -> Iterator[bytes]:
        """The payload of every message a dump request gets back."""
        self._send(kind, NLM_F_DUMP, body)
        yield from self._replies(what)

    def _request(self, kind: int, flags: int, body: bytes, what: str) -> None:
        """Send one request and wait for its acknowledgement."""
        self._send(kind, NLM_F_ACK | flags, body)
        for _ in self._replies(what):
            pass  # a request's only reply is its acknowledgement

    def add_veth(self, name: str, peer: str, peer_pid: int) -> None:
        """A veth pair: `name` here, `peer` in the network namespace of process `peer_pid`."""
        peer_info = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer))
        peer_info += _attr(IFLA_NET_NS_PID, struct.pack("=I", peer_pid))
        data = _attr(VETH_INFO_PEER | NLA_F_NESTED, peer_info)
        info = _attr(IFLA_INFO_KIND, _name("veth")) + _attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name))
        body += _attr(IFLA_LINKINFO | NLA_F_NESTED, info)
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"add veth {name}")

    def set_up(self, name: str) -> None:
        index = socket.if_nametoindex(name)
        body = _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP)
        self._request(RTM_NEWLINK, 0, body, f"set {name} up")

    def add_address(self, name: str, interface: ipaddress.IPv4Interface) -> None:
        index = socket.if_nametoindex(name)
        packed = interface.ip.packed
        body = _IFADDR.pack(socket.AF_INET, interface.network.prefixlen, 0, 0, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add {interface} to {name}")

    def add_default_route(self, gateway: ipaddress.IPv4Address) -> None:
        self.add_route(gateway)

    def add_route(
        self, gateway: ipaddress.IPv4Address, destination: ipaddress.IPv4Network | None = None
    ) -> None:
        """A route to `destination` (None: the default route) through `gateway`."""
        prefix = destination.prefixlen if destination else 0
        body = _RTMSG.pack(
            socket.AF_INET,
            prefix,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
            0,
        )
        if destination is not None:
            body += _attr(RTA_DST, destination.network_address.packed)
        body += _attr(RTA_GATEWAY, gateway.packed)
        what = f"add {destination or 'default'} via {gateway}"
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body, what)

    def add_bridge(self, name: str) -> None:
        info = _attr(IFLA_INFO_KIND, _name("bridge"))
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name))
        body += _attr(IFLA_LINKINFO | NLA_F_NESTED, info)
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"add bridge {name}")

    def delete_link(self, name: str) -> None:
        body = _IFINFO.pack(0, 0, socket.if_nametoindex(name), 0, 0)
        self._request(RTM_DELLINK, 0, body, f"delete {name}")

    def ipv4_networks(self, index: int = 0) -> list[ipaddress.IPv4Network]:
        """The network of every IPv4 address (of interface `index` alone, unless 0)."""
        found = []
        request = _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)
        for payload in self._dump(RTM_GETADDR, request, "list addresses"):
            family, prefix, _, _, owner = _IFADDR.unpack_from(payload)
            attrs = _attrs(payload[_IFADDR.size :])
            local = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if family == socket.AF_INET and local and (not index or owner == index):
                address = ipaddress.IPv4Address(local[:4])
                found.append(ipaddress.IPv4Network(f"{address}/{prefix}", strict=False))
        return found

    def ipv4_routes(self) -> list[ipaddress.IPv4Network]:
        """The destination of every IPv4 route of the main table but the default (what
        `ip -4 route` lists)."""
        found = []
        request = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        for payload in self._dump(RTM_GETROUTE, request, "list routes"):
            family, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(payload)
            attrs = _attrs(payload[_RTMSG.size :])
            if RTA_TABLE in attrs:
                table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0]
            dst = attrs.get(RTA_DST)
            if family == socket.AF_INET and table == RT_TABLE_MAIN and dst and dst_len:
                address = ipaddress.IPv4Address(dst[:4])
                found.append(ipaddress.IPv4Network(f"{address}/{dst_len}", strict=False))
        return found


def _attrs(data: bytes) -> dict[int, bytes]:
    """A message's attributes (rtattr), by kind (the last of a kind wins)."""
    found = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + 4 : offset + length]
        offset += length + (-length % 4)
    return found
