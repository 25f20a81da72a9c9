"""`squall doctor`: what this orchestrator can reach, checked without changing anything."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .provision.cloud import CloudSettings
from .provision.credentials import CREDENTIALS
from .provision.stacks import INSTALL_HINT, SDK_HINT, StackSettings, pulumi_cli

__all__ = ["Check", "checks"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def checks(data_dir: Path) -> list[Check]:
    out = [_sdk(), _cli(), _backend(StackSettings.from_environment(data_dir))]
    out += [_credentials(cloud) for cloud in ("aws", "gcp", "azure")]
    settings = CloudSettings.from_environment()
    for cloud in ("aws", "gcp", "azure"):
        missing = settings.missing(cloud)
        out.append(
            Check(
                f"{cloud} cluster settings",
                not missing,
                "; ".join(missing) if missing else f"node image {settings.images[cloud]}",
            )
        )
    return out


def _sdk() -> Check:
    try:
        import pulumi

        del pulumi
    except ImportError:
        return Check("pulumi SDK", False, SDK_HINT)
    from importlib.metadata import version

    return Check("pulumi SDK", True, f"pulumi {version('pulumi')}")


def _cli() -> Check:
    cli = pulumi_cli()
    if cli is None:
        return Check("pulumi CLI", False, INSTALL_HINT)
    try:
        found = subprocess.run(
            [cli, "version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("pulumi CLI", False, f"{cli} does not run: {exc}")
    return Check("pulumi CLI", True, f"{cli} {found}")


def _backend(settings: StackSettings) -> Check:
    url = settings.backend
    if settings.backend_url is None:
        folder = settings.state_dir
        parent = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        ok = os.access(parent, os.W_OK)
        return Check("stack backend", ok, url + ("" if ok else f" ({parent} is not writable)"))
    return Check("stack backend", True, url + " ($SQUALL_PULUMI_BACKEND)")


def _credentials(cloud: str) -> Check:
    found, detail = CREDENTIALS[cloud]()
    return Check(f"{cloud} credentials", found, detail)
