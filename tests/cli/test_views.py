"""The same run seen through this machine's store and through a server on 127.0.0.1: the local
and the remote backends give equal views of it (the run, the run list, the watched events),
with a real run behind them (agents, containers, an egress), and its placement and transfer
counts as the store holds them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.backends import LocalBackend, RemoteBackend
from cli.contexts import Context
from orchestrator.api import ControlServer, serve
from orchestrator.local_site import LocalSettings, local_engine
from tests.substrate.registry import Registry

TOKEN = "v" * 32
WORKFLOW = """\
version: v4
volumes:
  out:
    use: ephemeral
    egress:
      - {{source: {{uri: file://result.txt}}, destination: {{uri: 'file://{result}'}}}}
jobs:
  write:
    image: {{uri: docker://busybox:1.36}}
    command: [/bin/sh, -c, 'echo a result > /out/result.txt']
    mounts: {{/out: {{volume: out}}}}
  count:
    image: {{uri: docker://busybox:1.36}}
    command: [/bin/true]
    task-array: {{start: 0, end: 2}}
    depends-on: [{{name: write}}]
"""


@pytest.fixture
def backends(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LocalBackend, RemoteBackend, ControlServer]]:
    """A server over this machine's store (in the test's folder), and both ways to read it."""
    monkeypatch.setenv("SQUALL_DATA_DIR", str(tmp_path / "data"))
    for name in ("SQUALL_STORE_URL", "SQUALL_SITES", "SQUALL_POLICY", "SQUALL_CATALOG"):
        monkeypatch.delenv(name, raising=False)
    settings = LocalSettings(
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        egress_dirs=[tmp_path / "out"],
    )
    server, port, servicer = serve(local_engine(settings), "127.0.0.1:0", TOKEN, workers=4)
    try:
        remote = RemoteBackend(Context("t", f"127.0.0.1:{port}", TOKEN))
        yield LocalBackend(), remote, servicer
    finally:
        servicer.shutdown()
        server.stop(None)


def test_the_local_and_the_remote_backend_see_the_same_run(
    backends: tuple[LocalBackend, RemoteBackend, ControlServer], tmp_path: Path
) -> None:
    local, remote, servicer = backends
    result = tmp_path / "out" / "result.txt"
    remote.start("me/views-1", WORKFLOW.format(result=result))
    watched = list(remote.watch("me/views-1"))  # until the run ends
    assert watched[-1][0].state == "FINISHED", watched[-1][0].reason
    assert result.read_text() == "a result\n"
    deadline = time.monotonic() + 30
    while servicer.runs.threads and time.monotonic() < deadline:  # its owner still writes: wait
        time.sleep(0.1)
    seen_remote = [e for _, events in remote.watch("me/views-1") for e in events]
    seen_local = [e for _, events in local.watch("me/views-1") for e in events]
    assert seen_local == seen_remote
    assert [e.id for e in seen_local] == sorted({e.id for e in seen_local})
    run = local.status("me/views-1")
    assert run == remote.status("me/views-1")
    assert local.runs("me/*") == remote.runs("me/*")
    # what was compared holds what a wire can lose: whole numbers in the placement, a
    # 64-bit byte count, task counts, times, empty reasons
    assert run.placement is not None
    assert run.placement["site"] == "local"
    assert any(isinstance(n["cpus"], int) for n in run.placement["nodes"])
    assert [t.bytes_done for t in run.transfers] == [len("a result\n")]
    assert {j.name: j.task_states for j in run.jobs} == {
        "write": {"FINISHED": 1},
        "count": {"FINISHED": 3},
    }
    assert run.finished_at is not None
    assert run.jobs[0].started_at is not None
    # and `-o json` prints the same text either way (2 == 2.0 in Python, not in JSON)
    shown = json.dumps(remote.status("me/views-1").to_json())
    assert shown == json.dumps(run.to_json())
