"""The join service: where a run's booting nodes trade its join token for their certificate.

A provisioner whose nodes boot from the node image opens a window for its run (the token,
the run's authority, how many nodes of each group it waits for), makes the nodes, and waits
until every one has joined or the deadline passes. A node's address is the one it joined
from, so nodes of a scale set, whose addresses no stack output lists, are found like any
other. Nodes may also send lines of their boot (`Say`): when a node does not join in time,
the error shows them, with what its console said where the provisioner can read it.

One service per orchestrator process, on the address its nodes are told (TLS with this
orchestrator's join certificate, `pki.join_identity`). Tokens are compared in constant time;
a wrong token and an unknown run get the same refusal.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from api.squall.v1 import join_pb2, join_pb2_grpc

from .base import Cancelled, ProvisionError, Report, quiet
from .pki import JoinIdentity, RunAuthority

__all__ = ["Joined", "Registrar"]

log = logging.getLogger("squall.join")
_LINES = 40  # the last boot lines kept per node
_REFUSED = "the join token is not that of a run taking nodes"


@dataclass(frozen=True, slots=True)
class Joined:
    node: str  # the name the run knows it by: GROUP-INDEX
    group: str
    hostname: str
    address: str  # the address it says its default route leaves from
    peer: str  # the address its call came from (its public address behind a cloud's NAT)
    agent_port: int

    @property
    def index(self) -> int:
        """Its place in its group."""
        return int(self.node.rpartition("-")[2])


@dataclass
class _Window:
    run_id: str
    token_digest: bytes
    authority: RunAuthority
    groups: Mapping[str, int]
    from_itself: bool = False  # a node's reported address must be the one it calls from
    # places of a group kept for the nodes whose boot data names them (a group's node 0 that
    # serves its volumes): no other node takes them
    kept: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # where a node's reported address must be, unless it is the one it calls from: the run's
    # network (None: anywhere; its call's source is what is dialled then)
    reported_in: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    keys: dict[tuple[str, str], bytes] = field(default_factory=dict)  # each node's public key
    joined: dict[tuple[str, str], Joined] = field(default_factory=dict)
    lines: dict[str, deque[str]] = field(default_factory=dict)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _peer_host(context: grpc.ServicerContext) -> str:
    peer = urllib.parse.unquote(context.peer())  # ipv4:1.2.3.4:5678, ipv6:%5B::1%5D:5678
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host if kind in ("ipv4", "ipv6") else ""


class Registrar(join_pb2_grpc.NodeJoinServicer):
    """The join service and the runs it takes nodes for."""

    def __init__(self, identity: JoinIdentity, listen: str) -> None:
        self.identity = identity
        self._lock = threading.Condition()
        self._windows: dict[str, _Window] = {}
        # no SO_REUSEPORT: a second orchestrator on the port must fail, not split the joins
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)]
        )
        join_pb2_grpc.add_NodeJoinServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        credentials = grpc.ssl_server_credentials([(identity.key, identity.certificate)])
        try:
            self.port = self._server.add_secure_port(listen, credentials)
        except RuntimeError:  # grpc's "failed to bind"
            self.port = 0
        if not self.port:
            raise ProvisionError(f"the join service cannot listen on {listen}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    # windows

    def open(
        self,
        run_id: str,
        token: str,
        authority: RunAuthority,
        groups: Mapping[str, int],
        *,
        from_itself: bool = False,
        kept: Mapping[str, frozenset[int]] | None = None,
        reported_in: Sequence[str] | None = None,
    ) -> None:
        """Take up to `groups[name]` nodes of each group for `run_id`; with `from_itself`,
        only nodes whose reported address is the one they call from (no NAT between); the
        places in `kept[group]` only for nodes that name them; with `reported_in` (CIDRs),
        only nodes that report an address in one of them or the one they call from."""
        with self._lock:
            self._windows[run_id] = _Window(
                run_id,
                _digest(token),
                authority,
                dict(groups),
                from_itself,
                kept=kept or {},
                reported_in=(
                    tuple(ipaddress.ip_network(c, strict=False) for c in reported_in)
                    if reported_in is not None
                    else None
                ),
            )

    def close(self, run_id: str) -> None:
        """Take no more nodes for `run_id`, and forget its authority."""
        with self._lock:
            self._windows.pop(run_id, None)

    def joined(self, run_id: str) -> list[Joined]:
        with self._lock:
            window = self._windows.get(run_id)
            return sorted(window.joined.values(), key=_order) if window else []

    def wait(
        self,
        run_id: str,
        deadline_s: float,
        *,
        consoles: Callable[[], Mapping[str, str]] | None = None,
        report: Report = quiet,
        stop: Callable[[], bool] = lambda: False,
    ) -> list[Joined]:
        """Every node of `run_id`, once all have joined (in group order, then by index).
        ProvisionError after `deadline_s`, naming the groups short of nodes, the nodes
        that joined, and the last lines each node said or its console (`consoles`: node
        or VM name -> console text) shows; Cancelled as soon as `stop()` says so (a
        cancel)."""
        until = time.monotonic() + deadline_s
        seen = 0
        while True:  # report and stop (a database, maybe) are called without the lock
            with self._lock:
                window = self._windows.get(run_id)
                if window is None:
                    raise ProvisionError(f"run {run_id} takes no nodes")
                count, want = len(window.joined), sum(window.groups.values())
                if count == seen and count != want:
                    left = until - time.monotonic()
                    if left > 0:
                        self._lock.wait(min(left, 5.0))
                    count = len(window.joined)
                done = sorted(window.joined.values(), key=_order) if count == want else None
            if count != seen:
                seen = count
                report(f"{count} of {want} nodes joined")
            if done is not None:
                return done
            if time.monotonic() >= until:
                break
            if stop():
                raise Cancelled(f"run {run_id} stopped while its nodes were joining")
        with self._lock:
            missing = {
                group: want - sum(1 for j in window.joined.values() if j.group == group)
                for group, want in window.groups.items()
            }
            joined = sorted(window.joined.values(), key=_order)
            lines = {host: list(said) for host, said in window.lines.items()}
        short = ", ".join(
            f"{group}: {want - gap} of {want}"
            for group, want in window.groups.items()
            if (gap := missing[group])
        )
        message = [f"nodes did not join run {run_id} within {deadline_s:.0f} s ({short} joined)"]
        if joined:
            message.append(
                "joined: " + ", ".join(f"{j.node} ({j.hostname}, {j.address})" for j in joined)
            )
        for host, said in lines.items():
            message.append(f"{host} said: " + " | ".join(said[-5:]))
        for name, text in (consoles() if consoles else {}).items():
            if any(j.hostname == name or j.node == name for j in joined):
                continue
            tail = [line for line in text.splitlines() if line.strip()][-12:]
            message.append(f"{name} console (last lines):\n  " + "\n  ".join(tail or ["(empty)"]))
        raise ProvisionError("\n".join(message))

    # the service

    def _window(self, run_id: str, token: str, context: grpc.ServicerContext) -> _Window:
        window = self._windows.get(run_id)
        # compare even for an unknown run: the time says nothing of which runs exist
        expected = window.token_digest if window else _digest(f"no run {time.monotonic()}")
        if not hmac.compare_digest(_digest(token), expected) or window is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, _REFUSED)
        assert window is not None
        return window

    def Join(
        self, request: join_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> join_pb2.JoinReply:
        with self._lock:
            window = self._window(request.run_id, request.token, context)
            if request.group not in window.groups:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"run {request.run_id} has no node group {request.group!r}",
                )
            try:
                address = str(ipaddress.ip_address(request.address))
            except ValueError:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{request.address!r} is not an address"
                )
            if not 0 < request.agent_port < 65536 or not request.hostname:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "a node names its hostname and agent port"
                )
            peer = _peer_host(context)
            outside = window.reported_in is not None and not any(
                ipaddress.ip_address(address) in net for net in window.reported_in
            )
            if outside and address != peer:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{address} is not in the run's network, nor where the node calls from",
                )
            if window.from_itself and peer != address:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"a node of this run joins from its own address ({address}), not {peer}",
                )
            key = (request.group, request.hostname)
            known = window.joined.get(key)
            public_key = _public_key(request.csr, context)
            if known is not None and (known.peer != peer or window.keys[key] != public_key):
                # the same name from elsewhere, or with another key: not the node that
                # joined (a node asks again with the key it made once)
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{known.node} joined from another address or with another key already",
                )
            if known is None:
                index = _place(window, request, context)
                name = f"{request.group}-{index}"
            else:
                name = known.node  # the same node again (its agent restarted): same name
            try:
                certificate = window.authority.sign_node(request.csr, name)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if known is None:  # a node asking again keeps the address and port it joined with
                window.joined[key] = Joined(
                    name, request.group, request.hostname, address, peer, request.agent_port
                )
                window.keys[key] = public_key
            self._lock.notify_all()
            log.info("run %s: %s joined as %s from %s", request.run_id, request.hostname,
                     name, address)  # fmt: skip
            return join_pb2.JoinReply(node=name, certificate=certificate, ca=window.authority.ca)

    def Say(self, request: join_pb2.BootLine, context: grpc.ServicerContext) -> join_pb2.SayReply:
        with self._lock:
            window = self._window(request.run_id, request.token, context)
            said = window.lines.setdefault(request.hostname[:64], deque(maxlen=_LINES))
            said.append(request.text[:500])
            if len(window.lines) > 4 * sum(window.groups.values()):  # no one floods memory
                window.lines.pop(next(iter(window.lines)))
        return join_pb2.SayReply()


def _public_key(csr_pem: bytes, context: grpc.ServicerContext) -> bytes:
    """The public key of a certificate request (DER), or the call is refused."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "the certificate request is not a PEM PKCS#10 request"
        )
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _place(window: _Window, request: join_pb2.JoinRequest, context: grpc.ServicerContext) -> int:
    """The place in its group of a node joining for the first time: the one its boot data
    names (kept for it), else the lowest one neither held nor kept."""
    group = request.group
    count, kept = window.groups[group], window.kept.get(group, frozenset())
    held = {j.index for j in window.joined.values() if j.group == group}
    if request.HasField("index"):
        if request.index not in kept:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"place {request.index} of group {group} is not kept for a named node",
            )
        if request.index in held:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{group}-{request.index} has joined already"
            )
        return int(request.index)
    free = [i for i in range(count) if i not in held and i not in kept]
    if not free:
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the places left in group {group} are kept for named nodes"
            if kept - held
            else f"all {count} nodes of group {group} have joined",
        )
    return free[0]


def _order(joined: Joined) -> tuple[str, int]:
    return joined.group, joined.index
