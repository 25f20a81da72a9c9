"""The share of a local cluster whose nodes are separate (node_network.py): the run's volume
folder, exported by its first node over the run's network and mounted by every node.

This is the `nfs-first-node` storage class of a cloud cluster, made on this machine. The kernel
a local site runs on may have no NFS (this one has FUSE alone), so the share is GlusterFS, whose
server and client are user-space processes: a `glusterd` of the run's own and its one brick run
in node 0's network namespace, the brick being the run's volume folder itself; each node, node
0 included, mounts the volume with a FUSE client started in its own network namespace, at a
folder of its own, and its agent keeps the run's volumes there (`--shared-volume-root`). Every
byte a node reads or writes in a volume travels over the run's bridge to node 0's brick, as it
would over a cluster's network, and the brick is never written but through a client.

When the cluster goes, the clients are unmounted and the servers stopped; the brick's files
stay where they are, in the run's volume folder, as a single node's would: what a failed
egress still owes is there for `squall workflow egress`. Everything is found again from the
run's share folder alone (pid files and the mounts beneath it), so that a crashed
orchestrator's share is removed as its network is.

The servers listen on node 0's address only, and take clients from the run's node addresses
alone: a firewall in node 0's namespace drops anything else bound for their ports (this
machine, which reaches node 0 over the bridge, included), and the volume admits those
addresses only (`auth.allow`); job containers never reach a node's address (node_network.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .base import ProvisionError

__all__ = ["GLUSTER_PACKAGES", "NodeShare", "share_tools_missing"]

VOLUME = "squall"  # the volume's name, in the run's own glusterd
SOCKETS = Path("/run/squall/share")  # the runs' glusterd sockets
GLUSTER_RUN = (Path("/var/run/gluster"), Path("/run/gluster"))  # where its bricks' sockets go
GLUSTERD_PORT = 24007  # in node 0's namespace: every run has its own
BASE_PORT, MAX_PORT = 49152, 60999  # where glusterd puts its bricks
BRICK_PORTS = f"{BASE_PORT}-{MAX_PORT}"
FENCE = f"""table inet squall_share {{{{
    chain input {{{{
        type filter hook input priority 0; policy accept;
        ip daddr {{server}} tcp dport {{{{ {GLUSTERD_PORT}, {BRICK_PORTS} }}}} \\
            ip saddr != {{{{ {{nodes}} }}}} drop
    }}}}
}}}}
"""
START_TIMEOUT = 60.0
GLUSTER_PACKAGES = "glusterfs-server fuse3"  # Debian's, which `scripts/setup.sh` installs
# what a node reads is what another just wrote: no client-side caches of data or metadata
COHERENT = {
    "performance.stat-prefetch": "off",
    "performance.quick-read": "off",
    "performance.io-cache": "off",
    "performance.open-behind": "off",
    "performance.read-ahead": "off",
    "network.ping-timeout": "10",
}
CLIENT_OPTIONS = (
    "--attribute-timeout=0",
    "--entry-timeout=0",
    "--negative-timeout=0",
    "--fopen-keep-cache=false",
)
TOOLS = ("glusterd", "gluster", "glusterfs", "nsenter")


def share_tools_missing() -> list[str]:
    """The programs a share needs that this machine lacks."""
    return [t for t in TOOLS if shutil.which(t) is None]


class NodeShare:
    """The share of one run: its state under `home` (the run's `share` folder), its brick
    `export` (the run's volume folder)."""

    def __init__(self, home: Path, export: Path) -> None:
        self.home, self.export = home, export
        self.work, self.logs = home / "glusterd", home / "logs"
        # a Unix socket's path has room for 107 bytes: a data directory's may not fit
        digest = hashlib.sha256(str(home).encode()).hexdigest()[:16]
        self.socket = SOCKETS / f"{digest}.socket"

    def mount_point(self, index: int) -> Path:
        return self.home / f"node-{index}"

    def serve(self, netns: Path, address: str, clients: Sequence[str]) -> None:
        """Start the run's glusterd in node 0's namespace `netns` (at `address`), and its
        volume, open to the node addresses `clients`."""
        missing = share_tools_missing()
        if missing:
            raise ProvisionError(
                f"separate nodes share their volumes over GlusterFS, and this machine lacks "
                f"{', '.join(missing)}: install the packages {GLUSTER_PACKAGES}"
            )
        for folder in (self.work, self.logs, self.export):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # its ports take the nodes alone: not this machine (the bridge's address), whose
        # users could otherwise ask glusterd for the volume, or join its pool
        fenced = subprocess.run(
            ["nsenter", f"--net={netns}", "nft", "-f", "-"],
            input=FENCE.format(server=address, nodes=", ".join(clients)),
            capture_output=True,
            text=True,
        )
        if fenced.returncode != 0:
            raise ProvisionError(f"the run's share: nft: {fenced.stderr.strip()}")
        config = self.home / "glusterd.vol"
        config.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.work}\n"
            f"    option run-directory {self.work}\n"
            f"    option logging-directory {self.logs}\n"
            f"    option glusterd-sockfile {self.socket}\n"
            "    option transport-type socket\n"
            f"    option transport.socket.bind-address {address}\n"
            f"    option transport.socket.listen-port {GLUSTERD_PORT}\n"
            f"    option base-port {BASE_PORT}\n"
            f"    option max-port {MAX_PORT}\n"
            "    option event-threads 1\n"
            "end-volume\n"
        )
        SOCKETS.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = self.logs / "glusterd.log"
        started = subprocess.run(
            [
                *("nsenter", f"--net={netns}", "glusterd", "-f", str(config)),
                *("-p", str(self.work / "glusterd.pid"), "-l", str(log)),
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if started.returncode != 0:
            said = (started.stdout + started.stderr).strip() or _errors(log)
            raise ProvisionError(f"the run's share: glusterd did not start: {said}")
        self._await(lambda: self.socket.exists(), "glusterd did not start", log)
        brick = f"{address}:{self.export}"
        self._gluster("volume", "create", VOLUME, brick, "force")
        for key, value in {**COHERENT, "auth.allow": ",".join(clients)}.items():
            self._gluster("volume", "set", VOLUME, key, value)
        self._gluster("volume", "start", VOLUME)

    def mount(self, index: int, netns: Path, server: str) -> Path:
        """Mount the volume for node `index` with a client in its namespace `netns`; the
        folder where the node has it."""
        point = self.mount_point(index)
        point.mkdir(mode=0o755, parents=True, exist_ok=True)
        log = self.logs / f"node-{index}.log"
        mounted = subprocess.run(
            [
                *("nsenter", f"--net={netns}", "glusterfs", "--process-name", "fuse"),
                *(f"--volfile-server={server}", f"--volfile-id=/{VOLUME}", *CLIENT_OPTIONS),
                f"--log-file={log}",
                f"--pid-file={self.work / f'client-{index}.pid'}",
                str(point),
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        failure = f"node-{index} could not mount the share"
        if mounted.returncode != 0:
            said = (mounted.stdout + mounted.stderr).strip() or _errors(log)
            raise ProvisionError(f"the run's share: {failure}: {said}")
        self._await(lambda: os.path.ismount(point), failure, log)
        return point

    def remove(self) -> None:
        """Unmount every client, stop the servers, and leave the brick's files as plain files
        in the export (found again from `home` alone: a crashed orchestrator's share too)."""
        if not self.home.is_dir():
            return
        # from the mount table: a mount whose client died answers no stat (ENOTCONN)
        for point in _mounts_beneath(self.home):
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)
        held = [str(p) for p in _mounts_beneath(self.home)]
        if held:  # never delete through a mount: that would empty the volumes
            raise ProvisionError(f"the run's share is still mounted at {', '.join(held)}")
        for pid_file in sorted(self.work.glob("**/*.pid")):  # clients, the brick, glusterd
            _stop(pid_file)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.export / ".glusterfs")  # the brick's own records
        self.socket.unlink(missing_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def _gluster(self, *args: str) -> None:
        cmd = ["gluster", f"--glusterd-sock={self.socket}", "--mode=script"]
        cmd += [f"--log-file={self.logs / 'cli.log'}", *args]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                said = (done.stdout + done.stderr).strip()
                raise ProvisionError(f"the run's share: gluster {' '.join(args)}: {said}")
            time.sleep(0.2)  # glusterd answers before it is ready for volumes

    @staticmethod
    def _await(ready: Callable[[], bool], failure: str, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if time.monotonic() > deadline:
                raise ProvisionError(
                    f"the run's share: {failure} within {START_TIMEOUT:g}s: {_errors(log)}"
                )
            time.sleep(0.05)


def _errors(log: Path) -> str:
    """The last errors a gluster process logged (the share's logs go with the run)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"no log at {log}"
    errors = [line for line in lines if "] E [" in line or "] C [" in line]
    return " | ".join((errors or lines)[-3:]) or f"nothing in {log}"


def _mounts_beneath(folder: Path) -> list[Path]:
    """The mount points beneath `folder`, from this process's mount table."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4].replace("\\040", " "))
        if point.is_relative_to(folder) and point != folder:
            points.append(point)
    return sorted(points, reverse=True)  # the deepest first


def _stop(pid_file: Path) -> None:
    """TERM the process a pid file names, if it is still that process (a gluster one started
    with this pid file), KILL it after 5 s."""
    try:
        pid = int(pid_file.read_text().split()[0])
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError, IndexError):
        return
    named = any(a == str(pid_file) or a == f"--pid-file={pid_file}" for a in args)
    if not (args[0].rsplit("/", 1)[-1].startswith("gluster") and named):
        return  # gone, and the number reused (after a reboot, by another run's share)
    # a brick's socket is in gluster's own run folder (`-S`): it goes with the brick
    sockets = [Path(b) for a, b in itertools.pairwise(args) if a == "-S"]
    for sig in (signal.SIGTERM, signal.SIGKILL):  # gluster's processes are daemons: no wait
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if not Path(f"/proc/{pid}").exists():
            break
    for socket in sockets:
        if socket.suffix == ".socket" and socket.parent in GLUSTER_RUN:
            socket.unlink(missing_ok=True)
