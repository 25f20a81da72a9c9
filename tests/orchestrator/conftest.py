"""A real PostgreSQL server for store tests, started in a temporary folder on 127.0.0.1."""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.data.staging import volume_roots
from orchestrator.engine import Engine
from orchestrator.fuzzfile import Workflow
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.store import Store
from scripts import mpi_image
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


MakeEngine = Callable[..., Engine]


@pytest.fixture
def make_engine(tmp_path: Path, registry: Registry) -> MakeEngine:
    """Engines on the local site: real agent processes (`nodes` of them, sharing this
    machine's two CPUs), images from the session's registry, the store on SQLite in the
    test's folder."""

    def make(nodes: int = 1, ca_file: str | None = None) -> Engine:
        store = Store(f"sqlite:///{tmp_path / 'squall.db'}")

        def cluster(_: Workflow) -> list[NodeSlice]:
            # oversubscribed on purpose: more tasks can run at once than there are cores
            return [NodeSlice(cpus=(0, 1), memory_bytes=2**30) for _ in range(nodes)]

        provisioner = LocalProvisioner(
            tmp_path / "site",
            nodes=cluster,
            search_registries=[registry.address],
            insecure_registries=[registry.address],
            volume_roots=functools.partial(volume_roots, tmp_path / "data"),
        )
        return Engine(store, [provisioner], data_dir=tmp_path / "data", ca_file=ca_file)

    return make


@pytest.fixture
def engine(make_engine: MakeEngine) -> Engine:
    """One engine of one node."""
    return make_engine()


@pytest.fixture
def cluster_of(tmp_path: Path, registry: Registry) -> Callable[..., Engine]:
    """Engines whose local clusters have `n` separate nodes (network namespaces, hostnames)
    of one CPU each, taken in turn, and `memory` bytes each; images from the session's
    registry."""

    def make(n: int, memory: int = 256 * 2**20) -> Engine:
        cpus = os.cpu_count() or 1
        nodes = [NodeSlice(cpus=(i % cpus,), memory_bytes=memory) for i in range(n)]
        provisioner = LocalProvisioner(
            tmp_path / "site",
            nodes=lambda _: nodes,
            search_registries=[registry.address],
            insecure_registries=[registry.address],
            namespaced=True,
            volume_roots=functools.partial(volume_roots, tmp_path / "data"),
        )
        store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
        return Engine(store, [provisioner], data_dir=tmp_path / "data")

    return make


@pytest.fixture(scope="session")
def mpi(
    registry: Registry, pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The MPI image's reference in the session's registry (built once per pytest cache)."""
    cache_provider = getattr(pytestconfig, "cache", None)  # none under -p no:cacheprovider
    cache = (
        Path(cache_provider.mkdir("squall-images"))
        if cache_provider is not None
        else tmp_path_factory.mktemp("squall-images")
    )
    layout = mpi_image.build(cache)
    registry.push(layout, mpi_image.TAG, f"{mpi_image.NAME}:{mpi_image.TAG}")
    return f"docker://{registry.address}/{mpi_image.NAME}:{mpi_image.TAG}"
