"""The run loop's calls to its cluster's agents: every one made from one thread that runs an
asyncio loop, so that no call blocks the run loop and no thread is spent per task.

The run loop asks for work (`lease`, `run`, `cancel`, ...) and names a function that gets the
outcome; that function runs in this module's thread and only posts a message to the run
loop's inbox. A task's life on its node is one coroutine: start it, wait for its end, copy
its output into the run's log folder, give its lease back, and only then report the end, so
that the orchestrator counts a node's room as free only once the agent does too. Two calls
a task are saved: the agent releases the lease as the task ends (`release_lease_at_end`,
before Wait answers), and a short output comes in the Wait reply itself (`output_limit`).
The output kept has the values of the run's secrets masked (`redactor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from api.substrate.v1 import agent_pb2 as pb
from api.substrate.v1 import agent_pb2_grpc as rpc
from substrate.tls import NODE_NAME

from .provision import AgentEndpoint, Cluster
from .redaction import Redactor

__all__ = ["ClusterIO", "Outcome"]

T = TypeVar("T")
# an ended task's output up to this size comes in its Wait reply; longer, it is streamed (Logs)
OUTPUT_INLINE = 64 * 1024
Outcome = Callable[[Any], None]  # gets a reply, or the grpc.RpcError that refused the call
# what a call to an agent that is gone (or cut off) fails with
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
SLOW_FACTOR = 6  # an agent that answers pings but not Health is lost after this many times


class ClusterIO:
    """Channels to the agents of `cluster` (by node index), served by one asyncio thread;
    `redactor` masks secret values in the task logs it keeps."""

    def __init__(self, cluster: Cluster, redactor: Redactor | None = None) -> None:
        self.redactor = redactor or Redactor()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agents", daemon=True)
        self.thread.start()
        self.tokens = [(("authorization", f"Bearer {a.token}"),) for a in cluster.agents]
        self.stubs: list[rpc.AgentStub] = self.wait(self._connect(cluster.agents))
        self.tasks: set[asyncio.Task[None]] = set()
        self.generation = [0] * len(cluster.agents)  # a node's, up by one when it is replaced

    async def _connect(self, agents: Sequence[AgentEndpoint]) -> list[rpc.AgentStub]:
        self.channels = [_channel(a) for a in agents]
        return [rpc.AgentStub(c) for c in self.channels]  # type: ignore[no-untyped-call]

    # ---- from the run loop's thread ------------------------------------------------------

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` in the I/O thread and wait for its result (start-up only)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def call_now(self, node: int, method: str, request: Any) -> Any:
        """Call `method` on `node`'s agent and wait for the reply (start-up, rare cases)."""
        return self.wait(self._call(node, method, request))

    def unary(self, node: int, method: str, request: Any, then: Outcome | None = None) -> None:
        """Call `method` on `node`'s agent; `then` gets the reply or the error."""
        self._spawn(self._unary(node, method, request, then))

    def life(
        self,
        node: int,
        request: pb.RunRequest,
        lease_id: str,
        log: Path,
        *,
        started: Outcome,
        ended: Outcome,
    ) -> None:
        """Run a task on `node` in lease `lease_id`: `started` gets the RunResponse (or the
        error, and then nothing more happens), `ended` its TaskStatus (or the error that lost
        it) once its output is in `log` and its lease is given back."""
        self._spawn(self._life(node, request, lease_id, log, started, ended))

    def watch(
        self,
        every: float,
        lost_after: float,
        lost: Callable[[int, str], None],
        nodes: Iterable[int] | None = None,
    ) -> None:
        """Ask every agent (of `nodes`) how it is each `every` seconds; `lost(node, why)`,
        once, when one has not answered for `lost_after` seconds (its node is gone:
        preempted, crashed, cut off), or says the cloud is taking its node back."""
        for node in range(len(self.stubs)) if nodes is None else nodes:
            self._spawn(self._watch(node, every, lost_after, lost))

    def reconnect(self, node: int, agent: AgentEndpoint) -> None:
        """Talk to `agent` as node `node` from now on (a replacement for a lost one)."""
        self.wait(self._reconnect(node, agent))

    def renew(self, leases: Iterable[tuple[int, str]], ttl: float) -> Future[None]:
        """Renew leases (node, lease id); those that ended meanwhile are skipped."""
        return asyncio.run_coroutine_threadsafe(self._renew(list(leases), ttl), self.loop)

    def close(self) -> None:
        """Cancel what is still in flight, close the channels and stop the thread."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.wait(self._close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    # ---- in the I/O thread ---------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        def start() -> None:
            task = self.loop.create_task(coroutine)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        self.loop.call_soon_threadsafe(start)

    async def _call(self, node: int, method: str, request: Any, **options: Any) -> Any:
        return await getattr(self.stubs[node], method)(
            request, metadata=self.tokens[node], **options
        )

    async def _unary(self, node: int, method: str, request: Any, then: Outcome | None) -> None:
        try:
            reply: Any = await self._call(node, method, request)
        except grpc.RpcError as exc:
            reply = exc
        if then is not None:
            then(reply)

    async def _life(
        self,
        node: int,
        request: pb.RunRequest,
        lease_id: str,
        log: Path,
        started: Outcome,
        ended: Outcome,
    ) -> None:
        request.release_lease_at_end = True
        try:
            reply = await self._call(node, "Run", request)
        except grpc.RpcError as exc:
            await self._release(node, lease_id)
            started(exc)
            return
        started(reply)
        wait = pb.WaitRequest(task_id=reply.task_id, output_limit=OUTPUT_INLINE)
        generation = self.generation[node]
        while True:
            try:
                status: Any = await self._call(node, "Wait", wait)
            except grpc.RpcError as exc:
                # the agent cannot be reached: ask again until it answers, or until the
                # watch says the node is lost (the run loop then ends the task itself)
                if exc.code() in _UNREACHABLE and self.generation[node] == generation:
                    await asyncio.sleep(1.0)
                    continue
                status = exc
            break
        if isinstance(status, pb.TaskStatus) and status.output_included:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_bytes(self.redactor.data(status.output))
            status.ClearField("output")
        else:
            await self._keep_log(node, reply.task_id, log)
        if not (isinstance(status, pb.TaskStatus) and status.lease_released):
            await self._release(node, lease_id)
        ended(status)

    async def _watch(
        self, node: int, every: float, lost_after: float, lost: Callable[[int, str], None]
    ) -> None:
        generation = self.generation[node]
        last = self.loop.time()
        while self.generation[node] == generation:
            try:
                health = await self._call(node, "Health", pb.HealthRequest(), timeout=lost_after)
                last = self.loop.time()
                if health.interruption and self.generation[node] == generation:
                    lost(node, f"the cloud takes it back ({health.interruption[:200]})")
                    return
            except grpc.RpcError as exc:
                if self.generation[node] != generation:
                    return
                # unreachable: lost after `lost_after`; answering pings but too busy to
                # answer Health in time (every worker waits on a task): only far later
                slow = exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                if self.loop.time() - last >= lost_after * (SLOW_FACTOR if slow else 1):
                    why = " ".join((exc.details() or exc.code().name).split())[:200]
                    lost(node, f"its agent did not answer for {lost_after:g}s ({why})")
                    return
            await asyncio.sleep(every)

    async def _reconnect(self, node: int, agent: AgentEndpoint) -> None:
        self.generation[node] += 1
        old = self.channels[node]
        self.channels[node] = _channel(agent)
        self.stubs[node] = rpc.AgentStub(self.channels[node])  # type: ignore[no-untyped-call]
        self.tokens[node] = (("authorization", f"Bearer {agent.token}"),)
        await old.close()

    async def _keep_log(self, node: int, task_id: str, path: Path) -> None:
        """Copy an ended task's output off its agent (before its node may go away), its
        secret values masked."""
        path.parent.mkdir(parents=True, exist_ok=True)
        masker = self.redactor.masker()
        with open(path, "wb") as out:
            with contextlib.suppress(grpc.RpcError):
                stream = self.stubs[node].Logs(
                    pb.LogsRequest(task_id=task_id), metadata=self.tokens[node]
                )
                async for chunk in stream:
                    out.write(masker.feed(chunk.data))
            out.write(masker.end())

    async def _release(self, node: int, lease_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):  # expired, or gone with the agent
            await self._call(node, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id))

    async def _renew(self, leases: list[tuple[int, str]], ttl: float) -> None:
        for node, lease_id in leases:
            with contextlib.suppress(grpc.RpcError):  # ended meanwhile; its end is on the way
                await self._call(
                    node, "RenewLease", pb.RenewLeaseRequest(lease_id=lease_id, ttl_seconds=ttl)
                )

    async def _close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


# HTTP/2 pings every 5 s: a node that vanished (no reset ever comes) fails its calls with
# UNAVAILABLE within seconds, and an agent whose workers are all busy still answers them
_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def _channel(agent: AgentEndpoint) -> grpc.aio.Channel:
    if agent.tls is None:
        return grpc.aio.insecure_channel(agent.address, options=_KEEPALIVE)
    return grpc.aio.secure_channel(
        agent.address,
        agent.tls.credentials(),
        options=(("grpc.ssl_target_name_override", NODE_NAME), *_KEEPALIVE),
    )
