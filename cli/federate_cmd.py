"""`squall federate compare` and `squall catalog show|search`: what a workflow would cost at
every site, and the instance types behind the figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .output import Format, die, err, escape, out, print_json

if TYPE_CHECKING:
    from federate.catalog import Catalog
    from orchestrator.store import Store

__all__ = ["catalog_app", "federate_app"]

federate_app = typer.Typer(
    help="Price a workflow at every site (compute, egress, data locality) under a policy.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
catalog_app = typer.Typer(
    help="Browse the price catalog: instance types, prices, fabrics and egress fees.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

CATALOG = typer.Option(
    None,
    "--catalog",
    help="A catalog folder (Squall's JSON files, or the snapshot's instances.csv and "
    "egress.csv). Default: $SQUALL_CATALOG, else the catalog shipped with Squall.",
)
OUTPUT = typer.Option(Format.text, "--output", "-o", help="text for people, json for scripts.")


def _catalog_folder(path: Path | None) -> Path | None:
    """--catalog, else $SQUALL_CATALOG, else None (the shipped catalog)."""
    if path is not None:
        return path
    return Path(os.environ["SQUALL_CATALOG"]) if os.environ.get("SQUALL_CATALOG") else None


def _catalog(path: Path | None) -> Catalog:
    from federate.catalog import open_catalog
    from orchestrator.errors import Category

    folder = _catalog_folder(path)
    try:
        return open_catalog(folder)
    except (OSError, ValueError, KeyError) as exc:
        die(f"cannot read the catalog in {folder}: {exc}", Category.USAGE)


def _history() -> Store | None:
    """This machine's store, for the runtimes of earlier runs (as PLACING reads them), when
    there is one; compare never creates it."""
    from orchestrator.local_site import LocalSettings

    settings = LocalSettings()
    if not settings.store_url and not (settings.data_dir / "squall.db").exists():
        return None
    try:
        return settings.store()
    except Exception as exc:  # a store that cannot be opened: say so, price without it
        err.print(f"[yellow]warning[/]: runtimes of earlier runs left out: {escape(str(exc))}")
        return None


@federate_app.command()
def compare(
    file: Path = typer.Argument(..., help="The Fuzzfile.", show_default=False),
    policy_file: Path | None = typer.Option(
        None, "--policy", help="A team policy (YAML); default $SQUALL_POLICY."
    ),
    sites_file: Path | None = typer.Option(
        None, "--sites", help="On-prem sites (YAML); default $SQUALL_SITES."
    ),
    clouds_only: bool = typer.Option(
        False, "--clouds-only", help="Leave out this machine and the on-prem sites."
    ),
    catalog_dir: Path | None = CATALOG,
    bucket: list[str] = typer.Option(
        [], "--bucket", help="Where an s3 bucket lives: BUCKET=CLOUD:REGION (repeatable)."
    ),
    spot: bool | None = typer.Option(None, "--spot/--no-spot", help="Override the policy."),
    budget: float | None = typer.Option(
        None, "--budget", help="USD per run; overrides the policy."
    ),
    free_allowance: bool = typer.Option(
        False,
        "--free-allowance",
        help="Count the clouds' monthly free egress (off: a run should not rely on it).",
    ),
    name: str | None = typer.Option(
        None,
        "--name",
        help="The run's name, as `squall run --name` takes it: earlier runs named like it "
        "(me/pipeline-7 is like me/pipeline-3) give the jobs' runtimes. Default: USER/FILE-new.",
    ),
    offline: bool = typer.Option(
        False,
        "--offline",
        help="Do not ask the data sources for their sizes (nor buckets for their regions): "
        "annotations only.",
    ),
    output: Format = OUTPUT,
) -> None:
    """Price a workflow at every site and show the cheapest first, with why others are out.

    The same function PLACING uses (`squall run`, `squall server`), with the same
    configuration ($SQUALL_CATALOG or the shipped catalog, $SQUALL_POLICY, $SQUALL_SITES),
    the same runtimes of earlier runs and the same look at the data sources; the flags add
    to it. Each row: the instance type x nodes per job, compute $, data $ (ingress from where
    the data lives, egress to where results go, tiered), the total and the expected duration
    (the critical path). Figures that rest on guesses (runtimes without an annotation, sizes
    without metadata) are listed under the table.

    **Example**

        squall federate compare examples/pipeline.yaml --bucket data=aws:us-west-2
    """
    import getpass

    from orchestrator.errors import Category, SquallError, exit_code
    from orchestrator.fuzzfile import load_file
    from orchestrator.local_site import LocalSettings
    from orchestrator.placing import Placer
    from orchestrator.secrets import SecretStore

    from .output import print_diagnostic

    result = load_file(file)
    if not result.ok or result.workflow is None:
        for d in result.errors:
            print_diagnostic(d)
        die(f"{file} is not a valid Fuzzfile", Category.INVALID)
    buckets = {}
    for item in bucket:
        key, sep, where = item.partition("=")
        if not sep or ":" not in where:
            die(f"{item!r}: write BUCKET=CLOUD:REGION, e.g. data=aws:us-west-2", Category.USAGE)
        buckets[key] = where
    store = _history()
    data_dir = LocalSettings().data_dir
    secrets = (
        SecretStore(store, data_dir / "secrets.key", legacy_dir=data_dir / "secrets")
        if store is not None
        else None
    )
    placer = Placer.from_environment(secrets=secrets, store=store)
    placer.catalog_dir = _catalog_folder(catalog_dir)
    placer.policy_file = policy_file or placer.policy_file
    placer.sites_file = sites_file or placer.sites_file
    placer.buckets = buckets
    placer.spot, placer.budget_usd = spot, budget
    placer.free_allowance, placer.clouds_only = free_allowance, clouds_only
    placer.look_up_sources = not offline
    try:
        comparison = placer.compare(result.workflow, name or f"{getpass.getuser()}/{file.stem}-new")
    except SquallError as exc:
        die(str(exc), exc.category)
    data = comparison.as_dict()
    if output is Format.json:
        print_json(data)
    else:
        _table(data["sites"], f"{data['catalog_date']} ({data['catalog']})")
    if data["chosen"] is None:
        raise typer.Exit(exit_code(Category.INVALID))


def _table(rows: list[dict[str, Any]], date: str) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, title=f"catalog of {date}", title_justify="left")
    columns = ("SITE", "INSTANCES", "COMPUTE $", "DATA $", "STORAGE $", "TOTAL $", "HOURS")
    for column in (*columns, "WHY NOT"):
        table.add_column(column, overflow="fold")
    for r in rows:
        instances = ", ".join(f"{j['job']}: {j['instance']} x{j['nodes']}" for j in r["jobs"])
        style = "" if r["feasible"] else "dim"
        table.add_row(
            escape(r["site"]),
            escape(instances),
            f"{r['compute_usd']:,.2f}",
            f"{r['data_usd']:,.2f}",
            f"{r['storage_usd']:,.2f}" + (f" {r['storage']}" if r["storage"] else ""),
            f"{r['total_usd']:,.2f}",
            f"{r['hours']:.1f}",
            escape("; ".join(r["reasons"])),
            style=style,
        )
    out.print(table)
    best = next((r for r in rows if r["feasible"]), None)
    if best is not None:
        out.print(f"chosen: [bold]{escape(best['site'])}[/] at ${best['total_usd']:,.2f}")
        for guess in best["guesses"]:
            out.print(f"  [yellow]guess[/]: {escape(guess)}")
    else:
        out.print("[bold red]no site is feasible[/]")


def _freshness(catalog: Catalog) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Per cloud: its date, age, sources and notes; and a warning when any is old."""
    from federate.catalog import STALE_DAYS, age_days

    clouds = {}
    for cloud, meta in sorted(catalog.meta.items()):
        age = age_days(meta.date)
        clouds[cloud] = {
            "date": meta.date,
            "age_days": age,
            "stale": age is None or age > STALE_DAYS,
            "sources": list(meta.sources),
            "notes": list(meta.notes),
        }
    old = [c for c, v in clouds.items() if v["stale"]]
    if not old:
        return clouds, None
    ages = ", ".join(
        f"{c} {clouds[c]['date']}"
        + (f" ({clouds[c]['age_days']} days)" if clouds[c]["age_days"] is not None else "")
        for c in old
    )
    warning = (
        f"prices older than {STALE_DAYS} days: {ages}. Refresh them (needs network) with "
        f"`squall catalog refresh --cloud {old[0]} --catalog DIR` for each cloud (a new DIR "
        "starts from the catalog shipped with Squall), then set SQUALL_CATALOG=DIR"
    )
    return clouds, warning


@catalog_app.command()
def show(
    catalog_dir: Path | None = CATALOG,
    output: Format = OUTPUT,
) -> None:
    """Say which catalog is in use (--catalog, $SQUALL_CATALOG, else the one shipped with
    Squall), the date and sources of each cloud's figures (with a warning when they are old),
    and per region how many types and the fee to the internet."""
    from rich.table import Table

    catalog = _catalog(catalog_dir)
    clouds, warning = _freshness(catalog)
    regions = catalog.regions()
    rows: list[dict[str, Any]] = [
        {
            "cloud": cloud,
            "region": region,
            "types": len(catalog.types_in(cloud, region)),
            "internet_usd_per_gb": next(
                (t.usd_per_gb for t in catalog.egress[(cloud, region)].internet if t.usd_per_gb),
                None,
            )
            if (cloud, region) in catalog.egress
            else None,
        }
        for cloud, region in regions
    ]
    if warning:
        err.print(f"[yellow]warning[/]: {escape(warning)}")
    if output is Format.json:
        print_json(
            {
                "catalog": catalog.origin,
                "date": catalog.date,
                "clouds": clouds,
                "warning": warning,
                "regions": rows,
            }
        )
        return
    out.print(f"catalog: [bold]{escape(catalog.origin)}[/]")
    for cloud, info in clouds.items():
        age = f" ({info['age_days']} days old)" if info["age_days"] is not None else ""
        out.print(f"  {cloud}: data of {info['date']}{age}")
        for source in info["sources"]:
            out.print(f"    [dim]source: {escape(source)}[/]")
    table = Table(
        box=None, pad_edge=False, title=f"catalog of {catalog.date}", title_justify="left"
    )
    for column in ("CLOUD", "REGION", "TYPES", "INTERNET $/GB"):
        table.add_column(column)
    for r in rows:
        fee = r["internet_usd_per_gb"]
        table.add_row(r["cloud"], r["region"], str(r["types"]), f"{fee:.4f}" if fee else "")
    out.print(table)


@catalog_app.command()
def search(
    catalog_dir: Path | None = CATALOG,
    cloud: str | None = typer.Option(None, "--cloud", help="aws, gcp or azure."),
    region: str | None = typer.Option(None, "--region"),
    gpu: str | None = typer.Option(None, "--gpu", help="A GPU model, e.g. H100."),
    min_cores: int = typer.Option(0, "--min-cores", help="At least this many vCPUs."),
    min_memory: float = typer.Option(0, "--min-memory", help="At least this many GiB."),
    fabric: str | None = typer.Option(None, "--fabric", help="efa, infiniband, gpudirect-..."),
    limit: int = typer.Option(20, "--limit", help="Show the N cheapest."),
    output: Format = OUTPUT,
) -> None:
    """Find instance types, cheapest on-demand first.

    **Example**

        squall catalog search --gpu H100 --fabric efa
    """
    from rich.table import Table

    from federate.placement import gpu_matches

    catalog = _catalog(catalog_dir)
    found = [
        t
        for t in catalog.instances
        if (cloud is None or t.cloud == cloud)
        and (region is None or t.region == region)
        and (gpu is None or (t.gpu_count and gpu_matches(gpu, t.gpu_model)))
        and t.vcpus >= min_cores
        and t.memory_gib >= min_memory
        and (fabric is None or t.fabric == fabric)
    ]
    found.sort(key=lambda t: (t.price_ondemand is None, t.price_ondemand or 0, t.name))
    found = found[:limit]
    if output is Format.json:
        print_json(
            [
                {
                    k: getattr(t, k)
                    for k in (
                        "cloud",
                        "region",
                        "name",
                        "vcpus",
                        "memory_gib",
                        "gpu_model",
                        "gpu_count",
                        "price_ondemand",
                        "price_spot",
                        "fabric",
                        "efa_interfaces",
                        "source",
                    )
                }
                for t in found
            ]
        )
        return
    table = Table(box=None, pad_edge=False)
    for column in ("CLOUD", "REGION", "TYPE", "VCPUS", "GIB", "GPUS", "FABRIC", "$/H", "SPOT $/H"):
        table.add_column(column)
    for t in found:
        gpus = f"{t.gpu_count:g} x {t.gpu_model}" if t.gpu_count else ""
        table.add_row(
            t.cloud,
            t.region,
            t.name,
            str(t.vcpus),
            f"{t.memory_gib:g}",
            gpus,
            t.fabric + (f" x{t.efa_interfaces}" if t.efa_interfaces else ""),
            f"{t.price_ondemand:.3f}" if t.price_ondemand is not None else "",
            f"{t.price_spot:.3f}" if t.price_spot is not None else "",
        )
    out.print(table)


@catalog_app.command()
def refresh(
    cloud: str = typer.Option(..., "--cloud", help="aws, gcp or azure."),
    catalog_dir: Path | None = typer.Option(
        None,
        "--catalog",
        help="The folder to write (Squall's format). Default: $SQUALL_CATALOG. A new or "
        "empty folder starts from the catalog shipped with Squall.",
    ),
) -> None:
    """Update a catalog's prices from the cloud's public pricing API.

    AWS: the Price List bulk files (no account). Azure: the Retail Prices API (no account).
    GCP: the Cloud Billing Catalog API (an API key in $GOOGLE_API_KEY). Every row that
    changes records the source and today's date, and so does the cloud's header. Needs
    network access; without it the refresh fails with the host it could not reach and the
    catalog stays as it was. The shipped catalog is never changed: point $SQUALL_CATALOG at
    the folder to use what the refresh wrote.

    **Example**

        squall catalog refresh --cloud aws --catalog ~/squall-catalog
        export SQUALL_CATALOG=~/squall-catalog
    """
    from federate.refresh import RefreshError, http_fetch
    from federate.refresh import refresh as run_refresh
    from orchestrator.errors import Category

    folder = _catalog_folder(catalog_dir)
    if folder is None:
        die(
            "refresh writes into a folder of its own: give --catalog DIR (a new folder starts "
            "from the catalog shipped with Squall), then set SQUALL_CATALOG=DIR to use it",
            Category.USAGE,
        )
    if cloud not in ("aws", "gcp", "azure"):
        die(f"unknown cloud {cloud!r}: aws, gcp or azure", Category.USAGE)
    try:
        changed = run_refresh(folder, cloud, http_fetch)
    except (RefreshError, OSError, ValueError) as exc:
        die(str(exc), Category.SERVER)  # a price source could not be read
    out.print(f"{cloud}: {changed} row(s) changed in {escape(str(folder))}")
    if os.environ.get("SQUALL_CATALOG") != str(folder):
        out.print(f"use it: export SQUALL_CATALOG={escape(str(folder))}")
