"""Whole workflows that try to reach the host through their volumes, run by the engine on the
local site (real agents, crun, busybox from the local registry, SQLite)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.data.staging import volume_roots
from orchestrator.engine import Engine
from orchestrator.errors import InvalidInput
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.store import Run, RunState, Store, Transfer
from tests.orchestrator.test_engine import IMAGE, fuzzfile
from tests.substrate.registry import Registry


def test_egress_refuses_a_link_to_a_host_file(engine: Engine, tmp_path: Path) -> None:
    """`ln -s /etc/shadow /data/out` then egress `file://out` copied the host's file out."""
    secret = tmp_path / "host-only"
    secret.write_text("the host's secret\n")
    leak, fifo_leak = tmp_path / "leak", tmp_path / "fifo-leak"
    outcome = engine.run(
        "user/leak",
        fuzzfile(f"""
        volumes:
          data:
            egress:
              - {{source: {{uri: file://out}}, destination: {{uri: "file://{leak}"}}}}
              - {{source: {{uri: file://pipe}}, destination: {{uri: "file://{fifo_leak}"}}}}
        jobs:
          plant:
            {IMAGE}
            command: [/bin/sh, -c, "ln -s {secret} /data/out && mkfifo /data/pipe"]
            mounts: {{/data: {{volume: data}}}}
    """),
    )
    assert outcome.state is RunState.FAILED
    assert "refused" in outcome.reason
    assert not leak.exists()
    assert not fifo_leak.exists()
    with engine.store.session() as s:
        errors = sorted(s.scalars(select(Transfer.error).where(Transfer.run_id == outcome.run_id)))
    assert all("refused" in e for e in errors), errors


def test_ingress_never_writes_through_a_link_left_in_a_persistent_volume(
    engine: Engine, tmp_path: Path
) -> None:
    """A link left in a persistent volume by one run made the next run's ingress write
    through it, as root, anywhere on the host."""
    victim_file = tmp_path / "victim-file"
    victim_file.write_text("untouched\n")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    plant = fuzzfile(f"""
        volumes:
          keep: {{name: shared}}
        jobs:
          plant:
            {IMAGE}
            command:
              - /bin/sh
              - -c
              - ln -s {victim_file} /keep/in.txt && ln -s {victim_dir} /keep/sub
            mounts: {{/keep: {{volume: keep}}}}
    """)
    assert engine.run("user/plant", plant).state is RunState.FINISHED
    volume = engine.data_dir / "volumes" / "user" / "shared"
    assert (volume / "in.txt").is_symlink()

    def ingress(destination: str) -> str:
        return fuzzfile(f"""
            files:
              payload: "written by ingress\\n"
            volumes:
              keep:
                name: shared
                ingress:
                  - {{source: {{uri: file://payload}}, destination: {{uri: "{destination}"}}}}
            jobs:
              read:
                {IMAGE}
                command: [/bin/cat, /keep/in.txt]
                mounts: {{/keep: {{volume: keep}}}}
        """)

    # the link at the destination is replaced by the file, not followed
    assert engine.run("user/over-link", ingress("file://in.txt")).state is RunState.FINISHED
    assert victim_file.read_text() == "untouched\n"
    assert not (volume / "in.txt").is_symlink()
    assert (volume / "in.txt").read_text() == "written by ingress\n"
    # a link on the way to the destination is refused
    through = engine.run("user/through-link", ingress("file://sub/x"))
    assert through.state is RunState.FAILED
    assert "link" in through.reason
    assert list(victim_dir.iterdir()) == []


def test_a_job_sees_volumes_as_its_own_root_and_writes_them_as_the_hosts(
    engine: Engine,
) -> None:
    """Root in the job is not root on the host, yet a volume behaves as a job expects:
    owned by its root, and what it writes is the host's root's, readable by egress."""
    outcome = engine.run(
        "user/owner",
        fuzzfile(f"""
        volumes:
          keep: {{name: owned}}
        jobs:
          write:
            {IMAGE}
            command:
              - /bin/sh
              - -c
              - id -u; stat -c %u /keep; echo x > /keep/f; cat /proc/self/uid_map
            mounts: {{/keep: {{volume: keep}}}}
    """),
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    log = engine.data_dir / "runs" / outcome.run_id / "logs" / "write" / "0.1.log"
    uid, owner, *mapping = log.read_text().split()
    assert (uid, owner) == ("0", "0")
    assert mapping[:2] == ["0", "1610612736"]  # root of the job is an unprivileged host uid
    written = engine.data_dir / "volumes" / "user" / "owned" / "f"
    assert written.stat().st_uid == 0


def test_a_server_writes_local_egress_only_under_its_egress_folders(
    tmp_path: Path, registry: Registry
) -> None:
    """Through a server, `file:///` egress wrote anywhere on its machine as its user (root):
    `/etc/cron.d/x` included. A server now writes only under its `--egress-dir`s, through
    no link, and refuses any other destination before the run starts."""
    allowed = tmp_path / "results"
    engine = Engine(
        Store(f"sqlite:///{tmp_path / 'squall.db'}"),
        [
            LocalProvisioner(
                tmp_path / "site",
                nodes=lambda _: [NodeSlice(cpus=(0, 1), memory_bytes=2**30)],
                search_registries=[registry.address],
                insecure_registries=[registry.address],
                volume_roots=functools.partial(volume_roots, tmp_path / "data"),
            )
        ],
        data_dir=tmp_path / "data",
        egress_dirs=[allowed],
    )

    def egress_to(target: Path) -> str:
        return fuzzfile(f"""
            volumes:
              data:
                egress:
                  - {{source: {{uri: file://r.txt}}, destination: {{uri: "file://{target}"}}}}
            jobs:
              make:
                {IMAGE}
                command: [/bin/sh, -c, "echo result > /data/r.txt"]
                mounts: {{/data: {{volume: data}}}}
        """)

    outside = tmp_path / "elsewhere" / "cron-job"
    with pytest.raises(InvalidInput, match="outside the folders this server writes"):
        engine.submit("user/outside", egress_to(outside))
    with pytest.raises(InvalidInput, match=r"'\.\.'"):
        engine.submit("user/dotdot", egress_to(Path(f"{allowed}/../elsewhere/x")))
    with engine.store.session() as s:
        assert s.scalars(select(Run)).all() == []  # nothing was recorded
    # inside, a link planted at the target (or on the way) is not written through
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    allowed.mkdir()
    (allowed / "r.txt").symlink_to(victim)
    outcome = engine.run("user/inside", egress_to(allowed / "r.txt"))
    assert outcome.state is RunState.FINISHED, outcome.reason
    assert victim.read_text() == "untouched\n"
    assert (allowed / "r.txt").read_text() == "result\n"
    (allowed / "sub").symlink_to(tmp_path / "elsewhere-dir")
    (tmp_path / "elsewhere-dir").mkdir()
    through = engine.run("user/through", egress_to(allowed / "sub" / "r.txt"))
    assert through.state is RunState.FAILED
    assert list((tmp_path / "elsewhere-dir").iterdir()) == []
