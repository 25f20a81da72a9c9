"""Multi-node jobs (`multinode`): what a gang's containers are started with.

A job of `nodes: N` runs as one task on N nodes at once (the run loop leases them all or
none). Each node runs a container of the job's image, volumes and environment, named
`<job>-<k>` (its hostname). Members 1..N-1 start first and idle; member 0 then runs the job's
command with the others' addresses in /etc/hosts and, through the agent, a launcher that runs
commands in their containers (substrate/launcher.py): `implementation: openmpi` and `mpich`
wrap the command in `mpirun`/`mpiexec` over a hostfile of the members, as Fuzzball does;
`generic` gives it the node list in the environment and leaves the rest to it:

    MULTINODE_HOSTLIST           host:slots,...   (every member, the first one's own host first)
    MULTINODE_HOSTLIST_NOSLOTS   host,...
    MULTINODE_TOTAL_SLOTS        nodes x slots
    MULTINODE_NODE_IP            the container's own address (set by its agent)
    MULTINODE_NODE_INTERFACE     the name of its interface with that address (set by its agent)
    MULTINODE_RSH_WRAPPER, MULTINODE_SSH_WRAPPER
                                 the launcher: `$MULTINODE_RSH_WRAPPER HOST CMD...`

Slots per node are `procs-per-node`, or the cores each node's container gets. The ranks'
output reaches the first member's log (MPI forwards it; a generic job's launcher returns what
each command printed), which is the job's log.
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Sequence

from api.substrate.v1 import agent_pb2 as pb
from substrate.launcher import LAUNCH_DIR, LAUNCHER
from substrate.runtimes.rootfs import hostname

from .fuzzfile.model import Job, Service

__all__ = [
    "IDLE",
    "MORE_NODES",
    "common_request",
    "grant",
    "head_request",
    "hosts",
    "member_request",
    "size",
    "slots",
]

# what members other than the first run until the job is over (they are then cancelled)
IDLE = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]
MORE_NODES = " (`squall run --nodes N` gives the local site N nodes)"
HOSTFILE = f"{LAUNCH_DIR}/hostfile"  # written by the job's command wrapper, see _wrap
JOB_SCRIPT = "/.squall/job-script"  # an MPI job's script, in every member's container
MPIS = ("openmpi", "mpich")
# Open MPI across containers: TCP on the interface of the members' addresses alone (the
# pod network's eth0, or the node's own: MULTINODE_NODE_INTERFACE, named alike on every node
# of a node group; as /32 CIDRs instead, Open MPI 4.1 refuses its peers' connections), the
# launcher for ssh, every daemon started from the first member (whose container alone has
# the launcher), hwloc's GL plugin off (it probes X displays and DNS: seconds of MPI_Init in
# containers)
_OPENMPI = (
    "--mca plm_rsh_agent {launcher} --mca plm_rsh_no_tree_spawn 1 "
    '--mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include "$MULTINODE_NODE_INTERFACE" '
    '--mca oob_tcp_if_include "$MULTINODE_NODE_INTERFACE" '
    "--allow-run-as-root -x HWLOC_COMPONENTS"
)
# the program of each MPI, as Debian names it when both are installed, else the common name
_PROGRAM = {"openmpi": ("mpirun.openmpi", "mpirun"), "mpich": ("mpiexec.mpich", "mpiexec")}


def size(c: Job | Service) -> int:
    """How many nodes a task of `c` runs on at once."""
    return c.multinode.nodes if isinstance(c, Job) and c.multinode else 1


def slots(c: Job) -> int:
    """Ranks per node: `procs-per-node`, or the cores of each node's container."""
    assert c.multinode is not None
    return c.multinode.procs_per_node or max(c.resource.cores, 1)


def hosts(job: str, count: int) -> list[str]:
    """The hostnames of a gang's members: `<job>-<k>` as a DNS label."""
    return [f"{hostname(job)[:56]}-{k}" for k in range(count)]


def grant() -> str:
    """A member's exec grant: what lets the first member's agent Exec in it."""
    return secrets.token_urlsafe(24)


def common_request(request: pb.RunRequest, c: Job, *, host_network: bool = False) -> None:
    """Make `request` (the job's Run) what every member starts from: on the nodes' own
    network when the cluster says so (`Cluster.host_network`); an MPI job's script becomes a
    file of every member's container, since each rank runs it."""
    assert c.multinode is not None
    if host_network:
        request.network = pb.NETWORK_HOST
    if c.multinode.implementation not in MPIS:
        return
    request.env.setdefault("HWLOC_COMPONENTS", "-gl")  # see _OPENMPI; MPICH's hwloc too
    if request.script:
        request.files.add(path=JOB_SCRIPT, content=request.script.encode(), mode=0o755)
        request.script = ""
        request.command[:] = [JOB_SCRIPT]


def member_request(base: pb.RunRequest, lease_id: str, host: str, exec_grant: str) -> pb.RunRequest:
    """The Run of a member other than the first: the job's container, idling."""
    request = pb.RunRequest()
    request.CopyFrom(base)
    request.lease_id, request.name, request.exec_grant = lease_id, host, exec_grant
    # the launcher too (reaching only its own container): Open MPI's daemons there check that
    # the plm_rsh_agent they are told of exists, and fail without it
    request.launcher = True
    request.script, request.timeout_seconds = "", 0  # it ends when the first member does
    del request.command[:], request.args[:]
    request.command.extend(IDLE)
    return request


def head_request(
    request: pb.RunRequest,
    c: Job,
    names: Sequence[str],
    peers: Sequence[pb.Peer],
    addresses: Sequence[str],
) -> None:
    """Make `request` (the job's Run) that of its first member: its hostname, the launcher
    and its peers, the other members in /etc/hosts, MULTINODE_* and, for an MPI, the command
    wrapped in mpirun."""
    per_node = slots(c)
    request.name = names[0]
    request.launcher = True
    request.peers.extend(peers)
    request.env.update(
        {
            "MULTINODE_HOSTLIST": ",".join(f"{h}:{per_node}" for h in names),
            "MULTINODE_HOSTLIST_NOSLOTS": ",".join(names),
            "MULTINODE_TOTAL_SLOTS": str(per_node * len(names)),
            "MULTINODE_RSH_WRAPPER": LAUNCHER,
            "MULTINODE_SSH_WRAPPER": LAUNCHER,
        }
    )
    hosts_file = next((f for f in request.files if f.path == "/etc/hosts"), None)
    # (its own name, at its address, its agent adds: it is known there alone)
    lines = [f"{a} {h}" for h, a in zip(names[1:], addresses, strict=True)]
    if hosts_file is None:
        hosts_file = request.files.add(path="/etc/hosts", content=b"127.0.0.1 localhost\n")
    hosts_file.content += ("\n".join(lines) + "\n").encode()
    assert c.multinode is not None
    if c.multinode.implementation in MPIS:
        _wrap(request, c.multinode.implementation, names, per_node)


def _wrap(request: pb.RunRequest, implementation: str, names: Sequence[str], per_node: int) -> None:
    """The job's command (see common_request) run by `mpirun` (Open MPI) or `mpiexec`
    (MPICH's Hydra) over a hostfile of the members, from a script of its own."""
    command = [*request.command, *request.args]
    ranks = per_node * len(names)
    if implementation == "openmpi":
        hostfile = "".join(f"{h} slots={per_node}\n" for h in names)
        options = f"--hostfile {HOSTFILE} -np {ranks} {_OPENMPI.format(launcher=LAUNCHER)}"
    else:
        hostfile = "".join(f"{h}:{per_node}\n" for h in names)
        # the proxies reach mpiexec at its address: its hostname resolves only where it runs
        options = (
            f"-f {HOSTFILE} -n {ranks} -launcher ssh -launcher-exec {LAUNCHER} "
            '-localhost "$MULTINODE_NODE_IP"'
        )
    debian, common = _PROGRAM[implementation]
    request.script = "".join(
        (
            "#!/bin/sh\n",
            f"cat > {HOSTFILE} <<'EOF'\n{hostfile}EOF\n",
            f"run={common}; command -v {debian} >/dev/null && run={debian}\n",
            f"exec $run {options} {shlex.join(command)}\n",
        )
    )
    del request.command[:], request.args[:]
