"""The local site: a cluster of substrate agents running as processes on this machine.

Each agent owns a slice (CPUs, memory) and its own data directory and is reached only through
its gRPC API, as a cloud node would be. One node (the default) serves on a free loopback port.
Separate nodes (`namespaced`, `squall run --nodes N`) are each a network namespace with an
address on a bridge of the run's, a hostname and a disjoint slice of the CPUs of their own
(node_network.py); their agents serve at their nodes' addresses alone. Every run's agents
share the site's image folder (`<root>/images`: they share the machine): an image is pulled and
unpacked once, not once a node or a run; a later run's agent takes it from there as a cached
image, which it checks with the registry under the run's login before it gives it (see
substrate/images.py), so a private image is never handed to a run that could not pull it.
Nothing prunes that folder yet: it grows with the images used. Agents run in their own
session, so a Ctrl-C at the terminal reaches
the orchestrator, which then stops them in order (TERM, then KILL after a grace). Once they
are gone, whatever an agent that did not stop cleanly left (its tasks' processes, mounts,
network namespaces, bridge, cgroups) is removed by `substrate --clean-up` on its data
directory, and the run's agent directories (tokens, task state) are deleted.

A run's volumes live on this machine's disk (`volume_roots`). Separate nodes of a workflow
with volumes reach them as a cloud cluster's nodes reach theirs: node 0 serves the run's volume
folder over the run's network and every node mounts it (node_share.py, the `node-share`
storage its placement records); persistent volumes stay on this machine's disk, which every
node sees.

Every run's agents serve mutual TLS with certificates of a CA made for the run (see
`pki`), as a cloud's nodes do: only this orchestrator's certificate opens them, and the
node key lives in the agent's folder (0600) until the run's folders go.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from substrate import AGENT_PORT
from substrate.inventory import Gpu, read_cpus, read_gpus, read_memory_bytes
from substrate.paths import remove_tree

from .base import (
    AgentEndpoint,
    Cluster,
    NodeSlice,
    Plan,
    ProvisionError,
    Report,
    await_health,
    quiet,
)
from .node_network import LoopbackRelay, NodePlace, RunNetwork, loopback_ports
from .node_share import NodeShare
from .pki import RunPKI, make_run_pki

if TYPE_CHECKING:
    from ..fuzzfile import Workflow
    from ..placing import Placement

__all__ = [
    "LocalProvisioner",
    "Machine",
    "Sizing",
    "local_plan",
    "separate_nodes",
    "share_machine",
    "slice_machine",
    "this_machine",
    "whole_machine",
]

Sizing = Callable[["Workflow"], list[NodeSlice]]  # the nodes a workflow's cluster gets

START_TIMEOUT = 30.0
STOP_GRACE = 10.0
MEMORY_SHARE = 0.9  # of this machine's memory, the rest left to the system


@dataclass(frozen=True, slots=True)
class Machine:
    """What the local site has to give: CPUs in NUMA order, whole cores, memory Squall may
    use, and GPUs."""

    cpu_ids: tuple[int, ...]
    cores: int
    memory_bytes: int
    gpus: tuple[Gpu, ...]


def this_machine() -> Machine:
    cpus = read_cpus()
    return Machine(
        cpu_ids=tuple(c.id for c in sorted(cpus, key=lambda c: (c.numa_node, c.id))),
        cores=len({(c.socket, c.core) for c in cpus}),
        memory_bytes=int(read_memory_bytes() * MEMORY_SHARE),
        gpus=tuple(read_gpus()),
    )


def slice_machine(
    cpus: Sequence[tuple[int, int]], memory_bytes: int, nodes: int, cores: int, memory: int
) -> list[NodeSlice]:
    """Cut `nodes` disjoint slices of `cores` CPUs and `memory` bytes out of this machine.

    `cpus` are (cpu id, NUMA node) pairs; each slice takes CPUs in NUMA order, so that a
    slice stays on one NUMA node when it can.
    """
    ordered = [cpu for cpu, _ in sorted(cpus, key=lambda c: (c[1], c[0]))]
    if nodes * cores > len(ordered):
        raise ProvisionError(
            f"{nodes} node(s) of {cores} core(s) need {nodes * cores} CPUs; this machine has "
            f"{len(ordered)}"
        )
    if nodes * memory > memory_bytes:
        raise ProvisionError(
            f"{nodes} node(s) of {memory} bytes need {nodes * memory} bytes of memory; this "
            f"machine has {memory_bytes}"
        )
    return [
        NodeSlice(cpus=tuple(ordered[i * cores : (i + 1) * cores]), memory_bytes=memory)
        for i in range(nodes)
    ]


def whole_machine(count: int = 1) -> Sizing:
    """`count` agents that each may lease the whole machine (more than one oversubscribes
    it). Whether every job fits on it at all was settled at PLACING: federation prices this
    machine as a site of its own shape and refuses it, with the reason, when a job does not."""

    def size(wf: Workflow) -> list[NodeSlice]:
        del wf  # every workflow gets the whole machine
        machine = this_machine()
        gpus = tuple(g.index for g in machine.gpus)
        return [
            NodeSlice(cpus=machine.cpu_ids, memory_bytes=machine.memory_bytes, gpus=gpus)
            for _ in range(max(count, 1))
        ]

    return size


def share_machine(machine: Machine, count: int) -> list[NodeSlice]:
    """`count` nodes cut out of `machine`: disjoint slices of its CPUs in NUMA order (sizes
    differ by one at most), an equal share of its memory, and its GPUs dealt out in turn.
    With more nodes than CPUs, nodes take the CPUs in turn and so share them."""
    cpus = machine.cpu_ids
    if count <= len(cpus):
        size, extra = divmod(len(cpus), count)
        starts = [i * size + min(i, extra) for i in range(count + 1)]
        cut = [cpus[starts[i] : starts[i + 1]] for i in range(count)]
    else:
        cut = [(cpus[i % len(cpus)],) for i in range(count)]
    gpus = tuple(g.index for g in machine.gpus)
    return [
        NodeSlice(cpus=tuple(c), memory_bytes=machine.memory_bytes // count, gpus=gpus[i::count])
        for i, c in enumerate(cut)
    ]


def separate_nodes(count: int) -> Sizing:
    """`count` nodes of this machine, sized by `share_machine` (for `namespaced` clusters)."""

    def size(wf: Workflow) -> list[NodeSlice]:
        del wf  # every workflow gets the same nodes
        return share_machine(this_machine(), count)

    return size


def local_plan(
    run_id: str, nodes: Sequence[NodeSlice], *, storage: str | None = None
) -> Plan[tuple[NodeSlice, ...]]:
    """A local cluster of `nodes`, recorded in the run's placement as their sizes and, for a
    workflow with volumes, where they live (`storage`: `node-local`, this machine's disk, or
    `node-share`, a share node 0 serves to separate nodes, see node_share.py)."""
    record: dict[str, object] = {
        "nodes": [
            {"cpus": len(n.cpus), "memory_bytes": n.memory_bytes, "gpus": len(n.gpus)}
            for n in nodes
        ]
    }
    if storage is not None:
        record["storage"] = storage
    return Plan(run_id, tuple(nodes), record if nodes else {})


class LocalProvisioner:
    """Starts and stops agent processes under `root/<run id>/<node>`, as many and as large
    as `nodes` sizes them for a workflow (default: one agent that may lease the whole
    machine); with `namespaced`, each in a node of its own (node_network.py)."""

    site = "local"
    cannot: Mapping[str, str] = {}  # this machine runs whatever the engine does

    def __init__(
        self,
        root: Path,
        *,
        nodes: Sizing | None = None,
        search_registries: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        python: str = sys.executable,
        oversubscribe: int = 1,
        namespaced: bool = False,
        volume_roots: Callable[[str], Sequence[Path]] | None = None,
        routed_networks: Sequence[str] = (),
    ) -> None:
        """`volume_roots`: the folders of this machine where a run's volumes live (its
        agents may make, fill and read volumes there alone); None: they serve none.
        `routed_networks`: networks that separate nodes reach from their own addresses,
        not masqueraded as this machine (data servers that route the node pool back)."""
        self.routed_networks = tuple(routed_networks)
        self.root = root
        self.volume_roots = volume_roots or (lambda run_id: ())
        self.namespaced = namespaced
        self.oversubscribe = oversubscribe  # leases that may share one core of an agent
        self.nodes = nodes or whole_machine()
        self.search = tuple(search_registries)
        self.insecure = tuple(insecure_registries)
        self.python = python
        self._procs: dict[str, list[subprocess.Popen[str]]] = {}
        self._relays: dict[str, LoopbackRelay] = {}
        # each live run's nodes, their places, shares and PKI: what a replacement needs
        self._replacing = threading.Lock()
        self._made: dict[
            str, tuple[tuple[NodeSlice, ...], list[NodePlace] | None, dict[int, Path], RunPKI]
        ] = {}

    def serves(self, site: str) -> bool:
        return site == self.site

    def plan(
        self, run_id: str, owner: str, wf: Workflow, placement: Placement
    ) -> Plan[tuple[NodeSlice, ...]]:
        del owner, placement  # this machine is sized by the workflow alone
        nodes = self.nodes(wf)
        storage = None
        if wf.volumes:
            storage = "node-share" if self.namespaced and len(nodes) > 1 else "node-local"
        return local_plan(run_id, nodes, storage=storage)

    def up(self, plan: Plan[tuple[NodeSlice, ...]], report: Report = quiet) -> Cluster:
        """Start the planned agents (they start in seconds: nothing to report)."""
        run_id, nodes = plan.run_id, plan.shape
        if not nodes:
            raise ProvisionError("a cluster needs at least one node")
        # the site's images (private ones too) and fetched data are root's alone, as its
        # runs' tokens are; both are shared by its runs' agents
        (self.root / "images").mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "ingress-cache").mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in self.volume_roots(run_id):
            folder.mkdir(parents=True, exist_ok=True)
        started: list[subprocess.Popen[str]] = []
        self._procs[run_id] = started
        pki = make_run_pki(run_id)  # the run's agents serve mutual TLS, as a cloud's do
        try:
            places = self._make_nodes(run_id, len(nodes)) if self.namespaced else None
            shares = {}
            if places and plan.record.get("storage") == "node-share":
                shares = self._share(run_id, places)
            booting = [  # every agent is started before any is waited for: side by side
                self._start(
                    run_id,
                    f"node-{i}",
                    node,
                    started,
                    places[i] if places else None,
                    pki,
                    shares.get(i),
                )
                for i, node in enumerate(nodes)
            ]
            agents = [ready() for ready in booting]
            self._made[run_id] = (nodes, places, shares, pki)
        except BaseException as failure:
            self._stop(started)
            del self._procs[run_id]
            try:
                self._remove_share(run_id)
            except ProvisionError as exc:  # said with the failure, which stays the error
                failure.add_note(str(exc))
            finally:
                self._remove_network(run_id)  # the agents' folders stay, with their logs
            raise
        return Cluster(run_id=run_id, site=self.site, agents=tuple(agents))

    def _make_nodes(self, run_id: str, count: int) -> list[NodePlace]:
        """The run's node namespaces and bridge, and its loopback registries relayed to the
        nodes."""
        places = RunNetwork(run_id, self.routed_networks).make(count)
        relay = self._relays[run_id] = LoopbackRelay()
        for place in places:
            for port in loopback_ports([*self.search, *self.insecure]):
                relay.serve(place.netns, port)
        return places

    def _node_share(self, run_id: str) -> NodeShare | None:
        """The share of the run's volume folder (the first of its volume roots), if it has
        volume roots."""
        roots = self.volume_roots(run_id)
        return NodeShare(self.root / run_id / "share", roots[0]) if roots else None

    def _share(self, run_id: str, places: Sequence[NodePlace]) -> dict[int, Path]:
        """Serve the run's volume folder from its first node and mount it on every node
        (node_share.py): for each node, where it has the folder."""
        share = self._node_share(run_id)
        if share is None:
            return {}
        if "=" in str(share.export):  # the agents' --shared-volume-root is DIR=MOUNT
            raise ProvisionError(
                f"separate nodes cannot share volumes kept under {share.export}: a data "
                "directory whose path has '=' is not supported with --nodes"
            )
        server = str(places[0].address)
        share.serve(places[0].netns, server, [str(p.address) for p in places])
        return {p.index: share.mount(p.index, p.netns, server) for p in places}

    def _start(
        self,
        run_id: str,
        name: str,
        node: NodeSlice,
        started: list[subprocess.Popen[str]],
        place: NodePlace | None,
        pki: RunPKI,
        shared: Path | None = None,
    ) -> Callable[[], AgentEndpoint]:
        """Start an agent's process (in its node, when `place` is one); a function that waits
        until it serves, and says where. `shared`: where the node has the run's volume folder
        (the first of its volume roots) on the share."""
        home = self.root / run_id / name
        home.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        token_file = home / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        tls = home / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        for file, pem in (
            ("node.pem", pki.node_certificate),
            ("node.key", pki.node_key),
            ("ca.pem", pki.ca),
        ):
            (tls / file).touch(mode=0o600)
            (tls / file).write_bytes(pem)
        cmd = [
            self.python,
            "-m",
            "substrate",
            "--listen",
            # a node of its own serves where a cloud node does; this machine, on a free port
            f"{place.address}:{AGENT_PORT}" if place else "127.0.0.1:0",
            "--data-dir",
            str(home / "data"),
            "--image-dir",  # the site's, shared by every run: an image is pulled once
            str(self.root / "images"),
            "--cache-dir",  # and so is what ingress fetched
            str(self.root / "ingress-cache"),
            "--token-file",
            str(token_file),
            *("--tls-cert", str(tls / "node.pem"), "--tls-key", str(tls / "node.key")),
            *("--tls-ca", str(tls / "ca.pem")),
            "--cpus",
            ",".join(map(str, node.cpus)),
            "--memory-bytes",
            str(node.memory_bytes),
            "--label",
            f"run={run_id}",
            "--label",
            f"node={name}",
            "--owner-pid",
            str(os.getpid()),
            "--oversubscribe",
            str(self.oversubscribe),
        ]
        if node.gpus:
            cmd += ["--gpus", ",".join(map(str, node.gpus))]
        if place is not None:
            cmd += ["--netns", str(place.netns), "--hostname", place.name]
            cmd += ["--pod-subnet", str(place.pod_subnet)]
            # containers never reach a node (their own, another, this machine's side)
            cmd += ["--deny-network", str(place.node_network)]
            # but a multi-node job's containers on the node's own network reach the others
            cmd += ["--host-network", str(place.address)]
        roots = [str(r) for r in self.volume_roots(run_id)]
        on_share = [f"{roots.pop(0)}={shared}"] if shared is not None else []
        for flag, values in (
            ("--search-registry", self.search),
            ("--insecure-registry", self.insecure),
            ("--volume-root", roots),
            ("--shared-volume-root", on_share),
        ):
            for value in values:
                cmd += [flag, value]
        log = open(home / "agent.log", "w")  # noqa: SIM115 - the agent writes to it
        try:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
            )
        finally:
            log.close()
        started.append(proc)

        def ready() -> AgentEndpoint:
            address = self._await_address(proc, home / "agent.log")
            agent = AgentEndpoint(
                name=name, address=address, token=token, pid=proc.pid, tls=pki.orchestrator
            )
            await_health(agent, START_TIMEOUT, lambda: _last_line(home / "agent.log"))
            return agent

        return ready

    @staticmethod
    def _await_address(proc: subprocess.Popen[str], log: Path) -> str:
        """The agent's first stdout line says where it listens."""
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout=START_TIMEOUT):
                raise ProvisionError(f"an agent did not start within {START_TIMEOUT:g}s")
            line = proc.stdout.readline()
        finally:
            sel.close()
        if not line.startswith("listening on "):
            proc.wait(timeout=5)
            reason = _last_line(log) or f"exit status {proc.returncode}"
            raise ProvisionError(f"an agent failed to start: {reason}")
        return line.split()[-1]

    def replace(self, cluster: Cluster, node: int, report: Report = quiet) -> AgentEndpoint:
        """Start a new agent in place of node `node`'s, which was lost: the old one is
        stopped if it still runs, what it left (containers, mounts) is cleaned up, and the
        new one serves where it did (a node of its own keeps its address), empty."""
        with self._replacing:  # `down` waits for a replacement on its way, and vice versa
            return self._replace(cluster, node, report)

    def _replace(self, cluster: Cluster, node: int, report: Report) -> AgentEndpoint:
        made = self._made.get(cluster.run_id)
        started = self._procs.get(cluster.run_id)
        if made is None or started is None:
            raise ProvisionError(f"node-{node} is not one of this process's live clusters")
        nodes, places, shares, pki = made
        name = f"node-{node}"
        old = cluster.agents[node]
        for proc in [p for p in started if p.pid == old.pid]:
            started.remove(proc)
            self._stop([proc])
        data = self.root / cluster.run_id / name / "data"
        cmd = [self.python, "-m", "substrate", "--data-dir", str(data), "--clean-up"]
        if places:
            cmd += ["--netns", str(places[node].netns)]
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        place = places[node] if places else None
        report(f"{name}: starting a new agent in place of the lost one")
        return self._start(
            cluster.run_id, name, nodes[node], started, place, pki, shares.get(node)
        )()

    def down(self, cluster: Cluster, report: Report = quiet) -> None:
        with self._replacing:
            self._made.pop(cluster.run_id, None)
            procs = self._procs.pop(cluster.run_id, None)
        if procs is not None:
            clean = self._stop(procs)
        else:
            # a cluster this process did not start (its orchestrator died): find its agents
            # by the pids on record, and only if they are still that run's agents
            for agent in cluster.agents:
                if agent.pid and _is_agent_of(agent.pid, cluster.run_id):
                    _stop_group(agent.pid)
            clean = False
        self._remove(cluster.run_id, clean)

    def _remove(self, run_id: str, clean: bool) -> None:
        """Delete the run's agent directories, first cleaning up after any agent that did
        not stop cleanly (the data directories are how its leftovers are found, in its
        node's namespace where it had one), then the run's node network, if it has one."""
        home = self.root / run_id
        network = RunNetwork(run_id)
        if not clean and home.is_dir():
            for data in sorted(home.glob("node-*/data")):
                cmd = [self.python, "-m", "substrate", "--data-dir", str(data), "--clean-up"]
                netns = network.netns(int(data.parent.name.removeprefix("node-")))
                if netns.exists():
                    cmd += ["--netns", str(netns)]
                subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        try:
            self._remove_share(run_id)  # raises while it is still mounted: home stays
        finally:
            self._remove_network(run_id)
        if home.is_dir():
            remove_tree(home)

    def _remove_share(self, run_id: str) -> None:
        """Unmount and stop the run's share, if it has one; its files stay in the run's volume
        folder."""
        share = self._node_share(run_id)
        if share is not None:
            share.remove()

    def _remove_network(self, run_id: str) -> None:
        relay = self._relays.pop(run_id, None)
        if relay is not None:
            relay.close()
        RunNetwork(run_id).remove()

    @staticmethod
    def _stop(procs: list[subprocess.Popen[str]]) -> bool:
        """Stop the agents; True when every one exited by itself after its TERM."""
        clean = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            clean = clean and proc.returncode == 0
            if proc.stdout is not None:
                proc.stdout.close()
        return clean


def _is_agent_of(pid: int, run_id: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"substrate" in argv and f"run={run_id}".encode() in argv


def _stop_group(pid: int) -> None:
    """TERM the agent's process group (it leads its own session), KILL it after a grace."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
