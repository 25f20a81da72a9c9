"""The agent's gRPC server: a token check on every call (and, with TLS, the caller's
certificate), and a servicer that only translates.

`create_server(agent, address)` returns the started server and its bound port, so tests bind
port 0. Errors map to precise status codes: UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED
(a lease the node cannot grant now), FAILED_PRECONDITION (a lease larger than the node, or a
task that cannot run), INVALID_ARGUMENT (a malformed request), UNIMPLEMENTED.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from api.substrate.v1 import agent_pb2 as pb
from api.substrate.v1 import agent_pb2_grpc as rpc

from .agent import Agent
from .auth import TokenAuth
from .data_service import DataServicer
from .images import ImageError
from .launcher import GRANT_HEADER, LaunchService, Peer
from .leases import BadLeaseRequest, Lease, LeaseError, LeaseNeverFits, LeaseSpec, NoSuchLease
from .logstore import STDERR, STDOUT
from .runtimes import RuntimeRefused, TaskSpec
from .runtimes.base import FileSpec, MountSpec
from .runtimes.rootfs import hostname
from .status import translating
from .streams import GrantRefused, exec_stream, port_forward_stream
from .tasks import NoSuchTask, Task, TaskError, TaskState
from .tls import PeerRoles, ServerTLS

__all__ = ["create_server"]

_AFFINITY = {
    pb.AFFINITY_UNSPECIFIED: "CORE",
    pb.AFFINITY_CORE: "CORE",
    pb.AFFINITY_SOCKET: "SOCKET",
    pb.AFFINITY_NUMA: "NUMA",
}
_STREAM = {STDOUT: pb.STREAM_STDOUT, STDERR: pb.STREAM_STDERR}
# the most output a Wait reply brings, whatever its output_limit: what is read for it stays in
# the agent's memory, and the reply within a client's default 4 MiB (longer: Logs streams it)
MAX_INLINE_OUTPUT = 2**20
_STATE = {
    TaskState.RUNNING: pb.TASK_STATE_RUNNING,
    TaskState.EXITED: pb.TASK_STATE_EXITED,
    TaskState.OOM_KILLED: pb.TASK_STATE_OOM_KILLED,
    TaskState.TIMED_OUT: pb.TASK_STATE_TIMED_OUT,
    TaskState.CANCELLED: pb.TASK_STATE_CANCELLED,
    TaskState.FAILED: pb.TASK_STATE_FAILED,
}


def _lease_pb(lease: Lease) -> pb.Lease:
    return pb.Lease(
        id=lease.id,
        holder=lease.holder,
        cpus=lease.cpus,
        memory_bytes=lease.memory_bytes,
        devices=[pb.Device(kind=k, index=i) for k, i in lease.devices],
        exclusive=lease.exclusive,
        ttl_seconds=lease.ttl,
        expires_at=lease.expires_at,
    )


def _status_pb(task: Task) -> pb.TaskStatus:
    return pb.TaskStatus(
        task_id=task.id,
        name=task.spec.name,
        lease_id=task.lease_id,
        state=_STATE[task.state],
        exit_code=task.exit_code,
        signal=task.signal,
        started_at=task.started_at,
        finished_at=task.finished_at,
        message=task.message,
        pid=task.pid,
        address=task.address,
        lease_released=task.lease_released,
    )


def _abort(context: Any, exc: Exception) -> None:
    """Domain errors of the agent as status codes (see the module's docstring)."""
    if isinstance(exc, NoSuchLease | NoSuchTask | FileNotFoundError):
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, BadLeaseRequest):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, LeaseNeverFits):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, LeaseError):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, TaskError | RuntimeRefused):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, GrantRefused):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    raise exc


_status_codes = translating(_abort)


class AgentServicer(DataServicer, rpc.AgentServicer):
    """Translates messages to `Agent` calls and back; domain errors to status codes."""

    def __init__(
        self, agent: Agent, auth: TokenAuth | None = None, tls: ServerTLS | None = None
    ) -> None:
        self.agent = agent
        self.auth = auth or _auth(agent)
        self.tls = tls  # a launcher calls its peers' agents with this node's certificate

    def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        a = self.agent
        return pb.HealthResponse(
            status="ok",
            agent_version=a.version,
            hostname=a.inventory.hostname,
            uptime_seconds=time.time() - a.started,
            interruption=a.interruptions.notice if a.interruptions else "",
        )

    def Inventory(self, request: pb.InventoryRequest, context: Any) -> pb.InventoryResponse:
        inv = self.agent.inventory
        return pb.InventoryResponse(
            hostname=inv.hostname,
            cpus=[
                pb.Cpu(id=c.id, core=c.core, socket=c.socket, numa_node=c.numa_node)
                for c in inv.cpus
            ],
            memory_bytes=inv.memory_bytes,
            gpus=[
                pb.Gpu(
                    index=g.index,
                    vendor=g.vendor,
                    model=g.model,
                    memory_bytes=g.memory_bytes,
                    uuid=g.uuid,
                )
                for g in inv.gpus
            ],
            labels={**inv.labels, **self.agent.config.labels},
            agent_version=self.agent.version,
            runtimes=sorted(self.agent.runtimes),
            oversubscribe=self.agent.leases.oversubscribe,
        )

    @_status_codes
    def AcquireLease(self, request: pb.AcquireLeaseRequest, context: Any) -> pb.Lease:
        spec = LeaseSpec(
            holder=request.holder,
            cores=request.cores,
            affinity=_AFFINITY[request.affinity],
            threads=request.threads,
            memory_bytes=request.memory_bytes,
            memory_by_core=request.memory_by_core,
            devices=dict(request.devices),
            exclusive=request.exclusive,
            ttl=request.ttl_seconds or 30.0,
        )
        return _lease_pb(self.agent.acquire(spec))

    @_status_codes
    def RenewLease(self, request: pb.RenewLeaseRequest, context: Any) -> pb.Lease:
        return _lease_pb(self.agent.leases.renew(request.lease_id, request.ttl_seconds or None))

    @_status_codes
    def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: Any
    ) -> pb.ReleaseLeaseResponse:
        return pb.ReleaseLeaseResponse(stopped_tasks=self.agent.release(request.lease_id))

    def ListLeases(self, request: pb.ListLeasesRequest, context: Any) -> pb.ListLeasesResponse:
        return pb.ListLeasesResponse(leases=[_lease_pb(x) for x in self.agent.leases.leases()])

    def PullImage(self, request: pb.PullImageRequest, context: Any) -> Iterator[pb.PullProgress]:
        """Pull on a worker thread; relay its progress lines as they come."""
        creds = request.credentials
        credentials = (creds.username, creds.password) if creds.username else None
        lines: queue.Queue[str | None] = queue.Queue()
        result: list[Any] = []

        def pull() -> None:
            try:
                result.append(self.agent.images.get(request.reference, credentials, lines.put))
            except Exception as exc:  # re-raised on the RPC thread below
                result.append(exc)
            finally:
                lines.put(None)

        threading.Thread(target=pull, daemon=True).start()
        for line in iter(lines.get, None):
            yield pb.PullProgress(message=line)
        outcome = result[0]
        if isinstance(outcome, ImageError):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(outcome))
        if isinstance(outcome, Exception):
            raise outcome
        note = "cached" if outcome.cached else "pulled"
        yield pb.PullProgress(
            message=f"{note} {outcome.reference}", done=True, digest=outcome.digest
        )

    def _mount(self, mount: pb.Mount) -> MountSpec:
        """A job's mount, from where this node keeps it (a volume on a share)."""
        source, shared = self._volumes.where(mount.source)
        return MountSpec(source, mount.destination, mount.read_only, idmap=not shared)

    @_status_codes
    def Run(self, request: pb.RunRequest, context: Any) -> pb.RunResponse:
        spec = TaskSpec(
            name=request.name,
            runtime=request.runtime,
            command=tuple(request.command),
            args=tuple(request.args),
            env=dict(request.env),
            cwd=request.cwd,
            image=request.image,
            mounts=tuple(self._mount(m) for m in request.mounts),
            files=tuple(FileSpec(f.path, f.content, f.mode or 0o644) for f in request.files),
            isolated_network=request.network == pb.NETWORK_ISOLATED,
            host_network=request.network == pb.NETWORK_HOST,
            timeout=request.timeout_seconds,
            script=request.script,
            launcher=request.launcher,
        )
        task = self.agent.run(spec, request.lease_id, release_at_end=request.release_lease_at_end)
        task.exec_grant = request.exec_grant  # the peers learn the task's id from this reply
        if request.launcher:
            peers = {
                p.hostname: Peer(p.hostname, p.agent, p.task_id, p.grant) for p in request.peers
            }
            LaunchService(
                task.dir / "launch",
                hostname(spec.name),
                peers,
                functools.partial(self._local_exec, task.id),
                task.done,
                tls=self.tls.as_client() if self.tls is not None else None,
            ).start()
        return pb.RunResponse(task_id=task.id, address=task.address)

    def _local_exec(self, task_id: str, command: list[str]) -> Iterator[pb.ExecOutput]:
        """`command` in this node's task `task_id`, as Exec runs it (for its launcher)."""
        start = pb.ExecInput(start=pb.ExecStart(task_id=task_id, command=command))
        requests = iter([start, pb.ExecInput(close_stdin=True)])
        for message in exec_stream(self.agent, requests, None):
            yield pb.ExecOutput.FromString(message)

    @_status_codes
    def Status(self, request: pb.StatusRequest, context: Any) -> pb.TaskStatus:
        return _status_pb(self.agent.tasks.get(request.task_id))

    @_status_codes
    def Wait(self, request: pb.WaitRequest, context: Any) -> pb.TaskStatus:
        task = self.agent.tasks.get(request.task_id)
        deadline = time.time() + request.timeout_seconds if request.timeout_seconds else None
        # wait in slices so that a client that hangs up frees the thread
        while not task.done.wait(0.5) and context.is_active():
            if deadline is not None and time.time() >= deadline:
                break
        ended = task.done.is_set()  # before the status: an ended status, then its output
        status = _status_pb(task)
        if request.output_limit and ended:
            output = self.agent.logs.output(task.id, min(request.output_limit, MAX_INLINE_OUTPUT))
            if output is not None:
                status.output, status.output_included = output, True
        return status

    @_status_codes
    def Signal(self, request: pb.SignalRequest, context: Any) -> pb.SignalResponse:
        self.agent.tasks.signal(request.task_id, request.signal)
        return pb.SignalResponse()

    @_status_codes
    def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.TaskStatus:
        grace = request.grace_seconds or 5.0
        return _status_pb(self.agent.tasks.cancel(request.task_id, grace))

    @_status_codes
    def Logs(self, request: pb.LogsRequest, context: Any) -> Iterator[pb.LogChunk]:
        self.agent.tasks.get(request.task_id)
        records = self.agent.logs.read(
            request.task_id,
            tail=max(request.tail, 0),
            follow=request.follow,
            active=context.is_active,
        )
        for r in records:
            yield pb.LogChunk(timestamp_ns=r.time_ns, stream=_STREAM[r.stream], data=r.data)

    @_status_codes
    def Exec(self, request_iterator: Iterator[pb.ExecInput], context: Any) -> Iterator[bytes]:
        metadata = context.invocation_metadata()
        grant = None if self.auth.valid(metadata) else str(dict(metadata).get(GRANT_HEADER, ""))
        yield from exec_stream(self.agent, request_iterator, context, grant)

    @_status_codes
    def PortForward(
        self, request_iterator: Iterator[pb.PortForwardInput], context: Any
    ) -> Iterator[bytes]:
        yield from port_forward_stream(self.agent, request_iterator, context)


# methods whose servicer yields its messages already serialized (see streams.py)
_SERIALIZED_OUTPUT = ("Exec", "PortForward")


class _Handlers:
    """Collects the method handlers the generated code would add to a server."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _add_servicer(servicer: AgentServicer, server: Any) -> None:
    """`add_AgentServicer_to_server`, except that the streams in `_SERIALIZED_OUTPUT` send
    their messages as given (the bytes on the wire are the same)."""
    collected = _Handlers()
    rpc.add_AgentServicer_to_server(servicer, collected)  # type: ignore[no-untyped-call]
    handlers = dict(collected.handlers)
    for name in _SERIALIZED_OUTPUT:
        handlers[name] = grpc.stream_stream_rpc_method_handler(
            handlers[name].stream_stream, request_deserializer=handlers[name].request_deserializer
        )  # no response_serializer: sent as yielded
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(collected.service, handlers),)
    )
    server.add_registered_method_handlers(collected.service, handlers)


# what a gang member's grant opens, to another node's agent: nothing else
GRANT_METHODS = ("/squall.substrate.v1.Agent/Exec",)


def _auth(agent: Agent) -> TokenAuth:
    """The agent token on every call; or, for Exec, a gang member's grant (checked by it)."""
    return TokenAuth(
        agent.config.token,
        "agent token",
        grant_header=GRANT_HEADER,
        grant_methods=GRANT_METHODS,
    )


def create_server(
    agent: Agent,
    address: str = "127.0.0.1:0",
    workers: int = 64,
    tls: ServerTLS | None = None,
) -> tuple[Any, int]:
    """Start serving `agent` on `address`; returns the server and the bound port. With
    `tls`, every caller must show a certificate of the run's CA (see `substrate.tls`)."""
    auth = _auth(agent)
    interceptors: list[Any] = [auth] if tls is None else [PeerRoles(GRANT_METHODS), auth]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-rpc"),
        interceptors=interceptors,
        # the orchestrator pings every 5 s to tell a node that is gone from one whose
        # workers are all busy (pings are the transport's, not the workers')
        options=[
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    _add_servicer(AgentServicer(agent, auth, tls), server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.server_credentials())
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port
