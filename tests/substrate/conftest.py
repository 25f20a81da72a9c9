"""A real agent on loopback, served over gRPC, with the `process` runtime."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.agent import Agent, AgentConfig
from substrate.client import connect
from substrate.inventory import read_inventory
from substrate.runtimes import available
from substrate.server import create_server
from tests.substrate.registry import Registry

TOKEN = "test-token-" + os.urandom(4).hex()


@dataclass
class Running:
    agent: Agent
    address: str
    stub: Any
    data_dir: Path
    shared: pb.Lease | None = None

    def lease(self, cores: int = 1, ttl: float = 60, **kw: Any) -> pb.Lease:
        return self.stub.AcquireLease(
            pb.AcquireLeaseRequest(holder="test", cores=cores, ttl_seconds=ttl, **kw)
        )

    def run(self, command: list[str], lease: pb.Lease | None = None, **kw: Any) -> str:
        """Start a task in `lease`, or in one shared lease of one core (the test machine may
        have only two cores, and a lease holds as many tasks as its holder starts)."""
        if lease is None:
            if self.shared is None:
                self.shared = self.lease()
            lease = self.shared
        kw.setdefault("runtime", "process")
        kw.setdefault("name", "t")
        reply = self.stub.Run(pb.RunRequest(lease_id=lease.id, command=command, **kw))
        return str(reply.task_id)

    def wait(self, task_id: str, timeout: float = 30) -> pb.TaskStatus:
        return self.stub.Wait(pb.WaitRequest(task_id=task_id, timeout_seconds=timeout))

    def logs(self, task_id: str, **kw: Any) -> list[pb.LogChunk]:
        return list(self.stub.Logs(pb.LogsRequest(task_id=task_id, **kw)))


@pytest.fixture
def agent(tmp_path: Path, registry: Registry) -> Iterator[Running]:
    config = AgentConfig(
        data_dir=tmp_path / "agent",
        token=TOKEN,
        lease_check_interval=0.1,
        search_registries=(registry.address,),
        insecure_registries=(registry.address,),
    )
    instance = Agent(config, read_inventory(), available(config.data_dir, config.userns, weak=True))
    instance.start()
    server, port = create_server(instance, "127.0.0.1:0")
    channel, stub = connect(f"127.0.0.1:{port}", TOKEN)
    try:
        yield Running(instance, f"127.0.0.1:{port}", stub, config.data_dir)
    finally:
        channel.close()
        server.stop(grace=None)
        instance.stop()
        # nothing of the agent is left in the cgroup tree
        leftovers = [
            c
            for c in ("cpuset", "memory", "pids")
            if (Path("/sys/fs/cgroup") / c / "squall" / config.agent_id).exists()
        ]
        assert not leftovers, f"cgroups left behind in {leftovers}"


def code_of(call: Any) -> grpc.StatusCode:
    """Run `call` and return the status code it failed with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]
