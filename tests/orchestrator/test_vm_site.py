"""The node image boots and its nodes run workflows: the image of images/warewulf/node.yaml
is built (mmdebstrap, cached by recipe), exported as a disk, and booted in QEMU (KVM where it
works, else TCG) by the vm site, with a NoCloud seed holding the boot script the clouds get
(infra/bootstrap.py). cloud-init runs it, systemd starts the agent, the agent joins its run
at the orchestrator's join service for its own certificate, and the engine runs a one-job
workflow on one VM and an Open MPI ring across two. The VMs, their taps, bridge, firewall
and disks are gone afterwards.

Slow (a cold image build takes about two minutes, a VM boots in about a minute under TCG):
the image and its disk are cached in the build cache (~/.cache/squall/node-images)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.engine import Engine
from orchestrator.nodeimage.build import build
from orchestrator.nodeimage.disk import export_disk
from orchestrator.nodeimage.recipe import RECIPE, checkout, load_recipe
from orchestrator.provision.node_network import run_key
from orchestrator.provision.vm import OVMF, VmProvisioner, VmSettings
from orchestrator.store import RunState, Store
from tests.orchestrator.test_examples_run import events
from tests.orchestrator.test_gangs import log_of
from tests.orchestrator.test_mpi import mpi_job, ranks
from tests.substrate.registry import Registry

TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.vfat", "mcopy", "mmdebstrap", "umoci", "sfdisk")
needs_qemu = pytest.mark.skipif(
    os.geteuid() != 0
    or any(shutil.which(t) is None for t in TOOLS)
    or not (OVMF / "OVMF_CODE_4M.fd").exists(),
    reason="needs root, QEMU, OVMF and the image tools (scripts/setup.sh --test installs them)",
)


@pytest.fixture(scope="module")
def disk() -> Path:
    """The node image's disk, built and exported once per image (cached beside it)."""
    image = build(load_recipe(checkout() / RECIPE))
    path = image.layout.parent / "disk.qcow2"
    if not path.exists():
        export_disk(image, path, "qcow2")
    return path


@pytest.fixture
def vm_engine(tmp_path: Path, registry: Registry, disk: Path) -> Engine:
    site = VmProvisioner(
        tmp_path / "vm",
        VmSettings(image=disk, max_nodes=2),
        search_registries=[registry.address],
        insecure_registries=[registry.address],
    )
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    return Engine(store, [site], data_dir=tmp_path / "data", home="vm")


def leftovers(engine: Engine, run_id: str) -> list[str]:
    """What of the run's VMs is still on this machine."""
    site = engine.providers[0]
    assert isinstance(site, VmProvisioner)
    found = []
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"squall-{run_id}-vm-".encode() in proc.read_bytes():
                found.append(f"qemu pid {proc.parent.name}")
        except OSError:
            continue
    key = run_key(run_id)
    found += [p.name for p in Path("/sys/class/net").glob(f"sqv{key}*")]
    if (site.folder / run_id).exists():
        found.append(str(site.folder / run_id))
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if f"squall_vm_{key}" in tables:
        found.append(f"nft table squall_vm_{key}")
    return found


HELLO = """version: v4
jobs:
  hello:
    image: {uri: docker://busybox:1.36}
    command: [sh, -c, 'echo "hello from a VM: $(uname -r)"; cat /proc/cpuinfo | grep -c ^processor']
    resource: {cpu: {cores: 1}, memory: {size: 64MiB}}
"""


@needs_qemu
def test_a_job_runs_on_a_vm_booted_from_the_node_image(vm_engine: Engine) -> None:
    outcome = vm_engine.run("user/hello", HELLO)
    assert outcome.state is RunState.FINISHED, outcome.reason
    log = log_of(vm_engine, outcome, "hello")
    # the VM's kernel is the image's (Debian's cloud kernel), not this machine's
    assert "hello from a VM: " in log
    assert "-cloud-amd64" in log.split("hello from a VM: ")[1].splitlines()[0]
    assert leftovers(vm_engine, outcome.run_id) == []


@needs_qemu
def test_open_mpi_runs_a_ring_across_two_vms(vm_engine: Engine, mpi: str) -> None:
    # named without its registry: the VMs reach this machine's loopback registry at the
    # bridge's address, which the site gives them as their search registry
    unqualified = "docker://" + mpi.removeprefix("docker://").split("/", 1)[1]
    outcome = vm_engine.run("user/ring", mpi_job(unqualified, 2, "openmpi", "ring"))
    assert outcome.state is RunState.FINISHED, outcome.reason
    log = log_of(vm_engine, outcome, "ring")
    assert "ring ok: 2 ranks" in log, log
    assert sorted(set(ranks(log).values())) == ["ring-0", "ring-1"]  # the gang's two members
    # each on its own VM: both VMs pulled the image
    pulled = [e for e in events(vm_engine, outcome.run_id) if "pulled" in e]
    assert sorted(e.split(": ")[0] for e in pulled) == ["vm-0", "vm-1"], pulled
    assert leftovers(vm_engine, outcome.run_id) == []


def test_the_vm_site_says_what_it_needs_before_anything_is_made(tmp_path: Path) -> None:
    from orchestrator.fuzzfile import load_text
    from orchestrator.placing import Placement
    from orchestrator.provision.base import ProvisionError

    wf = load_text(HELLO).workflow
    assert wf is not None
    site = VmProvisioner(tmp_path / "vm", VmSettings())
    with pytest.raises(ProvisionError, match="set SQUALL_VM_IMAGE=FILE"):
        site.plan("run-1", "me", wf, Placement({"site": "vm"}))
    site = VmProvisioner(tmp_path / "vm", VmSettings(image=tmp_path / "none.qcow2"))
    with pytest.raises(ProvisionError, match="no disk at"):
        site.plan("run-1", "me", wf, Placement({"site": "vm"}))
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb")
    ring = load_text(mpi_job("docker://squall/mpi:trixie", 3, "openmpi", "ring")).workflow
    assert ring is not None
    site = VmProvisioner(tmp_path / "vm", VmSettings(image=disk, max_nodes=2))
    if shutil.which("qemu-system-x86_64") and os.geteuid() == 0:
        with pytest.raises(ProvisionError, match="makes up to 2 VMs"):
            site.plan("run-1", "me", ring, Placement({"site": "vm"}))
        assert site.plan("run-1", "me", wf, Placement({"site": "vm"})).shape.nodes == 1
    assert not (tmp_path / "vm").exists()  # nothing made by a plan
