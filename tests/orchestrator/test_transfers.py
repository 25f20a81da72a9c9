"""Ingress and egress against real servers on loopback: HTTPS (with a certificate made here)
and moto's S3 server. Nothing is mocked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.data import TransferCache, TransferError, TransferPolicy, fetch, push
from tests.orchestrator.servers import FileServer, S3Server

BIG = os.urandom(3 * 2**20 + 17)
FAST = TransferPolicy(attempts=3, backoff=0.01)


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


def test_https_download_with_progress_and_size(web: FileServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "vol" / "in" / "data.bin"
    fetch(
        f"{web.url}/data.bin",
        dest,
        ca_file=web.ca_file,
        policy=FAST,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert dest.read_bytes() == BIG
    assert seen[-1] == (len(BIG), len(BIG))


def test_an_untrusted_certificate_is_refused(web: FileServer, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(f"{web.url}/small.txt", tmp_path / "x", policy=FAST)


def test_an_interrupted_download_resumes(web: FileServer, tmp_path: Path) -> None:
    web.cut_next = 1
    dest = tmp_path / "data.bin"
    fetch(f"{web.url}/data.bin", dest, ca_file=web.ca_file, policy=FAST)
    assert dest.read_bytes() == BIG
    [(_, first_range), (_, resumed)] = web.gets
    assert first_range == ""
    assert resumed.startswith("bytes=")
    assert int(resumed[6:-1]) > 0  # asked for the rest only


def test_server_errors_are_retried_then_reported(web: FileServer, tmp_path: Path) -> None:
    web.fail_next = 2
    fetch(f"{web.url}/small.txt", tmp_path / "a", ca_file=web.ca_file, policy=FAST)
    assert (tmp_path / "a").read_bytes() == b"hello\n"
    web.fail_next = 5
    with pytest.raises(TransferError, match=r"500.*after 3 attempts"):
        fetch(f"{web.url}/small.txt", tmp_path / "b", ca_file=web.ca_file, policy=FAST)
    with pytest.raises(TransferError, match="404"):
        fetch(f"{web.url}/missing", tmp_path / "c", ca_file=web.ca_file, policy=FAST)


def test_the_cache_serves_a_second_run(web: FileServer, tmp_path: Path) -> None:
    cache = TransferCache(tmp_path / "cache")
    url = f"{web.url}/data.bin"
    assert not fetch(url, tmp_path / "run1", ca_file=web.ca_file, cache=cache, policy=FAST)
    assert fetch(url, tmp_path / "run2", ca_file=web.ca_file, cache=cache, policy=FAST)
    assert (tmp_path / "run2").read_bytes() == BIG
    assert len(web.gets) == 1  # the second run only asked for the version (HEAD)
    web.files["data.bin"] = b"new content"  # a new version is fetched again
    assert not fetch(url, tmp_path / "run3", ca_file=web.ca_file, cache=cache, policy=FAST)
    assert (tmp_path / "run3").read_bytes() == b"new content"


def test_a_caller_may_put_into_the_cache_later(web: FileServer, tmp_path: Path) -> None:
    cache = TransferCache(tmp_path / "cache")
    url = f"{web.url}/data.bin"
    versions: list[str] = []
    fetch(url, tmp_path / "d", ca_file=web.ca_file, cache=cache, put_later=versions.append)
    assert not list((tmp_path / "cache").iterdir())  # the caller copies it in, later
    [version] = versions
    assert cache.put(url, version, tmp_path / "d")
    assert fetch(url, tmp_path / "again", ca_file=web.ca_file, cache=cache, policy=FAST)


def test_a_copy_of_a_file_that_changed_meanwhile_is_not_kept(tmp_path: Path) -> None:
    cache = TransferCache(tmp_path / "cache")
    (tmp_path / "f").write_bytes(b"placed")
    assert not cache.put("s3://b/k", "v1", tmp_path / "f", unchanged=lambda: False)
    assert cache.get("s3://b/k", "v1") is None
    assert not list((tmp_path / "cache").iterdir())  # nor its half
    assert cache.put("s3://b/k", "v1", tmp_path / "f", unchanged=lambda: True)
    assert cache.get("s3://b/k", "v1") is not None


def test_what_dead_writers_left_half_written_goes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    dead = root / f"{'a' * 64}.{2**31 - 1}-0bad.tmp"  # beyond any pid
    live = root / f"{'b' * 64}.{os.getpid()}-0bad.tmp"  # another agent putting it now
    for tmp in (dead, live):
        tmp.write_bytes(b"half")
    TransferCache(root)
    assert not dead.exists()
    assert live.exists()


def test_inline_files(tmp_path: Path) -> None:
    fetch("file://params.csv", tmp_path / "p.csv", files={"params.csv": "x,42\n"})
    assert (tmp_path / "p.csv").read_text() == "x,42\n"
    with pytest.raises(TransferError, match="no file 'other'"):
        fetch("file://other", tmp_path / "o", files={})


def test_s3_egress_then_ingress(s3: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "out.bin"
    src.write_bytes(BIG)
    done: list[int] = []
    push(
        src,
        "s3://results/run-1/out.bin",
        credentials=s3.credentials,
        policy=FAST,
        progress=lambda d, t: done.append(d),
    )
    assert done[-1] == len(BIG)
    body = s3.client().get_object(Bucket="results", Key="run-1/out.bin")["Body"].read()
    assert body == BIG
    back = tmp_path / "back.bin"
    fetch("s3://results/run-1/out.bin", back, credentials=s3.credentials, policy=FAST)
    assert back.read_bytes() == BIG


def test_s3_failures_are_clear(s3: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(TransferError, match="NoSuchBucket"):
        push(src, "s3://no-such-bucket/k", credentials=s3.credentials, policy=FAST)
    with pytest.raises(TransferError, match=r"404|Not Found"):
        fetch("s3://results/missing", tmp_path / "m", credentials=s3.credentials, policy=FAST)
    with pytest.raises(TransferError, match="does not exist in the volume"):
        push(tmp_path / "absent", "s3://results/k", credentials=s3.credentials)
    with pytest.raises(TransferError, match="s3://BUCKET/KEY"):
        push(src, "s3://results", credentials=s3.credentials)


def test_local_egress_and_a_time_limit(tmp_path: Path, web: FileServer) -> None:
    src = tmp_path / "result.txt"
    src.write_text("42\n")
    push(src, f"file://{tmp_path}/out/result.txt")
    assert (tmp_path / "out" / "result.txt").read_text() == "42\n"
    web.fail_next = 100
    slow = TransferPolicy(timeout=0.3, attempts=100, backoff=0.05)
    with pytest.raises(TransferError, match=r"timed out after 0\.3s"):
        fetch(f"{web.url}/small.txt", tmp_path / "t", ca_file=web.ca_file, policy=slow)
