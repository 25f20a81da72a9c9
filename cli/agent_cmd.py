"""`squall agent`: start a substrate node agent on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from .output import die


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "squall" / "agent"


def agent(
    listen: str = typer.Option("127.0.0.1:0", help="HOST:PORT to serve on (port 0: any free)."),
    data_dir: Path = typer.Option(None, help="Task state and logs [default: XDG data dir]."),
    token_file: Path = typer.Option(
        None, help="File holding the token callers must send (or set SQUALL_AGENT_TOKEN)."
    ),
    tls_cert: Path = typer.Option(
        None, help="Serve mutual TLS with this node certificate (PEM; with --tls-key, --tls-ca)."
    ),
    tls_key: Path = typer.Option(None, help="The node certificate's private key (PEM)."),
    tls_ca: Path = typer.Option(None, help="The CA (PEM) every caller's certificate must be of."),
    join: str = typer.Option(
        "",
        metavar="HOST:PORT",
        help="Join a run first: make this node's key, trade the token (--token-file) for a node "
        "certificate at this orchestrator's join service, and write the key, certificate and "
        "run CA to --tls-key, --tls-cert and --tls-ca (DIR/node.key, node.pem, ca.pem).",
    ),
    join_ca: Path = typer.Option(None, help="The CA (PEM) of the join service's certificate."),
    join_run: str = typer.Option("", help="The run this node joins."),
    join_group: str = typer.Option("", help="The node group this node is of."),
    join_index: int = typer.Option(
        -1, help="This node's place in its group, when its boot data names one (default: any)."
    ),
    join_timeout: float = typer.Option(600.0, help="Seconds to keep trying to join."),
    plaintext: bool = typer.Option(
        False, help="Serve without TLS on an address beyond loopback (the token goes in clear)."
    ),
    volume_root: list[Path] = typer.Option(
        [], help="Folder beneath which volumes may be made, filled and read; repeatable."
    ),
    cache_dir: Path = typer.Option(None, help="The ingress cache [default: DATA_DIR/cache]."),
    cpus: str = typer.Option(None, help="CPU ids this agent may lease, e.g. 0-3,8."),
    memory: str = typer.Option(None, help="Memory this agent may lease, e.g. 8GiB."),
    gpus: str = typer.Option(None, help="GPU indexes this agent may lease, e.g. 0,1."),
    default_runtime: str = typer.Option("", help="Runtime for requests that name none."),
    sif_runtime: str = typer.Option(
        "",
        help="Runtime for oras:// (SIF) images when a request names none [default: the "
        "default runtime; `apptainer` where Apptainer is installed].",
    ),
    label: list[str] = typer.Option([], help="KEY=VALUE label, repeatable."),
    search_registry: list[str] = typer.Option(
        [], help="Registry for unqualified image names, repeatable [default: docker.io]."
    ),
    insecure_registry: list[str] = typer.Option(
        [], help="Registry reached over plain HTTP, repeatable (local test registries)."
    ),
    weak_runtimes: bool = typer.Option(
        False,
        help="Also offer bwrap and process, which confine jobs less than crun (development).",
    ),
    pod_network: bool = typer.Option(
        True, help="Jobs get a namespace on the node's bridge; --no-pod-network: loopback only."
    ),
    deny_network: list[str] = typer.Option(
        [], help="CIDR jobs may never reach (the control plane's address), repeatable."
    ),
    host_network: str = typer.Option(
        "",
        metavar="ADDRESS",
        help="Let multi-node jobs' containers share this node's network (MPI over its own "
        "interfaces and fabric), reached at ADDRESS (`auto`: where the default route leaves "
        "from); kept from the agent's port and the denied networks. For a dedicated node.",
    ),
) -> None:
    """Run a node agent until interrupted.

    The agent serves the node API (leases, tasks, logs, exec, port-forward) over gRPC.
    Several agents can share one machine, each owning a slice given by --cpus and --memory.
    It prints `listening on HOST:PORT` first, then logs to stderr.

    Jobs run confined (crun: user namespace, seccomp, minimal capabilities, default
    devices, a network namespace of their own that cannot reach this machine); README.md
    says what a job can and cannot do to its node.

    **Examples**

        SQUALL_AGENT_TOKEN=s3cret squall agent --listen 127.0.0.1:7070
        squall agent --listen 10.0.0.5:7431 --token-file token --tls-cert node.pem \
            --tls-key node.key --tls-ca run-ca.pem --volume-root /var/lib/squall/volumes
        squall agent --token-file token --cpus 0-1 --memory 4GiB --data-dir /tmp/a1
        squall agent --listen 0.0.0.0:7431 --token-file token --join 10.0.0.1:7443 \
            --join-ca join-ca.pem --join-run RUN --join-group ring \
            --tls-cert tls/node.pem --tls-key tls/node.key --tls-ca tls/ca.pem
    """
    from orchestrator.fuzzfile.units import UnitError, parse_size
    from substrate.__main__ import main as substrate_main

    argv = ["--listen", listen, "--data-dir", str(data_dir or _default_data_dir())]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca)):
        if path is not None:
            argv += [flag, str(path)]
    if plaintext:
        argv.append("--plaintext")
    if join:
        argv += ["--join", join, "--join-run", join_run, "--join-group", join_group]
        argv += ["--join-timeout", str(join_timeout)]
        if join_index >= 0:
            argv += ["--join-index", str(join_index)]
    if join_ca is not None:
        argv += ["--join-ca", str(join_ca)]
    for root in volume_root:
        argv += ["--volume-root", str(root)]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    if cpus:
        argv += ["--cpus", cpus]
    if memory:
        try:
            argv += ["--memory-bytes", str(parse_size(memory))]
        except UnitError as exc:
            die(f"--memory: {exc}")
    if gpus:
        argv += ["--gpus", gpus]
    if default_runtime:
        argv += ["--default-runtime", default_runtime]
    if sif_runtime:
        argv += ["--sif-runtime", sif_runtime]
    if weak_runtimes:
        argv.append("--weak-runtimes")
    if not pod_network:
        argv.append("--no-pod-network")
    if host_network:
        argv += ["--host-network", host_network]
    for flag, values in (
        ("--label", label),
        ("--search-registry", search_registry),
        ("--insecure-registry", insecure_registry),
        ("--deny-network", deny_network),
    ):
        for value in values:
            argv += [flag, value]
    raise typer.Exit(substrate_main(argv))
