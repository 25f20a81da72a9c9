"""Write the README's table of what Squall does with every public Fuzzfile of the corpus:
the ten v1 examples of the Fuzzball examples repository and the 42 templates of the Fuzzball
application catalog, rendered with their own values.

    python scripts/fidelity-table.py            # rewrite the table in README.md
    python scripts/fidelity-table.py --check    # exit 1 if README.md is out of date

For each workflow, in the order the engine meets them: refused at validation (with the
file, line, field and why), refused when submitted (what the engine cannot run yet), or
placed by federation, the same code PLACING runs, with the catalog shipped with Squall and
no policy: "runs here" when this machine is the choice, else the cloud region, instance
types and price it would run at; "no site can run it yet" when only what a site's provider
declares it cannot do yet (cloud nodes get no volumes yet) keeps it out, with the site it
would go to then. "Here" is a reference machine (CORES, MEMORY_GIB), so the
table does not change with the machine that writes it. Secrets a workflow needs before it
starts, and SIF images (run under crun), are named.

There is no "ignored" column: a field is honoured, or refused at validation.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federate.catalog import Catalog  # noqa: E402
from federate.placement import Site, SiteEstimate, cloud_sites  # noqa: E402
from federate.sites import local_site  # noqa: E402
from orchestrator.fuzzfile import LoadResult, load_file, load_text  # noqa: E402
from orchestrator.fuzzfile.model import Workflow  # noqa: E402
from orchestrator.placing import Placer  # noqa: E402
from orchestrator.secrets import referenced_secrets  # noqa: E402
from tests.conftest import catalog_apps, example_files  # noqa: E402
from tests.fuzzfile.test_corpus import _render  # noqa: E402

README = ROOT / "README.md"
START = "<!-- fidelity-table: written by scripts/fidelity-table.py, do not edit -->"
END = "<!-- fidelity-table: end -->"
CORES, MEMORY_GIB = 16, 64  # "here": a workstation with no GPU


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    outcome: str  # runs here | would run at ... | refused at validation | refused at submit
    detail: str


class _ReferencePlacer(Placer):
    """PLACING as it is, with the reference machine standing for this one."""

    def _sites(self, catalog: Catalog) -> list[Site]:
        return [local_site(cores=CORES, memory_gib=MEMORY_GIB), *cloud_sites(catalog)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT / "tests" / "corpus"))


def describe(name: str, result: LoadResult) -> Row:
    if not result.ok or result.workflow is None:
        first = result.errors[0].render().splitlines()[0]
        return Row(name, "refused at validation", first)
    wf: Workflow = result.workflow
    notes = []
    secrets = referenced_secrets(wf)
    if secrets:
        notes.append("needs secrets set first: " + ", ".join(secrets))
    if any(c.image.uri.startswith("oras://") for c in wf.containers.values()):
        notes.append("SIF image, run under crun")
    comparison = _ReferencePlacer(look_up_sources=False).compare(wf, "corpus/" + name)
    chosen = comparison.chosen
    if chosen is None:
        # the sites that only a gap their provider declares keeps out: where it would go next
        waiting = [
            e
            for e in comparison.estimates
            if e.reasons and set(e.reasons) <= {why for _, why in e.site.cannot}
        ]
        if waiting:
            best = min(waiting, key=lambda e: e.total_usd)
            then = f"then {best.site.name} for ${best.total_usd:,.2f} ({_shapes(best)})"
            return Row(
                name, f"no site can run it yet: {best.reasons[0]}", "; ".join([then, *notes])
            )
        reasons = sorted({r for e in comparison.estimates for r in e.reasons})
        return Row(name, "no site can run it", "; ".join(reasons[:3] + notes))
    if chosen.site.name == "local":
        return Row(name, "runs here", "; ".join(notes) or "")
    price = f"${chosen.total_usd:,.2f}"
    return Row(
        name,
        f"would run at {chosen.site.name} for {price}",
        "; ".join([_shapes(chosen), *notes]),
    )


def _shapes(e: SiteEstimate) -> str:
    return ", ".join(sorted({f"{p.job}: {p.instance} x{p.nodes}" for p in e.jobs}))


def rows() -> Iterator[Row]:
    for path in example_files():
        yield describe(_relative(path), load_file(path))
    for app in catalog_apps():
        name = f"catalog/{app.name}"
        yield describe(name, load_text(_render(app), f"{_relative(app)}/template.yaml (rendered)"))


def table() -> str:
    lines = [
        START,
        "",
        f'"Here" is a {CORES}-core, {MEMORY_GIB} GiB machine with no GPU, and "runs here" means '
        "that federation places the run on it and the engine takes it; the images come from "
        "the public registries the workflows name (Docker Hub, NGC, ...), which the machine "
        "must reach. Prices: the catalog shipped with Squall, no policy, one run. Secrets are "
        "set with `squall secret set`.",
        "",
        "| workflow | what Squall does | details |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{r.name}` | {_cell(r.outcome)} | {_cell(r.detail)} |" for r in rows()]
    lines += ["", END]
    return "\n".join(lines)


def updated(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START!r} ... {END!r} block to fill")
    before = readme.split(START, 1)[0]
    after = readme.split(END, 1)[1]
    return before + table() + after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    new = updated(current)
    if args.check:
        if new != current:
            diff = difflib.unified_diff(
                current.splitlines(), new.splitlines(), "README.md", "written", lineterm=""
            )
            print("\n".join(diff))
            print("README.md is out of date: run python scripts/fidelity-table.py")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
