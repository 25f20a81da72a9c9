"""The `vm` site: a run's nodes as virtual machines on this machine, booted from the node
image's disk (`squall image export --disk`), as a cloud boots them.

Each VM gets a copy-on-write layer over the disk, a NoCloud `cidata` seed holding the boot
script a cloud node gets as its user data (infra/bootstrap.py, with its network settings),
and a tap on the run's bridge. Its agent joins the run at a join service this provisioner
serves on the bridge's address (registrar.py) and is then reached, like a cloud node, only
at its own address with mutual TLS. Registries on this machine's loopback are relayed to
the bridge's address, and the agents are told those addresses.

QEMU runs with KVM where it works, else TCG (much slower: about a minute to boot here).
The VMs, their taps, the bridge and its firewall are this run's alone and go at `down`,
whichever orchestrator process calls it (everything is found from the run's folder).

Settings (environment): `SQUALL_VM_IMAGE` the disk (qcow2 or raw); `SQUALL_VM_NODES` how
many VMs a run may have (default 2); `SQUALL_VM_CPUS` and `SQUALL_VM_MEMORY_MIB` per VM
(default 1 and 1536); `SQUALL_VM_ACCEL` kvm or tcg (default: kvm when it works).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from infra.bootstrap import NFS_SERVER_OPTIONS, NfsExport, NfsMount, startup_script
from infra.spec import (
    VOLUME_ROOT,
    Bootstrap,
    ClusterSpec,
    Network,
    NodeGroup,
    SiteRef,
    storage_for,
)
from substrate.netlink import Rtnl
from substrate.network import host_lock

from .base import AgentEndpoint, Cluster, Plan, ProvisionError, Report, await_health, quiet
from .node_network import NODE_POOL, LoopbackRelay, _free_subnets, loopback_ports, run_key
from .pki import RunAuthority, join_identity
from .registrar import Registrar

if TYPE_CHECKING:
    from ..fuzzfile import Workflow
    from ..placing import Placement

__all__ = ["SITE", "VmProvisioner", "VmSettings", "VmShape"]

SITE = "vm"
GROUP = "vm"
AGENT_PORT = 7431
OVMF = Path("/usr/share/OVMF")
HEALTH_TIMEOUT_S = 120.0


@functools.cache
def kvm_works() -> bool:
    """Whether QEMU runs a guest with KVM here: /dev/kvm may open and yet fail on the first
    instructions of the firmware (nested KVM: "KVM internal error"), so the firmware is
    started for a few seconds and its errors read."""
    code = OVMF / "OVMF_CODE_4M.fd"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None:
        return False
    with subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-m", "64",
         "-display", "none", "-monitor", "none", "-serial", "none", "-no-user-config",
         "-drive", f"if=pflash,format=raw,readonly=on,file={code}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as probe:  # fmt: skip
        try:
            _, errors = probe.communicate(timeout=4)
            return False  # it ended by itself: it could not run
        except subprocess.TimeoutExpired:
            probe.kill()
            _, errors = probe.communicate()
    return "internal error" not in errors.lower()


@dataclass(frozen=True, slots=True)
class VmSettings:
    image: Path | None = None  # the node image's disk
    max_nodes: int = 2
    cpus: int = 1
    memory_mib: int = 1536
    accel: str = ""  # kvm, tcg; "": kvm when it works
    join_timeout_s: float = 900.0

    @classmethod
    def from_environment(cls) -> VmSettings:
        env = os.environ
        try:
            return cls(
                image=Path(env["SQUALL_VM_IMAGE"]) if env.get("SQUALL_VM_IMAGE") else None,
                max_nodes=int(env.get("SQUALL_VM_NODES", "2")),
                cpus=int(env.get("SQUALL_VM_CPUS", "1")),
                memory_mib=int(env.get("SQUALL_VM_MEMORY_MIB", "1536")),
                accel=env.get("SQUALL_VM_ACCEL", ""),
            )
        except ValueError as exc:
            raise ProvisionError(f"a SQUALL_VM_* setting is not a number: {exc}") from None


@dataclass(frozen=True, slots=True)
class VmShape:
    nodes: int
    volumes_gib: int  # 0: the workflow has no volumes


@dataclass
class _Run:
    registrar: Registrar | None = None
    relay: LoopbackRelay = field(default_factory=LoopbackRelay)


class VmProvisioner:
    """Clusters of QEMU VMs on this machine, booted from the node image."""

    cannot: Mapping[str, str] = {
        "persistent volumes": "the vm site's volumes live on its first VM and go with it",
        "gpus": "the vm site's VMs have no GPUs",
    }

    def __init__(
        self,
        folder: Path,
        settings: VmSettings,
        search_registries: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
    ) -> None:
        self.folder = folder  # <site>/vm: one folder per run, the join certificate
        self.settings = settings
        self.search_registries = tuple(search_registries)
        self.insecure_registries = tuple(insecure_registries)
        self._runs: dict[str, _Run] = {}
        # whether a run's cancel was asked for: its VMs stop waiting for their nodes
        self.cancelled: Callable[[str], bool] = lambda run_id: False

    def serves(self, site: str) -> bool:
        return site == SITE

    # plan

    def check(self) -> None:
        """Refuse, saying what is missing, before anything is made."""
        if self.settings.image is None:
            raise ProvisionError(
                "the vm site boots the node image's disk: build and export it (`squall image "
                "build`, `squall image export --disk FILE`), then set SQUALL_VM_IMAGE=FILE"
            )
        if not self.settings.image.is_file():
            raise ProvisionError(f"SQUALL_VM_IMAGE: no disk at {self.settings.image}")
        missing = [
            package
            for tool, package in (
                ("qemu-system-x86_64", "qemu-system-x86"),
                ("qemu-img", "qemu-utils"),
                ("mkfs.vfat", "dosfstools"),
                ("mcopy", "mtools"),
                ("nft", "nftables"),
            )
            if shutil.which(tool) is None
        ]
        if not (OVMF / "OVMF_CODE_4M.fd").exists():
            missing.append("ovmf")
        if missing:
            raise ProvisionError(f"the vm site needs {', '.join(missing)} (apt-get install them)")
        if os.geteuid() != 0:
            raise ProvisionError("the vm site makes a bridge and taps for its VMs: run as root")

    def plan(self, run_id: str, owner: str, wf: Workflow, placement: Placement) -> Plan[VmShape]:
        del owner, placement
        self.check()
        nodes = max([job.multinode.nodes for job in wf.jobs.values() if job.multinode] or [1])
        if nodes > self.settings.max_nodes:
            raise ProvisionError(
                f"a job needs {nodes} nodes; the vm site makes up to {self.settings.max_nodes} "
                "VMs (SQUALL_VM_NODES)"
            )
        gib = sum(max(1, -(-(v.size or 0) // 2**30)) for v in wf.volumes.values())
        shape = VmShape(nodes, gib)
        return Plan(run_id, shape, {"vms": nodes})

    # up

    def up(self, plan: Plan[VmShape], report: Report = quiet) -> Cluster:
        run_id, shape = plan.run_id, plan.shape
        home = self.folder / run_id
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = self._runs[run_id] = _Run()
        try:
            return self._up(run_id, shape, home, state, report)
        except BaseException:
            self._remove(run_id)
            raise

    def _up(self, run_id: str, shape: VmShape, home: Path, state: _Run, report: Report) -> Cluster:
        net = _VmNetwork(run_id)
        subnet = net.make(shape.nodes)
        gateway = str(next(subnet.hosts()))
        identity = join_identity(self.folder / "join")
        registrar = state.registrar = Registrar(identity, f"{gateway}:0")
        search, insecure, ports = self._registries(gateway)
        for port in ports:
            state.relay.serve_on(gateway, port)
        net.open_ports([registrar.port, *ports])
        authority = RunAuthority(run_id)
        token = secrets.token_urlsafe(32)
        # a VM joins from the address it reports (no NAT on the bridge): nothing else is taken
        registrar.open(run_id, token, authority, {GROUP: shape.nodes}, from_itself=True)
        spec = self._spec(run_id, shape, subnet, registrar.port, identity.ca, token,
                          search, insecure)  # fmt: skip
        accel = self.settings.accel or ("kvm" if kvm_works() else "tcg")
        report(f"booting {shape.nodes} VM(s) from {self.settings.image} ({accel})")
        hosts = list(subnet.hosts())
        for i in range(shape.nodes):
            self._boot(home, spec, i, str(hosts[i + 1]), gateway, net, accel)
        joined = registrar.wait(
            run_id,
            self.settings.join_timeout_s,
            consoles=lambda: {f"vm-{i}": _tail(home / f"vm-{i}.console") for i in
                              range(shape.nodes)},
            report=report,
            stop=lambda: self.cancelled(run_id),
        )  # fmt: skip
        agents = tuple(
            AgentEndpoint(j.node, f"{j.address}:{j.agent_port}", token, tls=authority.orchestrator)
            for j in joined
        )
        expected = {str(h) for h in hosts[1 : shape.nodes + 1]}
        strays = [j for j in joined if j.address not in expected]
        if strays:
            raise ProvisionError(
                "nodes joined from addresses no VM of the run has: "
                + ", ".join(f"{j.node} at {j.address}" for j in strays)
            )
        # every node is in: no more certificates for this run, and its CA key goes
        registrar.stop()
        state.registrar = None
        for agent in agents:
            console = home / f"vm-{agent.name.rsplit('-', 1)[-1]}.console"
            await_health(agent, HEALTH_TIMEOUT_S, functools.partial(_tail, console))
        report(f"{len(agents)} agent(s) up: " + ", ".join(a.address for a in agents))
        return Cluster(
            run_id=run_id,
            site=SITE,
            agents=agents,
            host_network=True,
            volume_root=VOLUME_ROOT if spec.storage is not None else "",
        )

    def _registries(self, gateway: str) -> tuple[tuple[str, ...], tuple[str, ...], list[int]]:
        """The agents' registries: those on this machine's loopback are relayed to the
        bridge's address, and named by it."""
        ports = loopback_ports([*self.search_registries, *self.insecure_registries])

        def moved(registry: str) -> str:
            host, _, port = registry.rpartition(":")
            if port.isdigit() and int(port) in ports and host in ("127.0.0.1", "localhost",
                                                                 "[::1]"):  # fmt: skip
                return f"{gateway}:{port}"
            return registry

        return (
            tuple(moved(r) for r in self.search_registries),
            tuple(moved(r) for r in self.insecure_registries),
            ports,
        )

    def _spec(
        self,
        run_id: str,
        shape: VmShape,
        subnet: ipaddress.IPv4Network,
        join_port: int,
        join_ca: bytes,
        token: str,
        search: tuple[str, ...],
        insecure: tuple[str, ...],
    ) -> ClusterSpec:
        gateway = next(subnet.hosts())
        storage = (
            storage_for(SITE, shape.nodes, shape.volumes_gib, None) if shape.volumes_gib else None
        )
        return ClusterSpec(
            run_id=run_id,
            owner="vm",
            expires_at=datetime.now(UTC) + timedelta(days=1),
            site=SiteRef(cloud="vm", region="local"),
            node_groups=(
                NodeGroup(
                    name=GROUP,
                    instance_type=f"qemu-{self.settings.cpus}cpu-{self.settings.memory_mib}m",
                    count=shape.nodes,
                    image=str(self.settings.image),
                ),
            ),
            network=Network(
                cidr=str(subnet), orchestrator_cidr=f"{gateway}/32", agent_port=AGENT_PORT
            ),
            bootstrap=Bootstrap(
                orchestrator=f"{gateway}:{join_port}",
                ca_certificate=join_ca.decode(),
                join_token=SecretStr(token),
                search_registries=search,
                insecure_registries=insecure,
            ),
            storage=storage,
        )

    def _boot(
        self,
        home: Path,
        spec: ClusterSpec,
        index: int,
        address: str,
        gateway: str,
        net: _VmNetwork,
        accel: str,
    ) -> None:
        name = f"vm-{index}"
        group = spec.node_groups[0]
        mount = export = None
        if spec.storage is not None and spec.nodes > 1:
            first = next(iter(ipaddress.ip_network(spec.network.cidr).hosts()))
            if index == 0:
                export = NfsExport(spec.network.cidr)
            else:
                mount = NfsMount(f"{first + 1}:{VOLUME_ROOT}", NFS_SERVER_OPTIONS)
        script = startup_script(spec, group, mount=mount, export=export)
        mac = f"52:54:00:{int(net.key[:2], 16):02x}:{int(net.key[2:4], 16):02x}:{index:02x}"
        seed = home / f"{name}.seed.img"
        _seed(
            seed,
            {
                "user-data": script,
                "meta-data": f"instance-id: {spec.run_id}-{index}\nlocal-hostname: {name}\n",
                "network-config": _network_config(mac, address, gateway),
            },
        )
        disk = home / f"{name}.qcow2"
        image = self.settings.image
        assert image is not None
        with open(image, "rb") as head:
            fmt = "qcow2" if head.read(4) == b"QFI\xfb" else "raw"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.resolve()), "-F", fmt,
              str(disk), "20G"])  # fmt: skip
        vars_fd = home / f"{name}.vars.fd"
        shutil.copyfile(OVMF / "OVMF_VARS_4M.fd", vars_fd)
        tap = net.tap(index)
        cmd = [
            "qemu-system-x86_64",
            "-name", f"squall-{spec.run_id}-{name}",
            "-accel", accel,
            "-machine", "q35",
            "-smp", str(self.settings.cpus),
            "-m", str(self.settings.memory_mib),
            "-display", "none", "-monitor", "none", "-no-user-config",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF / 'OVMF_CODE_4M.fd'}",
            "-drive", f"if=pflash,format=raw,file={vars_fd}",
            "-drive", f"file={disk},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
            "-serial", f"file:{home / f'{name}.console'}",
            "-pidfile", str(home / f"{name}.pid"),
            "-daemonize",
        ]  # fmt: skip
        _run(cmd)

    # down

    def replace(self, cluster: Cluster, node: int, report: Report = quiet) -> AgentEndpoint:
        raise ProvisionError("a lost VM is not replaced: the run goes on without it, or moves")

    def down(self, cluster: Cluster, report: Report = quiet) -> None:
        self._remove(cluster.run_id)
        report("VMs stopped, their disks, taps and bridge removed")

    def _remove(self, run_id: str) -> None:
        state = self._runs.pop(run_id, None)
        if state is not None:
            if state.registrar is not None:
                state.registrar.stop()
            state.relay.close()
        home = self.folder / run_id
        for pid_file in sorted(home.glob("vm-*.pid")):
            _stop_vm(pid_file, run_id)
        _VmNetwork(run_id).remove()
        shutil.rmtree(home, ignore_errors=True)


class _VmNetwork:
    """The run's bridge (this machine's address on it is the VMs' gateway, join service and
    registry relay), one tap per VM, and a firewall that lets the VMs reach only the
    ports opened on that address, and each other."""

    def __init__(self, run_id: str) -> None:
        self.key = run_key(run_id)
        self.bridge = f"sqv{self.key}"
        self.table = f"squall_vm_{self.key}"

    def tap(self, index: int) -> str:
        name = f"sqv{self.key}t{index}"
        _run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
        _run(["ip", "link", "set", name, "master", self.bridge, "up"])
        return name

    def make(self, count: int) -> ipaddress.IPv4Network:
        if count > 200:
            raise ProvisionError(f"the vm site makes up to 200 VMs, not {count}")
        with host_lock(), Rtnl() as rtnl:
            used = rtnl.ipv4_networks() + rtnl.ipv4_routes()
            (subnet,) = _free_subnets(NODE_POOL, used, 1)
            gateway = next(subnet.hosts())
            rtnl.add_bridge(self.bridge)
            rtnl.add_address(self.bridge, ipaddress.IPv4Interface(f"{gateway}/24"))
            rtnl.set_up(self.bridge)
        self.subnet = subnet
        return subnet

    def open_ports(self, ports: Sequence[int]) -> None:
        gateway = next(self.subnet.hosts())
        opened = ", ".join(str(p) for p in ports)
        script = (
            f"table inet {self.table} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter - 10; policy accept;\n"
            f'    iifname "{self.bridge}" ct state established,related accept\n'
            f'    iifname "{self.bridge}" ip daddr {gateway} tcp dport {{ {opened} }} accept\n'
            f'    iifname "{self.bridge}" drop\n'
            # the join service and relays listen on the bridge's address: not for anyone who
            # routes to it from another interface
            f'    iifname != {{ "{self.bridge}", "lo" }} ip daddr {gateway} drop\n'
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter - 10; policy accept;\n"
            f'    iifname "{self.bridge}" oifname "{self.bridge}" accept\n'
            f'    iifname "{self.bridge}" drop\n'
            f'    oifname "{self.bridge}" drop\n'
            "  }\n"
            "}\n"
        )
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        if done.returncode != 0:
            raise ProvisionError(f"cannot make the VMs' firewall: nft: {done.stderr.strip()}")

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)
        names = sorted(p.name for p in Path("/sys/class/net").glob(f"sqv{self.key}*"))
        for name in sorted(names, key=lambda n: n == self.bridge):  # the taps first
            subprocess.run(["ip", "link", "delete", name], capture_output=True)


def _network_config(mac: str, address: str, gateway: str) -> str:
    """NoCloud network configuration (version 2): the VM's fixed address on the bridge."""
    return (
        "version: 2\n"
        "ethernets:\n"
        "  nic0:\n"
        f"    match: {{macaddress: '{mac}'}}\n"
        f"    addresses: [{address}/24]\n"
        f"    routes: [{{to: 0.0.0.0/0, via: {gateway}}}]\n"
    )


def _seed(path: Path, files: Mapping[str, str]) -> None:
    """A NoCloud seed: a small FAT file system labelled CIDATA holding `files`."""
    _run(["mkfs.vfat", "-C", "-n", "CIDATA", str(path), "2048"])
    folder = path.with_suffix(".d")
    folder.mkdir(exist_ok=True, mode=0o700)
    try:
        for name, text in files.items():
            (folder / name).write_text(text)
        _run(["mcopy", "-i", str(path), *(str(folder / n) for n in files), "::/"],
             env={"MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    finally:
        shutil.rmtree(folder)
    path.chmod(0o600)  # it holds the join token


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _stop_vm(pid_file: Path, run_id: str) -> None:
    """Stop the QEMU of `pid_file` if that pid is still this run's VM (its command line
    names the run), TERM then KILL."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if f"squall-{run_id}-".encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _run(cmd: list[str], env: Mapping[str, str] | None = None) -> None:
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise ProvisionError(f"{cmd[0]} failed: {done.stderr.strip()[-1000:]}")
