"""`squall server`: serve the control-plane API and run the workflows it is given."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from .output import die, err

__all__ = ["server"]


def server(
    listen: str = typer.Option("127.0.0.1:7433", "--listen", help="HOST:PORT (port 0: any)."),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="File holding the token clients must send. Default: DATA/server-token, made "
        "(0600) on first start.",
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate chain."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key."),
    nodes: int = typer.Option(
        1,
        "--nodes",
        min=1,
        help="Nodes per local cluster: more than one are separate, as `squall run --nodes`.",
    ),
    oversubscribe: int = typer.Option(
        1,
        "--oversubscribe",
        min=1,
        metavar="K",
        help="Let each local agent lease every core to up to K tasks at once (as Slurm's "
        "OverSubscribe=FORCE:K); memory and GPUs are never shared.",
    ),
    search_registry: list[str] = typer.Option([], "--search-registry", help="See `squall run`."),
    insecure_registry: list[str] = typer.Option(
        [], "--insecure-registry", help="See `squall run`."
    ),
    egress_dir: list[Path] = typer.Option(
        [],
        "--egress-dir",
        help="A folder `file:///` egress may write into (repeatable). Without one, workflows "
        "started through this server cannot write files on its machine.",
    ),
    schedules: bool = typer.Option(
        True,
        "--schedules/--no-schedules",
        help="Fire the store's schedules (`squall schedule`); off: another process does.",
    ),
    access_policy: Path | None = typer.Option(
        None,
        "--access-policy",
        help="YAML granting verbs to users and groups on workflow names and sites (README "
        '"Access"). Default: each user acts on its own runs only.',
    ),
) -> None:
    """Serve Squall's gRPC control-plane API; run each started workflow on the local site.

    Every call must carry a user's token, is checked against the access policy and written
    to the audit log. The token file's token belongs to the admin user `admin`, who adds
    the others (`squall admin user add`). Without --tls-cert/--tls-key the API is
    plaintext: keep it on loopback. On start, runs left behind by a server that died are torn down
    and failed with the reason; on SIGTERM or Ctrl-C, the runs this server owns are
    cancelled and their clusters taken down before it exits. A workflow's `file:///`
    egress writes on this machine, as this server's user: only under an --egress-dir.
    The server also fires the schedules of its store (`squall schedule --help`).

    **Examples**

        squall server --listen 127.0.0.1:7433
        squall login --server 127.0.0.1:7433 \\
            --token-file "${SQUALL_DATA_DIR:-$HOME/.local/share/squall}/server-token"
        squall admin user add alice --group chem | squall login --server 127.0.0.1:7433 \\
            --context alice
    """
    import logging
    import signal
    import threading

    from orchestrator.api import serve
    from orchestrator.api.iam import DEFAULT, load_access_policy
    from orchestrator.errors import SquallError
    from orchestrator.local_site import local_scheduler
    from orchestrator.placing import Placer
    from orchestrator.run_threads import RunThreads

    from .run_cmd import start_local_engine

    if (tls_cert is None) != (tls_key is None):
        die("give both --tls-cert and --tls-key, or neither")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        policy = load_access_policy(access_policy) if access_policy else DEFAULT
        unknown = policy.unknown_sites(Placer.from_environment(local_nodes=nodes).site_names())
        if unknown:
            err.print(
                f"[yellow]warning:[/] {escape(str(access_policy))} names sites that no site "
                f"file or catalog has: {escape(', '.join(unknown))} (runs cannot go there)"
            )
        egress_dirs = [d.resolve() for d in egress_dir]
        engine = start_local_engine(
            nodes, None, search_registry, insecure_registry, egress_dirs, oversubscribe
        )
        token = _token(token_file or engine.data_dir / "server-token", create=token_file is None)
        tls = (tls_cert.read_bytes(), tls_key.read_bytes()) if tls_cert and tls_key else None
        runs = RunThreads(engine)
        scheduler = local_scheduler(engine, runs, nodes) if schedules else None
        grpc_server, port, servicer = serve(
            engine, listen, token, tls=tls, runs=runs, policy=policy
        )
    except (SquallError, ValueError, OSError) as exc:
        die(str(exc), exc.category if isinstance(exc, SquallError) else None)
    host = listen.rsplit(":", 1)[0]
    print(f"serving on {host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if scheduler is not None:  # it looks again within a tick of `stop`, or is left behind
        threading.Thread(target=scheduler.run, args=(stop,), name="schedules", daemon=True).start()
    stop.wait()
    err.print("stopping: cancelling the runs this server owns...")
    servicer.shutdown()
    grpc_server.stop(grace=5).wait()
    servicer.gate.close()  # open streams were checked until the server stopped serving


def _token(path: Path, *, create: bool) -> str:
    import secrets

    if path.exists():
        token = path.read_text().strip()
        if not token:
            die(f"{path} is empty")
        return token
    if not create:
        die(f"no token file at {path}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    err.print(f"made a token for clients in {path}")
    return token
