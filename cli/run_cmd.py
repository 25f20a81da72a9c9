"""`squall run FILE`: run a workflow on this machine, in this process, and watch it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .live import watch
from .output import EXIT_RUN_FAILED, Format, die, err, escape, print_json

if TYPE_CHECKING:
    from orchestrator.engine import Engine
    from orchestrator.view_types import RunView

__all__ = ["run", "start_local_engine"]

SHOWN_LINES = 20  # of each job's output, at the end of a run


def start_local_engine(
    nodes: int,
    site: str | None,
    search: list[str],
    insecure: list[str],
    egress_dirs: list[Path] | None = None,
    oversubscribe: int = 1,
) -> Engine:
    """The local site's engine as the flags ask (registries default to the environment's),
    after failing and cleaning up any run whose orchestrator died. `egress_dirs`: where
    `file:///` egress may write (None: anywhere this process may)."""
    from orchestrator.local_site import LocalSettings, local_engine
    from orchestrator.recovery import recover

    settings = LocalSettings(
        nodes=nodes, site=site, egress_dirs=egress_dirs, oversubscribe=oversubscribe
    )
    if search:
        settings.search_registries = search
    if insecure:
        settings.insecure_registries = insecure
    engine = local_engine(settings)
    # this machine's provider only: a cloud stack is destroyed by `squall stack gc`
    home = [p for p in engine.providers if p.serves(engine.home)]
    for orphan, why in recover(engine.store, home, engine.staging):
        err.print(f"[yellow]recovered[/] {escape(orphan)}: {escape(why)}")
    return engine


def run(
    file: Path = typer.Argument(..., help="The Fuzzfile to run.", show_default=False),
    name: str | None = typer.Option(
        None, "--name", help="The run's name (default: USER/FILE-xxxx); must be unique."
    ),
    nodes: int = typer.Option(
        1,
        "--nodes",
        min=1,
        help="Nodes of the run's cluster. One (the default) may lease the whole machine; "
        "more are separate like a cluster's machines: each a network namespace with its own "
        "address on a bridge of the run's, its own hostname, a disjoint slice of the CPUs "
        "(shared in turn when there are more nodes than CPUs) and an equal share of the "
        "memory. Needs root; all of it is removed when the run ends.",
    ),
    oversubscribe: int = typer.Option(
        1,
        "--oversubscribe",
        min=1,
        metavar="K",
        help="Let each agent lease every core to up to K tasks at once (as Slurm's "
        "OverSubscribe=FORCE:K): K times as many tasks at once as cores, from one agent. "
        "For many short or waiting tasks; memory and GPUs are never shared.",
    ),
    search_registry: list[str] = typer.Option(
        [],
        "--search-registry",
        help="Registry for unqualified images like busybox:1.36 (repeatable; default docker.io "
        "or $SQUALL_SEARCH_REGISTRIES).",
    ),
    insecure_registry: list[str] = typer.Option(
        [],
        "--insecure-registry",
        help="Registry reached over plain HTTP, e.g. one on 127.0.0.1 (repeatable).",
    ),
    site: str | None = typer.Option(
        None,
        "--site",
        help="Force a site: `--site local` runs here whatever federation would choose, "
        "`--site aws:us-east-2` on that cloud region. Default: federation prices this machine, "
        "the sites in $SQUALL_SITES and the clouds of the catalog ($SQUALL_CATALOG, else the "
        "one shipped with Squall) under $SQUALL_POLICY, as `squall federate compare` shows.",
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        min=0.01,
        metavar="USD",
        help="Stop the run when it has spent this much (a site estimated above it is not "
        "chosen). Default: the policy's budget-usd, if any.",
    ),
    output: Format = typer.Option(
        Format.text, "--output", "-o", help="text: a live view; json: the run's summary at the end."
    ),
) -> None:
    """Run a workflow on the local site: agents on this machine, no server, no cloud.

    Squall starts substrate agents as child processes, makes the workflow's volumes, runs
    its ingress, pulls its images, runs its jobs and services in dependency order in
    containers, egresses the results and stops the agents. The view shows every job's
    state as it changes. Ctrl-C (or SIGTERM) cancels the run (the cluster is still taken down).

    Exits 0 when the run finished, 1 when it failed or was cancelled, 2 on bad usage.
    State, logs and volumes live under $SQUALL_DATA_DIR (default ~/.local/share/squall):
    `squall workflow status|log NAME` read them afterwards.

    **Examples**

        squall run examples/hello.yaml
        squall run examples/pipeline.yaml --name me/pipeline-1 -o json | jq .state
        squall run examples/array.yaml --oversubscribe 4   # 4 short tasks a core at once
        squall run examples/pipeline.yaml --budget 2.50    # cancelled once $2.50 is spent
    """
    import getpass
    import secrets
    import signal
    import threading

    from orchestrator.engine import request_cancel
    from orchestrator.errors import Category, SquallError, describe
    from orchestrator.fuzzfile import load_text
    from orchestrator.views import run_summary
    from orchestrator.views import watch as follow

    from .workflow_ops import read_fuzzfile

    text = read_fuzzfile(file)

    from .output import print_diagnostic

    checked = load_text(text, str(file))
    for d in checked.diagnostics:
        print_diagnostic(d)
    if not checked.ok:
        die(f"{file} is not a valid Fuzzfile; nothing was started", Category.INVALID)
    run_name = name or f"{getpass.getuser()}/{file.stem}-{secrets.token_hex(2)}"
    try:
        engine = start_local_engine(
            nodes, site, search_registry, insecure_registry, oversubscribe=oversubscribe
        )
        run_id = engine.submit(run_name, text, budget_usd=budget)
    except SquallError as exc:
        die(str(exc), exc.category)

    failure: list[BaseException] = []
    # an Event, not Thread.join/is_alive: a Ctrl-C that interrupts join() can leave the
    # thread looking finished while it still works
    ended = threading.Event()

    def work() -> None:
        try:
            engine.execute(run_id)
        except BaseException as exc:  # shown below; the run records its own reason
            failure.append(exc)
        finally:
            ended.set()

    worker = threading.Thread(target=work, name="engine", daemon=True)
    worker.start()
    live = output is Format.text and sys.stderr.isatty()
    # Ctrl-C asks for the cancel from a thread of its own: an exception raised wherever the
    # main thread happens to be (inside a store transaction) could leave the store locked
    cancelling = threading.Event()

    def interrupted(signum: int, frame: Any) -> None:
        if cancelling.is_set():
            return
        cancelling.set()
        err.print("[yellow]cancelling[/]: stopping the run and taking its cluster down...")
        threading.Thread(target=request_cancel, args=(engine.store, run_name), daemon=True).start()

    # a service manager's or `kill`'s SIGTERM too: the cluster comes down either way
    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if output is Format.text:  # the run is over when the engine returns, cluster down
            watch(follow(engine.store, run_id, owner_done=ended.is_set), live=live)
        else:
            while not ended.wait(0.25):  # short waits: Ctrl-C's handler runs between them
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ended.wait()
    if failure:
        cause = failure[0]
        why = cause.category if isinstance(cause, SquallError) else Category.INTERNAL
        die(f"the engine stopped: {describe(cause)}", why)
    summary = run_summary(engine.store, run_id)
    if output is Format.json:
        print_json(summary.to_json())
    else:
        _print_end(summary, engine.data_dir)
    if summary.state != "FINISHED":
        raise typer.Exit(EXIT_RUN_FAILED)


def _print_end(summary: RunView, data_dir: Path) -> None:
    from .output import out

    colour = "green" if summary.state == "FINISHED" else "bold red"
    reason = f": {escape(summary.reason)}" if summary.reason else ""
    out.print(f"[{colour}]{summary.state}[/] {escape(summary.name)}{reason}")
    logs = data_dir / "runs" / summary.id / "logs"
    for job in summary.jobs:
        if job.kind != "job" or job.tasks != 1 or not job.attempts:
            continue
        kept = logs / job.name / f"0.{job.attempts}.log"
        try:
            lines = kept.read_text(errors="replace").splitlines()
        except OSError:
            continue
        shown = lines[-SHOWN_LINES:]
        more = f" (last {len(shown)} of {len(lines)} lines)" if len(lines) > len(shown) else ""
        out.print(f"[bold]── {escape(job.name)}[/]{more}")
        for line in shown:
            out.print(escape(line), markup=False, highlight=False)
    if logs.is_dir():  # some task ran
        out.print(f"logs: squall workflow log {escape(summary.name)} JOB  ({escape(str(logs))})")
