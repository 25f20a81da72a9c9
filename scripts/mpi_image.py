"""The MPI image: Debian trixie with Open MPI (5.0) and MPICH (4.2), each with its mpicc, and
the ring program of images/mpi/ring.c built with each (/opt/squall/ring, /opt/squall/ring.mpich);
what examples/mpi.yaml and the MPI tests run. Trixie, not bookworm: bookworm's MPICH 4.0.2
(ch4:ucx) hangs in MPI_Finalize in one run of two or three across nodes, a rank left in UCX
progress while its peer waits in a PMI barrier; MPICH 4.2 drops that barrier (pmodels/mpich
PR 6596). Built here from Debian's packages (mmdebstrap, then umoci), as an OCI layout in a
cache folder named by the hash of its recipe: a build takes a minute or more, a cached one
nothing.

    python scripts/mpi_image.py [--cache DIR]   # prints the OCI layout's path (tag: trixie)

The cache is $XDG_CACHE_HOME/squall/images (~/.cache/squall/images) unless --cache says.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RING = ROOT / "images" / "mpi" / "ring.c"
SUITE = "trixie"
TAG = SUITE
NAME = "squall/mpi"  # as the demo's and the tests' registries serve it
MIRROR = os.environ.get("SQUALL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = (
    "openmpi-bin",
    "libopenmpi-dev",
    "mpich",
    "libmpich-dev",
    "gcc",
    "libc6-dev",
    "iproute2",
)
# what a container never reads: documentation, manuals, translations
EXCLUDE = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
RECIPE_VERSION = "1"  # raise when the steps below change what is built
TOOLS = ("mmdebstrap", "umoci")


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "squall" / "images"


def recipe_key() -> str:
    """What the image is made from: the suite, the packages, the program, these steps."""
    recipe = "\n".join((RECIPE_VERSION, SUITE, *PACKAGES, *EXCLUDE, RING.read_text()))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def build(cache: Path | None = None, log: Path | None = None) -> Path:
    """The image's OCI layout, built unless the cache has it."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} (scripts/setup.sh --runtime)")
    folder = (cache or default_cache()) / f"mpi-{recipe_key()}"
    layout = folder / "oci"
    if (layout / "index.json").exists():
        return layout
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".mpi-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs.tar"
        hooks = [
            'mkdir -p "$1/opt/squall"',
            f"copy-in {RING} /opt/squall",
            'chroot "$1" mpicc -O2 -o /opt/squall/ring /opt/squall/ring.c',
            'chroot "$1" mpicc.mpich -O2 -o /opt/squall/ring.mpich /opt/squall/ring.c',
            'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
        ]
        cmd = ["mmdebstrap", "--variant=apt", f"--include={','.join(PACKAGES)}"]
        cmd += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDE]
        cmd += [f"--customize-hook={hook}" for hook in hooks]
        cmd += [SUITE, str(rootfs), MIRROR]
        _run(cmd, log)
        staged = work / "oci"
        image = f"{staged}:{TAG}"
        for step in (
            ["umoci", "init", "--layout", str(staged)],
            ["umoci", "new", "--image", image],
            ["umoci", "raw", "add-layer", "--image", image, str(rootfs)],
            [
                "umoci",
                "config",
                "--image",
                image,
                "--config.cmd",
                "/bin/bash",
                "--config.env",
                "PATH=/opt/squall:/usr/local/bin:/usr/bin:/bin",
                "--config.workingdir",
                "/",
                "--os",
                "linux",
                "--architecture",
                "amd64",
            ],
            ["umoci", "gc", "--layout", str(staged)],
        ):
            _run(step, log)
        folder.mkdir(exist_ok=True)
        staged.rename(layout)  # whole, or not at all
    return layout


def _run(cmd: list[str], log: Path | None) -> None:
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr.strip()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="where built images are kept")
    args = parser.parse_args()
    try:
        print(build(args.cache))
    except RuntimeError as exc:
        print(f"mpi_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
