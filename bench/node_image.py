"""The node image: its build, cold and warm, its size, and how long a VM booted from it takes
until its agent has joined its run, next to the same disk booting to a bare cloud-init
script, in one run (as root).

Run: .venv/bin/python bench/node_image.py [--boots 2] [--skip-cold]

build cold   `squall image build` into an empty cache: wheels, mmdebstrap from Debian's
             mirror (packages downloaded every time: apt's cache is the build's), the OCI
             layer (umoci)
build warm   the same build again: the cache hit (recipe hash computed, nothing built)
digest       whether the cold build's digest equals that of the build in the usual cache
             (made earlier, apart: the same checkout and package versions)
size         the OCI layer (gzip), the root file system, the qcow2 disk
boot bare    QEMU boots the disk (UEFI, systemd-boot, the cloud kernel, systemd) with a
             NoCloud seed whose user data only writes a line to the console: start of QEMU
             to that line. What any cloud-init image costs here.
boot squall  the vm site's `up` for one VM: the seed holds the boot script a cloud node gets
             (infra/bootstrap.py), the agent starts under systemd, makes its key, joins the
             run at the orchestrator's join service and answers a health call over mutual
             TLS: start of QEMU to joined, and to healthy.

Boots alternate (bare, squall, bare, ...). Under TCG (no KVM here: nested KVM fails) a guest
runs many times slower than on a cloud's hardware, so the boot figures are an upper bound of
the guest's own work, not a cloud's boot time. The peer for node start is ParallelCluster's
own published baseline (not measurable here): a median of 294 s from job submission to job
start for dynamic Slurm nodes (its performance tests' statistics.json, cited by its
maintainers in aws/aws-parallelcluster#4236, 2022), which includes the EC2 launch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.nodeimage.build import build
from orchestrator.nodeimage.disk import export_disk
from orchestrator.nodeimage.recipe import RECIPE, checkout, load_recipe
from orchestrator.provision.base import Plan
from orchestrator.provision.vm import (
    OVMF,
    VmProvisioner,
    VmSettings,
    VmShape,
    _seed,
    kvm_works,
)

MIB = 1 << 20


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def boot_bare(disk: Path, work: Path, accel: str) -> float:
    """QEMU start to the user data's line on the console (user-mode network, no join)."""
    home = Path(tempfile.mkdtemp(dir=work))
    seed = home / "seed.img"
    _seed(
        seed,
        {
            "user-data": "#!/bin/sh\necho SQUALL-BENCH-READY > /dev/console\n",
            "meta-data": f"instance-id: bench-{time.monotonic_ns()}\nlocal-hostname: bare\n",
        },
    )
    overlay = home / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2",
                    str(overlay)], check=True)  # fmt: skip
    shutil.copyfile(OVMF / "OVMF_VARS_4M.fd", home / "vars.fd")
    console = home / "console.log"
    started = time.monotonic()
    with subprocess.Popen(
        ["qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "1536", "-smp", "1",
         "-display", "none", "-monitor", "none", "-no-user-config",
         "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF / 'OVMF_CODE_4M.fd'}",
         "-drive", f"if=pflash,format=raw,file={home / 'vars.fd'}",
         "-drive", f"file={overlay},if=virtio,format=qcow2",
         "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
         "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
         "-serial", f"file:{console}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as qemu:  # fmt: skip
        try:
            while b"SQUALL-BENCH-READY" not in (console.read_bytes() if console.exists() else b""):
                if time.monotonic() - started > 900 or qemu.poll() is not None:
                    raise RuntimeError("the bare boot never reached its user data")
                time.sleep(0.2)
            return time.monotonic() - started
        finally:
            qemu.kill()
            qemu.wait()
            shutil.rmtree(home)


def boot_squall(disk: Path, work: Path) -> tuple[float, float]:
    """The vm site's up for one VM: seconds to joined, and to a healthy agent."""
    site = VmProvisioner(work / "site", VmSettings(image=disk, max_nodes=1))
    run_id = str(uuid.uuid4())
    joined: list[float] = []
    started = time.monotonic()

    def report(line: str) -> None:
        if "nodes joined" in line and line.startswith("1 of 1"):
            joined.append(time.monotonic() - started)

    cluster = site.up(Plan(run_id, VmShape(1, 0)), report)
    healthy = time.monotonic() - started
    site.down(cluster)
    return joined[0], healthy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=2, help="boots of each kind (default 2)")
    parser.add_argument("--skip-cold", action="store_true", help="no cold build (minutes)")
    args = parser.parse_args()
    recipe = load_recipe(checkout() / RECIPE)
    accel = "kvm" if kvm_works() else "tcg"
    facts: dict[str, object] = {"accel": accel}
    with tempfile.TemporaryDirectory(prefix="squall-bench-image-") as tmp:
        work = Path(tmp)
        if not args.skip_cold:
            cold = build(recipe, cache=work / "cache")
            facts["build_cold_s"] = round(cold.seconds, 1)
            warm = build(recipe, cache=work / "cache")
            assert warm.cached
            facts["build_warm_s"] = round(warm.seconds, 2)
        image = build(recipe)  # the shared cache: the disk for the boots
        facts["digest"] = image.digest
        if not args.skip_cold:  # two builds of one checkout, apart: the same digest?
            facts["cold_digest_equal"] = cold.digest == image.digest
        facts["layer_mib"] = round(image.size / MIB)
        disk = image.layout.parent / "disk.qcow2"
        if not disk.exists():
            export_disk(image, disk, "qcow2")
        facts["disk_mib"] = round(disk.stat().st_size / MIB)
        chroot = work / "chroot"
        subprocess.run(["umoci", "raw", "unpack", "--image", image.reference, str(chroot)],
                       check=True)  # fmt: skip
        facts["rootfs_mib"] = round(_du(chroot) / MIB)
        shutil.rmtree(chroot)
        bare, joined, healthy = [], [], []
        for _ in range(args.boots):
            bare.append(boot_bare(disk, work, accel))
            j, h = boot_squall(disk, work)
            joined.append(j)
            healthy.append(h)
        facts |= {
            "boot_bare_s": [round(x, 1) for x in bare],
            "boot_to_joined_s": [round(x, 1) for x in joined],
            "boot_to_healthy_s": [round(x, 1) for x in healthy],
            "median_bare_s": round(statistics.median(bare), 1),
            "median_joined_s": round(statistics.median(joined), 1),
            "median_healthy_s": round(statistics.median(healthy), 1),
            "peer_parallelcluster_median_s": 294,
        }
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
