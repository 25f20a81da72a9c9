"""`squall doctor`: what this orchestrator can reach (cloud tooling, credentials, backend)."""

from __future__ import annotations

import typer

from .output import Format, escape, out, print_json

__all__ = ["doctor"]


def doctor(
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """Check what cloud sites need: the Pulumi SDK and CLI, the stack backend, credentials
    per cloud, and this orchestrator's cluster settings. Changes nothing. The local site
    needs none of it.

    **Examples**

        squall doctor
        squall doctor -o json | jq '.[] | select(.ok | not)'
    """
    from orchestrator.doctor import checks
    from orchestrator.local_site import LocalSettings

    found = checks(LocalSettings().data_dir)
    if output is Format.json:
        print_json([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in found])
        return
    width = max(len(c.name) for c in found)
    for c in found:
        mark = "[green]ok[/]     " if c.ok else "[yellow]missing[/]"
        out.print(f"{mark} {c.name:<{width}}  {escape(c.detail)}")
