"""`squall image export --warewulf`: the node image as `wwctl image import` takes it.

Warewulf 4 imports a file through its docker-archive reader (what `podman save` writes), and a
folder as a chroot (it must hold /bin/sh). Both carry what Warewulf needs to boot the image:
the kernel inside it (/boot/vmlinuz-VERSION, found by Warewulf since 4.6), its modules, an
init (/sbin/init, systemd), and /etc/warewulf/excludes (what Warewulf leaves out of the
image it serves: /boot/ among them, since the kernel is served apart).

    wwctl image import squall-node.tar squall-node     # Warewulf 4.6 (4.5: wwctl container)
    wwctl image import /srv/chroots/squall-node squall-node
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .build import BuiltImage, run_tool
from .recipe import RecipeError

__all__ = ["WarewulfExport", "export_warewulf"]


@dataclass(frozen=True, slots=True)
class WarewulfExport:
    path: Path
    format: str  # docker-archive, chroot

    def as_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "format": self.format}


def export_warewulf(image: BuiltImage, dest: Path) -> WarewulfExport:
    """A docker-archive at `dest` (a file name ending in .tar), or a chroot in the folder
    `dest` (made; it must not exist, or be empty)."""
    if dest.suffix == ".tar":
        if ":" in dest.name:
            raise RecipeError(f"{dest.name}: Warewulf refuses a file name with a colon")
        if shutil.which("skopeo") is None:
            raise RecipeError("a docker-archive is written by skopeo (apt-get install skopeo)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".ww-") as tmp:
            staged = Path(tmp) / "image.tar"
            run_tool(
                [
                    "skopeo",
                    "copy",
                    "--quiet",
                    f"oci:{image.reference}",
                    f"docker-archive:{staged}:{image.tag}:latest",
                ]
            )
            staged.rename(dest)
        return WarewulfExport(dest, "docker-archive")
    if dest.exists() and any(dest.iterdir()):
        raise RecipeError(f"{dest} is not empty: a chroot is written into an empty folder")
    if os.geteuid() != 0:
        raise RecipeError("writing a chroot needs root (the image's files keep their owners)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".ww-") as tmp:
        staged = Path(tmp) / "rootfs"
        run_tool(["umoci", "raw", "unpack", "--image", image.reference, str(staged)])
        if dest.exists():
            dest.rmdir()
        staged.rename(dest)
    return WarewulfExport(dest, "chroot")
