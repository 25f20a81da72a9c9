"""`python -m substrate`: run a node agent until SIGTERM or SIGINT.

The token comes from --token-file or the SQUALL_AGENT_TOKEN environment variable, never from
the command line (where `ps` shows it to everyone). The first line on stdout is
`listening on HOST:PORT`, so that a parent that asked for port 0 learns the port.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import select
import signal
import sys
import threading
from pathlib import Path

from .agent import USERNS_BASE, Agent, AgentConfig
from .confine import ConfinementError
from .heap import keep_freed_memory
from .interruption import InterruptionWatch
from .inventory import parse_cpu_list, read_inventory
from .join import JoinError, JoinRequest, join, say
from .network import DENY, POOL, NetworkError
from .node import NodeError, enter
from .runtimes import available
from .server import create_server
from .tls import ServerTLS, TLSError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="substrate", description="Squall's node agent.")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--data-dir", type=Path, required=True, help="task state and logs go here")
    p.add_argument(
        "--image-dir",
        type=Path,
        help="where images are pulled and unpacked (default: DATA_DIR/images); agents on one "
        "machine may share one, and pull each image once",
    )
    p.add_argument("--token-file", type=Path, help="file holding the token callers must send")
    p.add_argument(
        "--volume-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder beneath which the orchestrator may make, fill and read volumes "
        "(the cluster's storage); repeatable; none: this agent serves no volume",
    )
    p.add_argument(
        "--shared-volume-root",
        action="append",
        default=[],
        metavar="DIR=MOUNT",
        help="a volume root this node keeps on a share mounted at MOUNT (a FUSE file system: "
        "its volumes belong to the jobs' root); the orchestrator names volumes beneath DIR, "
        "as on the cluster's other nodes; repeatable",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="the ingress cache (default: DATA_DIR/cache/ingress); agents of one machine may "
        "share one",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        help="serve mutual TLS with this node certificate (PEM; with --tls-key and --tls-ca): "
        "every caller must show a certificate of the CA in --tls-ca",
    )
    p.add_argument("--tls-key", type=Path, help="the node certificate's private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="the CA (PEM) callers' certificates come from")
    p.add_argument(
        "--join",
        metavar="HOST:PORT",
        help="join a run first: make this node's key, trade the token (--token-file) for a "
        "node certificate at this orchestrator's join service, and write the key, the "
        "certificate and the run's CA where --tls-key, --tls-cert and --tls-ca say",
    )
    p.add_argument(
        "--join-ca", type=Path, help="the CA (PEM) the join service's certificate comes from"
    )
    p.add_argument("--join-run", help="the run this node joins")
    p.add_argument("--join-group", help="the node group this node is of")
    p.add_argument(
        "--join-index",
        type=int,
        help="this node's place in its group, when its boot data names one (the node that "
        "serves the group's volumes is 0); default: the first place free",
    )
    p.add_argument(
        "--join-timeout",
        type=float,
        default=600.0,
        help="seconds to keep trying to join (default 600)",
    )
    p.add_argument(
        "--plaintext",
        action="store_true",
        help="serve without TLS on an address other than loopback (the token then travels in "
        "the clear: only on a network no one else reaches)",
    )
    p.add_argument("--cpus", help="CPU ids this agent may lease, e.g. 0-3,8 (default: all)")
    p.add_argument("--memory-bytes", type=int, help="memory this agent may lease (default: all)")
    p.add_argument("--gpus", help="GPU indexes this agent may lease, e.g. 0,1 (default: all)")
    p.add_argument("--default-runtime", default="", help="runtime for requests that name none")
    p.add_argument(
        "--sif-runtime",
        default="",
        help="runtime for oras:// (SIF) images when a request names none (default: the "
        "default runtime, which runs their squashfs root; `apptainer` where it is installed)",
    )
    p.add_argument(
        "--oversubscribe",
        type=int,
        default=1,
        metavar="K",
        help="let up to K leases hold one core at once (default 1), as Slurm's "
        "OverSubscribe=FORCE:K: more tasks at once than cores, for short or waiting tasks",
    )
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument(
        "--search-registry",
        action="append",
        default=[],
        help="registry for unqualified image names, in order (default: docker.io)",
    )
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        help="registry reached over plain HTTP (a local test registry)",
    )
    p.add_argument(
        "--weak-runtimes",
        action="store_true",
        help="also offer bwrap and process, which confine jobs less than crun (no user "
        "namespace or seccomp profile; process runs on the host): for development",
    )
    p.add_argument(
        "--userns-base",
        type=int,
        default=USERNS_BASE,
        help="host uid (and gid) that root in a job's container maps to; the 65535 after it "
        f"are the container's other users (default {USERNS_BASE})",
    )
    p.add_argument(
        "--no-pod-network",
        action="store_true",
        help="give jobs loopback alone instead of a namespace on the node's bridge",
    )
    p.add_argument(
        "--pod-pool",
        default=POOL,
        help=f"where the node's container subnet (a free /24) is taken from (default {POOL})",
    )
    p.add_argument(
        "--pod-subnet",
        help="the node's container subnet (a CIDR of the pod pool), as given by a local "
        "cluster whose nodes cannot see each other's (default: the first free /24)",
    )
    p.add_argument(
        "--host-network",
        metavar="ADDRESS",
        help="let multi-node jobs' containers share this node's network (MPI over its own "
        "interfaces and fabric), reached by the job's other nodes at ADDRESS (`auto`: the "
        "address the default route leaves from); they are kept from the agent's port and "
        "the denied networks. For a node that is a whole machine (or namespace) of its own",
    )
    p.add_argument(
        "--netns",
        type=Path,
        help="join this pinned network namespace first: the node of a local cluster that its "
        "orchestrator made (with --hostname)",
    )
    p.add_argument("--hostname", help="with --netns: the node's hostname (a UTS namespace)")
    p.add_argument(
        "--deny-network",
        action="append",
        default=[],
        help="a CIDR jobs may never reach, such as the control plane's address; repeatable "
        f"(always: {', '.join(DENY)})",
    )
    p.add_argument(
        "--clean-up",
        action="store_true",
        help="do not serve: remove what an agent on this data dir left behind (its tasks' "
        "processes, mounts, containers, network namespaces, bridge, firewall and cgroups), "
        "then exit",
    )
    p.add_argument(
        "--interruption-notices",
        metavar="CLOUD[=URL]",
        help="watch the cloud's metadata service (aws, gcp or azure; URL: its address, for "
        "tests) for the notice that it takes this node back, and say it in Health",
    )
    p.add_argument(
        "--owner-pid",
        type=int,
        help="stop (and end every task) when this process exits: the orchestrator that "
        "started this agent on its own machine",
    )
    return p


def _loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _watch_owner(pid: int, stop: threading.Event) -> None:
    """Set `stop` when process `pid` exits (a pidfd: immune to pid reuse)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        stop.set()
        return
    try:
        select.select([fd], [], [])  # readable once the process has exited
    finally:
        os.close(fd)
    logging.getLogger("substrate").warning("owner process %d exited: stopping", pid)
    stop.set()


def _join(args: argparse.Namespace, token: str) -> int:
    """Join the run named on the command line (writes the TLS files); 0 when joined."""
    try:
        request = JoinRequest(
            orchestrator=args.join,
            join_ca=args.join_ca.read_bytes(),
            run_id=args.join_run,
            token=token,
            group=args.join_group,
            agent_port=int(args.listen.rsplit(":", 1)[1]),
            index=args.join_index,
        )
    except (OSError, ValueError) as exc:
        print(f"substrate: cannot join: {exc}", file=sys.stderr)
        return 2
    if args.join_index is not None and args.join_index < 0:
        print("substrate: --join-index is a place in the group: 0 or more", file=sys.stderr)
        return 2
    folders = {p.parent for p in (args.tls_cert, args.tls_key, args.tls_ca)}
    wanted = {args.tls_cert.name, args.tls_key.name, args.tls_ca.name}
    if len(folders) != 1 or wanted != {"node.pem", "node.key", "ca.pem"}:
        print(
            "substrate: --join writes DIR/node.pem, DIR/node.key and DIR/ca.pem: give those "
            "as --tls-cert, --tls-key and --tls-ca",
            file=sys.stderr,
        )
        return 2
    if all(path.exists() for path in (args.tls_cert, args.tls_key, args.tls_ca)):
        # joined before this restart: the run's join window may be closed, and the
        # certificate is this node's for the run's life
        logging.getLogger("substrate").info("joined before: serving with %s", args.tls_cert)
        return 0
    try:
        join(request, folders.pop(), args.join_timeout)
    except JoinError as exc:
        print(f"substrate: {exc}", file=sys.stderr)
        say(request, f"cannot join: {exc}")  # shown when the run's wait ends (best effort)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.oversubscribe < 1:
        parser.error("--oversubscribe is at least 1")
    tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_files) and not all(tls_files):
        parser.error("give --tls-cert, --tls-key and --tls-ca together")
    joining = (args.join, args.join_ca, args.join_run, args.join_group)
    if any(joining) and not (all(joining) and all(tls_files) and args.token_file):
        parser.error(
            "--join needs --join-ca, --join-run, --join-group, --token-file and the "
            "--tls-cert, --tls-key and --tls-ca it writes"
        )
    if not all(tls_files) and not args.plaintext and not _loopback(args.listen):
        parser.error(
            f"--listen {args.listen} is not loopback: serve mutual TLS (--tls-cert, --tls-key, "
            "--tls-ca) or say --plaintext"
        )
    if args.netns:  # first: no thread has started yet
        try:
            enter(args.netns, args.hostname or args.netns.name)
        except NodeError as exc:
            print(f"substrate: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s substrate %(levelname)s %(message)s",
    )
    token = (
        args.token_file.read_text().strip()
        if args.token_file
        else os.environ.get("SQUALL_AGENT_TOKEN", "")
    )
    if args.clean_up:
        token = token or "unused"  # nothing is served
    if not token:
        print("substrate: no token: give --token-file or set SQUALL_AGENT_TOKEN", file=sys.stderr)
        return 2
    if args.join:
        code = _join(args, token)
        if code:
            return code
    try:
        tls = ServerTLS.from_files(*tls_files) if all(tls_files) else None
    except TLSError as exc:
        print(f"substrate: {exc}", file=sys.stderr)
        return 2
    try:
        inventory = read_inventory(
            cpus=parse_cpu_list(args.cpus) if args.cpus else None,
            memory_bytes=args.memory_bytes,
            gpus=parse_cpu_list(args.gpus) if args.gpus else None,
        )
    except ValueError as exc:
        print(f"substrate: {exc}", file=sys.stderr)
        return 2
    labels = dict(item.partition("=")[::2] for item in args.label)
    shared_roots = {}
    for item in args.shared_volume_root:
        root, _, mount = item.partition("=")
        if not (root.startswith("/") and mount.startswith("/")):
            print(
                f"substrate: --shared-volume-root {item}: write DIR=MOUNT, both absolute",
                file=sys.stderr,
            )
            return 2
        shared_roots[Path(root)] = Path(mount)
    config = AgentConfig(
        data_dir=args.data_dir,
        token=token,
        default_runtime=args.default_runtime,
        sif_runtime=args.sif_runtime,
        labels=labels,
        search_registries=tuple(args.search_registry) or ("docker.io",),
        insecure_registries=tuple(args.insecure_registry),
        userns_base=args.userns_base,
        pod_network=not args.no_pod_network,
        pod_pool=args.pod_pool,
        pod_subnet=args.pod_subnet,
        deny_networks=(*DENY, *args.deny_network),
        host_network=args.host_network or "",
        image_dir=args.image_dir,
        oversubscribe=args.oversubscribe,
        volume_roots=tuple(args.volume_root),
        shared_roots=shared_roots,
        cache_dir=args.cache_dir,
    )
    try:
        runtimes = available(args.data_dir, config.userns, weak=args.weak_runtimes or args.clean_up)
        agent = Agent(config, inventory, runtimes)
        if args.clean_up:
            for task_id in agent.clean_up():
                print(f"killed task {task_id}")
            return 0
        agent.start()
    except (ConfinementError, NetworkError) as exc:
        print(f"substrate: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()  # exec and port-forward move MiB-sized messages
    try:
        server, port = create_server(agent, args.listen, tls=tls)
    except RuntimeError as exc:  # grpc: a key that does not match its certificate, and such
        print(f"substrate: cannot serve TLS: {exc}", file=sys.stderr)
        agent.stop()
        return 2
    try:
        agent.serving(port)
    except NetworkError as exc:
        print(f"substrate: {exc}", file=sys.stderr)
        server.stop(grace=0)
        agent.stop()
        return 2
    if args.interruption_notices:
        cloud, _, base = args.interruption_notices.partition("=")
        try:
            agent.interruptions = InterruptionWatch(cloud, base)
        except ValueError as exc:
            print(f"substrate: --interruption-notices: {exc}", file=sys.stderr)
            server.stop(grace=0)
            agent.stop()
            return 2
        agent.interruptions.start()
    host = args.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.owner_pid:
        threading.Thread(target=_watch_owner, args=(args.owner_pid, stop), daemon=True).start()
    stop.wait()
    server.stop(grace=2).wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
