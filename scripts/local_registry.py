"""A registry on 127.0.0.1 holding busybox:1.36, built here from Debian's busybox-static
(and, with --mpi, squall/mpi:trixie, Debian's Open MPI and MPICH: scripts/mpi_image.py):
what `scripts/demo.sh` runs workflows from on a machine that cannot reach Docker Hub.

    python scripts/local_registry.py start DIR [--mpi]   # prints HOST:PORT; it keeps running
    python scripts/local_registry.py stop DIR

It uses the same image build and registry as the tests (tests/substrate/registry.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import mpi_image
from tests.substrate.registry import (
    Registry,
    build_busybox_image,
    missing_tools,
)


def start(work: Path, mpi: bool = False) -> int:
    missing = missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)} (scripts/setup.sh --runtime)", file=sys.stderr)
        return 2
    stop(work)
    work.mkdir(parents=True, exist_ok=True)
    layout = build_busybox_image(work)
    registry = Registry(work)
    registry.push(layout, "1.36", "busybox:1.36")
    if mpi:
        try:
            image = mpi_image.build()
        except RuntimeError as exc:
            registry.stop()
            print(f"cannot build the MPI image: {exc}", file=sys.stderr)
            return 1
        registry.push(image, mpi_image.TAG, f"{mpi_image.NAME}:{mpi_image.TAG}")
    (work / "pid").write_text(str(registry.proc.pid))
    print(registry.address)
    return 0


def stop(work: Path) -> int:
    pid_file = work / "pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    mpi = "--mpi" in args
    args = [a for a in args if a != "--mpi"]
    if len(args) != 2 or args[0] not in ("start", "stop") or (mpi and args[0] == "stop"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(start(Path(args[1]), mpi) if args[0] == "start" else stop(Path(args[1])))
