"""`squall federate compare` and `squall catalog show|search`: what a workflow would cost at
every site, and the instance types behind the figures."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from .output import EXIT_INVALID, EXIT_USAGE, Format, die, out, print_json

if TYPE_CHECKING:
    from federate.catalog import Catalog

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
    help="A catalog folder (instances.csv, egress.csv). Default: $SQUALL_CATALOG.",
)
OUTPUT = typer.Option(Format.text, "--output", "-o", help="text for people, json for scripts.")


def _catalog_folder(path: Path | None) -> Path:
    """--catalog, else $SQUALL_CATALOG."""
    folder = path or (
        Path(os.environ["SQUALL_CATALOG"]) if os.environ.get("SQUALL_CATALOG") else None
    )
    if folder is None:
        die("no catalog: give --catalog DIR or set SQUALL_CATALOG", EXIT_USAGE)
    return folder


def _catalog(path: Path | None) -> Catalog:
    from federate.catalog import load

    folder = _catalog_folder(path)
    try:
        return load(folder)
    except (OSError, ValueError, KeyError) as exc:
        die(f"cannot read the catalog in {folder}: {exc}", EXIT_USAGE)


@federate_app.command()
def compare(
    file: Path = typer.Argument(..., help="The Fuzzfile.", show_default=False),
    policy_file: Path | None = typer.Option(None, "--policy", help="A team policy (YAML)."),
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
    output: Format = OUTPUT,
) -> None:
    """Price a workflow at every site and show the cheapest first, with why others are out.

    Each row: the instance type x nodes per job, compute $, data $ (ingress from where the
    data lives, egress to where results go, tiered), the total and the expected duration
    (the critical path). Figures that rest on guesses (runtimes without an annotation,
    sizes without metadata) are listed under the table.

    **Example**

        squall federate compare train.yaml --catalog catalog/ --bucket data=aws:us-west-2
    """
    from federate.placement import cloud_sites
    from federate.placement import compare as compare_sites
    from federate.policy import Policy, PolicyError, load_policy
    from federate.sites import bucket_locations
    from orchestrator.errors import SquallError
    from orchestrator.federation import workload_of
    from orchestrator.fuzzfile import load_file
    from orchestrator.placing import candidate_sites

    from .output import print_diagnostic

    result = load_file(file)
    if not result.ok or result.workflow is None:
        for d in result.errors:
            print_diagnostic(d)
        die(f"{file} is not a valid Fuzzfile", EXIT_INVALID)
    catalog = _catalog(catalog_dir)
    if sites_file is None and os.environ.get("SQUALL_SITES"):
        sites_file = Path(os.environ["SQUALL_SITES"])
    try:
        policy = load_policy(policy_file) if policy_file else Policy()
    except PolicyError as exc:
        die(str(exc), EXIT_USAGE)
    if spot is not None:
        policy = replace(policy, spot=spot)
    if budget is not None:
        policy = replace(policy, budget_usd=budget)
    try:
        buckets = bucket_locations(sites_file) if sites_file else {}
    except PolicyError as exc:
        die(str(exc), EXIT_USAGE)
    for item in bucket:
        name, sep, where = item.partition("=")
        if not sep or ":" not in where:
            die(f"{item!r}: write BUCKET=CLOUD:REGION, e.g. data=aws:us-west-2", EXIT_USAGE)
        buckets[name] = where
    try:
        workload = workload_of(result.workflow, file.stem, buckets)
    except SquallError as exc:
        die(str(exc), exc.exit_code)
    try:
        sites = candidate_sites(catalog, sites_file) if not clouds_only else cloud_sites(catalog)
    except PolicyError as exc:
        die(str(exc), EXIT_USAGE)
    estimates = compare_sites(workload, catalog, sites, policy, free_allowance=free_allowance)
    rows = [_row(e) for e in estimates]
    if output is Format.json:
        print_json({"catalog_date": catalog.date, "workflow": workload.name, "sites": rows})
    else:
        _table(rows, catalog.date)
    if not any(r["feasible"] for r in rows):
        raise typer.Exit(EXIT_INVALID)


def _row(e: Any) -> dict[str, Any]:
    return {
        "site": e.site.name,
        "feasible": e.feasible,
        "reasons": e.reasons,
        "jobs": [
            {
                "job": p.job,
                "instance": p.instance,
                "nodes": p.nodes,
                "hours": p.hours,
                "usd_per_hour": p.usd_per_hour,
                "spot": p.spot,
                "cost_usd": round(p.cost, 4),
                "runtime_source": p.runtime_source,
            }
            for p in e.jobs
        ],
        "compute_usd": round(e.compute_usd, 4),
        "data_usd": round(e.data_usd, 4),
        "total_usd": round(e.total_usd, 4),
        "hours": e.hours,
        "guesses": e.guesses,
    }


def _table(rows: list[dict[str, Any]], date: str) -> None:
    table = Table(box=None, pad_edge=False, title=f"catalog of {date}", title_justify="left")
    for column in ("SITE", "INSTANCES", "COMPUTE $", "DATA $", "TOTAL $", "HOURS", "WHY NOT"):
        table.add_column(column, overflow="fold")
    for r in rows:
        instances = ", ".join(f"{j['job']}: {j['instance']} x{j['nodes']}" for j in r["jobs"])
        style = "" if r["feasible"] else "dim"
        table.add_row(
            escape(r["site"]),
            escape(instances),
            f"{r['compute_usd']:,.2f}",
            f"{r['data_usd']:,.2f}",
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


@catalog_app.command()
def show(
    catalog_dir: Path | None = CATALOG,
    output: Format = OUTPUT,
) -> None:
    """Summarise the catalog: its date, and per region how many types and the fee to the
    internet."""
    catalog = _catalog(catalog_dir)
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
    if output is Format.json:
        print_json({"date": catalog.date, "regions": rows})
        return
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
    catalog_dir: Path | None = CATALOG,
) -> None:
    """Update the catalog's prices from the cloud's public pricing API.

    AWS: the Price List bulk files (no account). Azure: the Retail Prices API (no account).
    GCP: the Cloud Billing Catalog API (an API key in $GOOGLE_API_KEY). Every row that
    changes records the source and today's date. Needs network access; without it the
    refresh fails with the host it could not reach and the catalog stays as it was.
    """
    from federate.refresh import RefreshError, http_fetch
    from federate.refresh import refresh as run_refresh

    folder = _catalog_folder(catalog_dir)
    if cloud not in ("aws", "gcp", "azure"):
        die(f"unknown cloud {cloud!r}: aws, gcp or azure", EXIT_USAGE)
    try:
        changed = run_refresh(folder, cloud, http_fetch)
    except RefreshError as exc:
        die(str(exc), 3)
    out.print(f"{cloud}: {changed} row(s) changed in {escape(str(folder))}")
