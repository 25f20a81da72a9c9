"""The agent moves the data: MakeVolume, Transfer and ReadFile through a real agent's gRPC
server on loopback, against a real HTTPS server (a certificate made here) and moto's S3
server (tests/orchestrator/servers.py). Nothing is mocked.

The agent logs as `python -m substrate` does (INFO and up, every logger), into a file each
test can read: credentials must never reach it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.agent import Agent, AgentConfig
from substrate.client import connect
from substrate.inventory import read_inventory
from substrate.server import create_server
from tests.orchestrator.servers import FileServer, S3Server
from tests.substrate.conftest import TOKEN, code_of

BIG = os.urandom(3 * 2**20 + 17)
INGRESS, EGRESS = pb.DIRECTION_INGRESS, pb.DIRECTION_EGRESS


@dataclass
class DataAgent:
    stub: Any
    root: Path  # its volume root
    data_dir: Path
    log: Path

    def volume(self, name: str = "vol", size: int = 0) -> Path:
        path = self.root / "runs" / "r1" / name
        self.stub.MakeVolume(pb.MakeVolumeRequest(path=str(path), size_bytes=size))
        return path

    def transfer(self, **kw: Any) -> list[pb.TransferProgress]:
        kw.setdefault("direction", INGRESS)
        kw["volume"] = str(kw["volume"])
        return list(self.stub.Transfer(pb.TransferRequest(**kw)))

    def read(self, volume: Path, path: str) -> list[pb.FileChunk]:
        return list(self.stub.ReadFile(pb.ReadFileRequest(volume=str(volume), path=path)))

    def staged(self) -> list[str]:
        """What waits in the agent's private staging folder (nothing, between transfers)."""
        folder = self.data_dir / "transfers"
        return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., DataAgent]]:
    """Start agents (data calls only: no runtime, no pod network); stopped at the end."""
    stops: list[Callable[[], None]] = []
    log = tmp_path / "agent.log"
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s substrate %(levelname)s %(message)s"))
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)

    def start(name: str = "agent", roots: tuple[Path, ...] | None = None) -> DataAgent:
        root = tmp_path / f"{name}-volumes"
        root.mkdir()
        config = AgentConfig(
            data_dir=tmp_path / name,
            token=TOKEN,
            pod_network=False,
            volume_roots=(root,) if roots is None else roots,
            cache_dir=tmp_path / "ingress-cache",  # shared by this test's agents
        )
        agent = Agent(config, read_inventory(), {})
        agent.start()
        server, port = create_server(agent, "127.0.0.1:0")
        channel, stub = connect(f"127.0.0.1:{port}", TOKEN)

        def stop() -> None:
            channel.close()
            server.stop(grace=None)
            agent.stop()

        stops.append(stop)
        return DataAgent(stub, root, config.data_dir, log)

    try:
        yield start
    finally:
        for stop in stops:
            stop()
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
        handler.close()


@pytest.fixture
def node(start_agent: Callable[..., DataAgent]) -> DataAgent:
    return start_agent()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[FileServer]:
    server = FileServer(tmp_path, {"data.bin": BIG, "small.txt": b"hello\n"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.client().create_bucket(Bucket="results")
    yield server
    server.stop()


def pem(web: FileServer) -> str:
    """The HTTPS server's CA certificate, as a request carries it (no file on the agent)."""
    return Path(web.ca_file).read_text()


def failure(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_https_ingress_streams_progress_and_checks_the_size(
    node: DataAgent, web: FileServer
) -> None:
    volume = node.volume()
    assert volume.is_dir()
    assert volume.stat().st_mode & 0o777 == 0o755
    messages = node.transfer(
        volume=volume, path="in/data.bin", uri=f"{web.url}/data.bin", ca_pem=pem(web)
    )
    assert (volume / "in" / "data.bin").read_bytes() == BIG
    *moving, last = messages
    assert last.done
    assert not last.cached
    assert (last.bytes_done, last.bytes_total) == (len(BIG), len(BIG))
    assert moving, "no progress before the end"
    assert all(m.bytes_total == len(BIG) and not m.done for m in moving)
    done = [m.bytes_done for m in moving]
    assert done == sorted(done)
    assert done[-1] <= len(BIG)
    assert node.staged() == []
    # the CA comes with the request: without it, the server's certificate is not trusted
    code, details = failure(
        lambda: node.transfer(volume=volume, path="x", uri=f"{web.url}/small.txt", attempts=1)
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith(f"{web.url}/small.txt: ")
    assert "CERTIFICATE_VERIFY_FAILED" in details
    assert "(after 1 attempts)" in details
    assert not (volume / "x").exists()


def test_an_interrupted_download_resumes(node: DataAgent, web: FileServer) -> None:
    volume = node.volume()
    web.cut_next = 1
    last = node.transfer(
        volume=volume, path="data.bin", uri=f"{web.url}/data.bin", ca_pem=pem(web)
    )[-1]
    assert last.done
    assert last.bytes_done == len(BIG)
    assert (volume / "data.bin").read_bytes() == BIG
    [(_, first_range), (_, resumed)] = web.gets
    assert first_range == ""
    assert resumed.startswith("bytes=")
    assert int(resumed[6:-1]) > 0
    assert node.staged() == []


def cached_files(cache: Path, count: int) -> list[Path]:
    """The cache's files, once it holds `count` (an agent copies a download into its cache
    after the transfer has ended)."""
    deadline = time.monotonic() + 30
    while True:
        files = [f for f in cache.iterdir() if not f.name.endswith(".tmp")]
        if len(files) >= count or time.monotonic() > deadline:
            return files
        time.sleep(0.02)


def test_the_ingress_cache_answers_a_second_ingress(
    start_agent: Callable[..., DataAgent], web: FileServer, tmp_path: Path
) -> None:
    first, second = start_agent("a"), start_agent("b")  # two agents of one machine
    url = f"{web.url}/data.bin"
    one, two = first.volume("one"), second.volume("two")
    # a run's own volume, before its jobs: the copy into the cache comes after the answer
    done = first.transfer(volume=one, path="d", uri=url, ca_pem=pem(web), private_volume=True)
    assert not done[-1].cached
    [kept] = cached_files(tmp_path / "ingress-cache", 1)
    assert kept.read_bytes() == BIG
    last = second.transfer(volume=two, path="d", uri=url, ca_pem=pem(web))[-1]
    assert last.done
    assert last.cached
    assert last.bytes_done == len(BIG)
    assert (two / "d").read_bytes() == BIG
    assert len(web.gets) == 1  # the second only asked for the version (HEAD)
    web.files["data.bin"] = b"new content"  # a new version is fetched again
    assert not second.transfer(volume=two, path="d", uri=url, ca_pem=pem(web))[-1].cached
    assert (two / "d").read_bytes() == b"new content"


def test_s3_ingress_and_egress_with_the_requests_credentials(
    node: DataAgent, s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the agent's environment holds no AWS credentials, nor any file boto3 would read
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path))
    secret = {
        "accessKeyId": "AKIDSQUALL" + os.urandom(5).hex().upper(),
        "secretAccessKey": "secret-" + os.urandom(12).hex(),
        "sessionToken": "token-" + os.urandom(12).hex(),
    }
    credentials = {"endpoint": s3.endpoint, "region": "us-east-1", **secret}
    volume = node.volume()
    (volume / "out.bin").write_bytes(BIG)
    uri = "s3://results/run-1/out.bin"

    # without the keys, the agent has none: the calls below used the request's
    code, details = failure(
        lambda: node.transfer(
            direction=EGRESS,
            volume=volume,
            path="out.bin",
            uri=uri,
            credentials={"endpoint": s3.endpoint, "region": "us-east-1"},
            attempts=1,
        )
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == f"{uri}: Unable to locate credentials (after 1 attempts)"

    messages = node.transfer(
        direction=EGRESS, volume=volume, path="out.bin", uri=uri, credentials=credentials
    )
    assert messages[-1].done
    assert messages[-1].bytes_done == len(BIG)
    assert messages[-1].bytes_total == len(BIG)
    body = s3.client().get_object(Bucket="results", Key="run-1/out.bin")["Body"].read()
    assert body == BIG

    last = node.transfer(volume=volume, path="back/in.bin", uri=uri, credentials=credentials)[-1]
    assert last.done
    assert not last.cached
    assert (volume / "back" / "in.bin").read_bytes() == BIG
    code, details = failure(
        lambda: node.transfer(
            volume=volume, path="m", uri="s3://results/missing", credentials=credentials
        )
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "(after 3 attempts)" in details

    log = node.log.read_text()
    assert f"egress {uri} <- {volume}:out.bin: done" in log  # the log is the agent's
    for value in secret.values():
        assert value not in log
    for stored in node.data_dir.rglob("*"):
        if stored.is_file():
            assert not any(v.encode() in stored.read_bytes() for v in secret.values()), stored


def test_into_a_volume_others_may_write_the_cache_copy_is_made_before_the_answer(
    start_agent: Callable[..., DataAgent], web: FileServer, tmp_path: Path
) -> None:
    """A persistent volume, which another run's jobs may be writing: the cache gets the
    agent's private download, before the file is placed where a job could change it."""
    node = start_agent("a")
    volume = node.volume("shared")
    url = f"{web.url}/data.bin"
    assert not node.transfer(volume=volume, path="d", uri=url, ca_pem=pem(web))[-1].cached
    [kept] = (tmp_path / "ingress-cache").iterdir()  # there already, not later
    assert kept.read_bytes() == BIG


def test_inline_file_ingress(node: DataAgent) -> None:
    volume = node.volume()
    last = node.transfer(
        volume=volume, path="params.csv", uri="file://params.csv", content=b"x,42\n"
    )[-1]
    assert last.done
    assert (last.bytes_done, last.bytes_total) == (5, 5)
    assert (volume / "params.csv").read_bytes() == b"x,42\n"
    node.transfer(volume=volume, path="empty", uri="file://empty")
    assert (volume / "empty").read_bytes() == b""


def test_read_file_streams_a_file_and_refuses_what_is_not_one(
    node: DataAgent, tmp_path: Path
) -> None:
    volume = node.volume()
    (volume / "out").mkdir()
    (volume / "out" / "result.bin").write_bytes(BIG)
    chunks = node.read(volume, "out/result.bin")
    assert chunks[0].size == len(BIG)
    assert len(chunks) > 1
    assert b"".join(c.data for c in chunks) == BIG
    (volume / "empty").write_bytes(b"")
    [only] = node.read(volume, "empty")
    assert (only.size, only.data) == (0, b"")

    secret = tmp_path / "host-secret"
    secret.write_text("the host's")
    (volume / "link").symlink_to(secret)
    (volume / "dir").symlink_to(tmp_path)
    os.mkfifo(volume / "fifo")
    for path in ("link", "dir/host-secret", "fifo", "out"):
        code, details = failure(lambda path=path: node.read(volume, path))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, path
        assert "refused" in details
    assert failure(lambda: node.read(volume, "absent"))[0] == grpc.StatusCode.NOT_FOUND
    # and egress of a link is refused as well, before anything is sent
    code, details = failure(
        lambda: node.transfer(direction=EGRESS, volume=volume, path="link", uri="s3://b/k")
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == "s3://b/k: refused: 'link' in the volume is a link"


def test_paths_outside_the_roots_dotdot_and_links_are_refused(
    start_agent: Callable[..., DataAgent], web: FileServer, tmp_path: Path
) -> None:
    node = start_agent()
    volume = node.volume()
    outside = tmp_path / "outside"
    outside.mkdir()
    url = f"{web.url}/small.txt"

    def ingress(volume: Path | str, path: str) -> tuple[grpc.StatusCode, str]:
        return failure(lambda: node.transfer(volume=volume, path=path, uri=url, ca_pem=pem(web)))

    refused = {
        "outside the roots": (outside, "x"),
        "the root itself": (node.root, "x"),
        "relative volume": ("runs/r1/vol", "x"),
        "'..' in the volume": (f"{volume}/../../../../outside", "x"),
        "'..' in the path": (volume, "../../outside/x"),
        "absolute path": (volume, str(outside / "x")),
        "no path": (volume, ""),
    }
    for why, (vol, path) in refused.items():
        code, details = ingress(vol, path)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (why, details)
    code, details = failure(
        lambda: node.stub.MakeVolume(pb.MakeVolumeRequest(path=str(outside / "v")))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not beneath this agent's volume roots" in details
    code, details = ingress(node.root / "runs" / "r1" / "nothing", "x")
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no volume" in details

    # links a job planted in its volume: on the way to the file, or as the volume itself
    (volume / "in").symlink_to(outside)
    code, details = ingress(volume, "in/x")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        details
        == f"{url}: cannot write in/x in the volume: 'in' goes through a link or out of the volume"
    )
    (node.root / "runs" / "r1" / "linked").symlink_to(outside)
    code, details = ingress(node.root / "runs" / "r1" / "linked", "x")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = failure(
        lambda: node.stub.MakeVolume(
            pb.MakeVolumeRequest(path=str(node.root / "runs" / "r1" / "linked" / "v"))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    (volume / "d").mkdir()
    code, details = ingress(volume, "d")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is a directory" in details

    assert os.listdir(outside) == []  # nothing was written out of the volume
    assert web.gets == []  # nor fetched: every refusal came first
    assert node.staged() == []

    # a link at the file's own name is replaced, never written through
    (volume / "file").symlink_to(outside / "target")
    node.transfer(volume=volume, path="file", uri=url, ca_pem=pem(web))
    assert (volume / "file").read_bytes() == b"hello\n"
    assert not (volume / "file").is_symlink()
    assert os.listdir(outside) == []

    bare = start_agent("bare", roots=())
    for call in (
        lambda: bare.stub.MakeVolume(pb.MakeVolumeRequest(path=str(volume))),
        lambda: bare.transfer(volume=volume, path="x", uri=url),
        lambda: bare.read(volume, "file"),
    ):
        assert failure(call) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "this agent has no volume root",
        )


def test_a_failing_source_is_retried_then_reported_with_the_count(
    node: DataAgent, web: FileServer
) -> None:
    volume = node.volume()
    url = f"{web.url}/small.txt"
    web.fail_next = 2
    node.transfer(volume=volume, path="a", uri=url, ca_pem=pem(web))
    assert (volume / "a").read_bytes() == b"hello\n"
    web.fail_next = 5
    web.files["fresh.txt"] = b"not in the cache\n"
    url = f"{web.url}/fresh.txt"
    code, details = failure(
        lambda: node.transfer(volume=volume, path="b", uri=url, ca_pem=pem(web), attempts=2)
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith(f"{url}: Server error '500 try again'")
    assert details.endswith("(after 2 attempts)")
    assert not (volume / "b").exists()
    assert node.staged() == []
    code, details = failure(
        lambda: node.transfer(volume=volume, path="c", uri="ftp://x/y", ca_pem=pem(web))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no ingress for this scheme" in details
    code, details = failure(
        lambda: node.transfer(direction=EGRESS, volume=volume, path="a", uri="s3://bucket")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "s3://BUCKET/KEY" in details
    assert (
        code_of(
            lambda: node.transfer(
                direction=EGRESS, volume=volume, path="a", uri=f"file://{volume}/z"
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_make_volume_checks_the_room_it_asks_for(node: DataAgent) -> None:
    disk = shutil.disk_usage(node.root)
    volume = node.volume("fits", size=2**20)
    assert volume.is_dir()
    again = node.stub.MakeVolume(pb.MakeVolumeRequest(path=str(volume), size_bytes=2**20))
    assert 0 < again.free_bytes <= disk.total
    beyond = node.root / "runs" / "r1" / "huge"
    code, details = failure(
        lambda: node.stub.MakeVolume(
            pb.MakeVolumeRequest(path=str(beyond), size_bytes=disk.total * 2)
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith(f"volume {beyond} asks for ")
    assert not beyond.exists()  # refused: not left behind
