"""The local site, the embedded default: an engine whose clusters are agent processes on this
machine, with Squall's state, volumes and secrets in the user's data directory.

Settings come from the environment (flags in the CLI override them):

- `SQUALL_DATA_DIR`: state, volumes, logs, secrets (default `$XDG_DATA_HOME/squall`)
- `SQUALL_STORE_URL`: the store (default SQLite in the data directory; PostgreSQL by URL)
- `SQUALL_SEARCH_REGISTRIES`, `SQUALL_INSECURE_REGISTRIES`: comma-separated registries for
  unqualified image names, and those reached over plain HTTP (a registry on this machine)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from substrate.inventory import read_cpus, read_gpus, read_memory_bytes

from .engine import Engine
from .errors import InvalidInput
from .fuzzfile import Workflow
from .placing import Placer
from .provision import LocalProvisioner, NodeSlice
from .secrets import SecretStore
from .store import Store

__all__ = ["LocalSettings", "local_engine", "local_nodes"]

MEMORY_SHARE = 0.9  # of this machine's memory, the rest left to the system


def _data_dir() -> Path:
    if os.environ.get("SQUALL_DATA_DIR"):
        return Path(os.environ["SQUALL_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "squall"


def _list(name: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


@dataclass(slots=True)
class LocalSettings:
    data_dir: Path = field(default_factory=_data_dir)
    store_url: str = field(default_factory=lambda: os.environ.get("SQUALL_STORE_URL", ""))
    search_registries: Sequence[str] = field(
        default_factory=lambda: _list("SQUALL_SEARCH_REGISTRIES")
    )
    insecure_registries: Sequence[str] = field(
        default_factory=lambda: _list("SQUALL_INSECURE_REGISTRIES")
    )
    nodes: int = 1  # agents; more than one shares the machine's CPUs (oversubscribed)
    site: str | None = None  # force a site (`--site local`); None: federation decides

    def store(self) -> Store:
        return Store(self.store_url or f"sqlite:///{self.data_dir / 'squall.db'}")


def local_nodes(wf: Workflow, nodes: int = 1) -> list[NodeSlice]:
    """`nodes` agents that each may lease the whole machine (more than one oversubscribes
    it), after checking that every job and service fits on it at all."""
    cpus = read_cpus()
    cores = len({(c.socket, c.core) for c in cpus})
    memory = int(read_memory_bytes() * MEMORY_SHARE)
    gpus = tuple(g.index for g in read_gpus())
    for name, c in wf.containers.items():
        r = c.resource
        needs = []
        if r.cores > cores:
            needs.append(f"{r.cores} cores (this machine has {cores})")
        if (r.memory_per_node or 0) > memory:
            needs.append(f"{r.memory_per_node} bytes of memory (Squall may use {memory})")
        gpu_count = sum(v for k, v in r.devices.items() if "gpu" in k.lower())
        if gpu_count > len(gpus):
            needs.append(f"{gpu_count} GPU(s) (this machine has {len(gpus)})")
        if needs:
            raise InvalidInput(f"{name} cannot run on this machine: it needs {', '.join(needs)}")
    ids = tuple(c.id for c in sorted(cpus, key=lambda c: (c.numa_node, c.id)))
    return [NodeSlice(cpus=ids, memory_bytes=memory, gpus=gpus) for _ in range(max(nodes, 1))]


def local_engine(settings: LocalSettings) -> Engine:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    provisioner = LocalProvisioner(
        settings.data_dir / "site",
        search_registries=settings.search_registries,
        insecure_registries=settings.insecure_registries,
    )
    secrets = SecretStore(settings.data_dir / "secrets")
    store = settings.store()
    return Engine(
        store,
        provisioner,
        lambda wf: local_nodes(wf, settings.nodes),
        data_dir=settings.data_dir,
        secrets=secrets,
        placer=Placer.from_environment(settings.site, secrets, store).place,
    )
