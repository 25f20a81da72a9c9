"""Real MPI across separate local nodes: Open MPI's mpirun and MPICH's mpiexec (Hydra) start
their daemons through the agents' launcher (no sshd anywhere), the ring program checks a ring
and an allreduce over every rank, a failing rank fails the job, and cancel ends every rank.
The image is Debian trixie's Open MPI 5 and MPICH 4.2, built by scripts/mpi_image.py (cached
in pytest's cache folder: the first build takes a minute or more) and served by the session's
registry."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.engine import Engine, request_cancel
from orchestrator.provision import LocalProvisioner
from orchestrator.provision.node_network import RunNetwork
from orchestrator.store import RunState, TaskState
from tests.orchestrator.test_gangs import attempts, log_of, run_in_thread, wait_running
from tests.orchestrator.test_separate_nodes import leftovers

MiB = 2**20
OPEN_MPI_DAEMONS = ("orted", "prted")  # Open MPI 4's, 5's (PRRTE)
OPEN_MPI_RUN = ("mpirun.openmpi", "mpirun", "prterun")
ROOT = Path(__file__).resolve().parent.parent.parent


def mpi_job(image: str, nodes: int, implementation: str, command: str, per_node: int = 1) -> str:
    return (
        "version: v4\njobs:\n  ring:\n"
        f"    image: {{uri: {image}}}\n"
        f"    command: [sh, -c, '{command}']\n"
        f"    multinode: {{nodes: {nodes}, implementation: {implementation}, "
        f"procs-per-node: {per_node}}}\n"
        "    resource: {cpu: {cores: 1}, memory: {size: 256MiB}}\n"
        "    policy: {timeout: {execute: 90s}}\n"  # a hung MPI fails its test, not the suite
    )


def ranks(log: str) -> dict[int, str]:
    """rank -> host, from the ring program's lines."""
    found = {}
    for line in log.splitlines():
        if line.startswith("rank "):
            words = line.split()
            found[int(words[1])] = words[-1]
    return found


def node_listeners(run_id: str, nodes: int) -> list[set[str]]:
    """What listens for TCP in each node's network namespace (the node itself, not its
    containers): the processes' names."""
    found = []
    for i in range(nodes):
        netns = RunNetwork(run_id).netns(i)
        out = subprocess.run(
            ["nsenter", f"--net={netns}", "ss", "-ltnpH"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found.append({part.split('"')[1] for part in out.split("users:((")[1:]})
    return found


def processes_named(names: tuple[str, ...], under: list[int], args: str = "") -> list[str]:
    """Processes descended from `under` (the run's agents) whose name is one of `names`
    (and whose command line ends with `args`, when given)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(under)
    while todo:
        pid = todo.pop()
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if cmdline.decode(errors="replace").strip().endswith(args):
                found.append(f"{pid} {comm}")
        todo += children.get(pid, [])
    return found


def agent_pids(engine: Engine, run_id: str) -> list[int]:
    provisioner = engine.providers[0]
    assert isinstance(provisioner, LocalProvisioner)
    return [p.pid for p in provisioner._procs[run_id]]


def test_open_mpi_runs_a_ring_over_four_nodes_without_sshd(
    mpi: str, cluster_of: Callable[..., Engine]
) -> None:
    engine = cluster_of(4, 512 * MiB)
    text = mpi_job(mpi, 4, "openmpi", "ring && sleep 4", per_node=2)
    run_id, result, worker = run_in_thread(engine, "ring", text)
    wait_running(engine, run_id)
    agents = agent_pids(engine, run_id)
    deadline = time.monotonic() + 60
    while len(processes_named(("sleep",), agents, "sleep 4")) < 8:
        assert time.monotonic() < deadline, "the ranks did not all get past the ring"
        time.sleep(0.1)
    listening = node_listeners(run_id, 4)
    daemons = [bool(processes_named(OPEN_MPI_DAEMONS, [agent])) for agent in agents]
    sshd = processes_named(("sshd", "ssh"), agents)
    worker.join(120)
    [outcome] = result
    assert outcome.state is RunState.FINISHED, outcome.reason
    log = log_of(engine, outcome, "ring")
    assert "ring ok: 8 ranks, token 28, allreduce 28, expected 28" in log
    hosts = ranks(log)
    assert sorted(hosts) == list(range(8))
    assert sorted(set(hosts.values())) == ["ring-0", "ring-1", "ring-2", "ring-3"]
    # Open MPI's daemon on each other node (started by the launcher), none beside mpirun
    assert sorted(daemons) == [False, True, True, True]
    assert sshd == []
    # on each node only its agent listens (and the relay of this machine's registry, also
    # the orchestrator's: a thread of this process); never an sshd
    for names in listening:
        assert names <= {"python", "python3", "pytest"}, names
    assert leftovers(run_id) == []


def test_mpich_runs_a_ring_over_three_nodes_through_the_launcher(
    mpi: str, cluster_of: Callable[..., Engine]
) -> None:
    """Hydra's proxies start through the launcher; MPICH 4.2 over UCX ends cleanly (4.0.2
    hung in MPI_Finalize in one run of two here: three runs in a row show it gone)."""
    engine = cluster_of(3, 512 * MiB)
    for n in range(3):
        outcome = engine.run(f"mpich-{n}", mpi_job(mpi, 3, "mpich", "ring.mpich", per_node=2))
        assert outcome.state is RunState.FINISHED, (n, outcome.reason)
        log = log_of(engine, outcome, "ring")
        assert "ring ok: 6 ranks, token 15, allreduce 15, expected 15" in log, log
        assert sorted(set(ranks(log).values())) == ["ring-0", "ring-1", "ring-2"]
        assert leftovers(outcome.run_id) == []


def test_a_rank_that_fails_fails_the_job(mpi: str, cluster_of: Callable[..., Engine]) -> None:
    engine = cluster_of(3, 512 * MiB)
    outcome = engine.run("fail", mpi_job(mpi, 3, "openmpi", "ring fail 2"))
    assert outcome.state is RunState.FAILED
    [attempt] = attempts(engine, outcome.run_id, "ring")
    assert attempt.state is TaskState.FAILED
    assert attempt.exit_code not in (0, None)
    assert "rank 2 fails on purpose" in log_of(engine, outcome, "ring")
    assert leftovers(outcome.run_id) == []


def test_cancel_ends_every_rank_on_every_node(mpi: str, cluster_of: Callable[..., Engine]) -> None:
    engine = cluster_of(3, 512 * MiB)
    run_id, result, worker = run_in_thread(
        engine, "user/cancel-mpi", mpi_job(mpi, 3, "openmpi", "ring && sleep 300")
    )
    wait_running(engine, run_id)
    agents = agent_pids(engine, run_id)
    deadline = time.monotonic() + 60
    while len(processes_named(("sleep",), agents, "sleep 300")) < 3:
        assert time.monotonic() < deadline, "the ranks did not all get past the ring"
        time.sleep(0.1)  # every rank is past the ring, sleeping
    before = [
        p.split()[0] for p in processes_named((*OPEN_MPI_DAEMONS, "sleep", *OPEN_MPI_RUN), agents)
    ]
    assert len(before) >= 3 + 2 + 1  # the ranks, the other nodes' daemons, mpirun
    request_cancel(engine.store, "user/cancel-mpi")
    worker.join(60)
    [outcome] = result
    assert outcome.state is RunState.CANCELLED
    assert all(not Path(f"/proc/{pid}").exists() for pid in before)
    assert leftovers(run_id) == []


def test_the_examples_run_as_written(mpi: str, cluster_of: Callable[..., Engine]) -> None:
    """examples/mpi.yaml and mpi-generic.yaml on four nodes, their image taken from the
    session's registry instead of the demo's."""
    engine = cluster_of(4, 512 * MiB)
    for example in ("mpi.yaml", "mpi-mpich.yaml", "mpi-generic.yaml"):
        text = (ROOT / "examples" / example).read_text()
        text = text.replace("docker://squall/mpi:trixie", mpi)
        outcome = engine.run(example.removesuffix(".yaml"), text)
        assert outcome.state is RunState.FINISHED, (example, outcome.reason)
        log = log_of(engine, outcome, "ring")
        assert "ring ok: 4 ranks, token 6, allreduce 6, expected 6" in log, example
