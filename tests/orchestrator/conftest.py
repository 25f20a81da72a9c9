"""A real PostgreSQL server for store tests, started in a temporary folder on 127.0.0.1."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.engine import Engine
from orchestrator.fuzzfile import Workflow
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.store import Store
from tests.substrate.registry import Registry, free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, "install PostgreSQL (scripts/setup.sh --test does, as root)"
    return found[-1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    # not under pytest's temporary folders: those are private to root, and PostgreSQL runs
    # as its own user
    base = Path(tempfile.mkdtemp(prefix="squall-pg-"))
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    shutil.chown(base, "postgres")
    shutil.chown(sockets, "postgres")
    port = free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)

    as_postgres(_bin("initdb"), "-D", str(data), "-U", "squall", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}"
    as_postgres(
        _bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"
    )
    try:
        yield f"postgresql+psycopg://squall@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'squall.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def engine(tmp_path: Path, registry: Registry) -> Engine:
    """The engine on the local site: one real agent process on both CPUs, images from the
    session's registry, the store on SQLite in the test's folder."""
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    provisioner = LocalProvisioner(
        tmp_path / "site",
        search_registries=[registry.address],
        insecure_registries=[registry.address],
    )

    def one_node(_: Workflow) -> list[NodeSlice]:
        return [NodeSlice(cpus=(0, 1), memory_bytes=2**30)]

    return Engine(store, provisioner, one_node, data_dir=tmp_path / "data")
