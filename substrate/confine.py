"""How a job's container is confined: capabilities, seccomp, devices and the user namespace.

The baseline is what a careful Kubernetes node gives a pod (RuntimeDefault seccomp, the
default device allow-list, no NET_RAW, user namespaces for pods):

- Capabilities: containerd's default set less `CAP_MKNOD`, `CAP_NET_RAW` and
  `CAP_AUDIT_WRITE`: enough for an image's root to install packages, own files and bind low
  ports, not to make devices or raw packets.
- Seccomp: the profile Podman and CRI-O use (`/usr/share/containers/seccomp.json`, Debian's
  `golang-github-containers-common`), turned into the OCI form for the capabilities above
  and this machine's architecture, as the containers tools themselves do; then tightened as
  containerd's RuntimeDefault is for a job without `CAP_SYS_ADMIN`: Podman's profile lets a
  container make nested namespaces and mounts (for rootless builds), which a job does not
  need and which is the way into much of the kernel's attack surface.
- Devices: the OCI default nodes (null, zero, full, random, urandom, tty, ptmx and the
  container's own ptys), plus the device files of the GPUs a lease grants; everything else is
  denied by the task's device cgroup (v1) and cannot be made (no `CAP_MKNOD`, user namespace).
- User namespace: container uids 0-65535 are host uids `base`..`base`+65535, so root in the
  container is an unprivileged, unnamed user on the host. Images are unpacked with their
  owners shifted into that range; volumes are bind-mounted through an idmapped mount, so a
  job writes files the host sees as its own root's.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CAPABILITIES",
    "DEFAULT_DEVICES",
    "SECCOMP_PROFILE",
    "ConfinementError",
    "Device",
    "UserNamespace",
    "device_of",
    "seccomp_profile",
]

# containerd's default capability set, less MKNOD, NET_RAW and AUDIT_WRITE
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
)

SECCOMP_PROFILE = Path("/usr/share/containers/seccomp.json")
SECCOMP_PACKAGE = "golang-github-containers-common"


class ConfinementError(Exception):
    """This node cannot confine jobs as it must; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Device:
    """A character device a job may use, with the path it has inside the container."""

    path: str
    major: int
    minor: int  # -1: every minor (the container's ptys)
    mode: int = 0o666

    def cgroup_rule(self) -> str:
        minor = "*" if self.minor < 0 else str(self.minor)
        return f"c {self.major}:{minor} rwm"


# The OCI runtime spec's default devices (and /dev/pts/*, the container's own devpts)
DEFAULT_DEVICES = (
    Device("/dev/null", 1, 3),
    Device("/dev/zero", 1, 5),
    Device("/dev/full", 1, 7),
    Device("/dev/random", 1, 8),
    Device("/dev/urandom", 1, 9),
    Device("/dev/tty", 5, 0),
    Device("/dev/ptmx", 5, 2),
    Device("/dev/pts", 136, -1),
)


def device_of(path: str) -> Device:
    """The host device file at `path` (a leased GPU's), as an allowed device."""
    st = os.stat(path)
    return Device(path, os.major(st.st_rdev), os.minor(st.st_rdev), st.st_mode & 0o777)


@dataclass(frozen=True, slots=True)
class UserNamespace:
    """Container ids 0..size-1 are host ids base..base+size-1."""

    base: int
    size: int = 65536

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of the container's root."""
        return self.base, self.base

    def oci_mappings(self) -> list[dict[str, int]]:
        return [{"containerID": 0, "hostID": self.base, "size": self.size}]

    def umoci_flags(self) -> list[str]:
        """How `umoci unpack` shifts an image's owners into this range."""
        mapping = f"0:{self.base}:{self.size}"
        return ["--uid-map", mapping, "--gid-map", mapping]


# Docker's architecture names in the profile's includes/excludes, by `uname -m`
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}
_SCMP_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


def _kernel() -> tuple[int, ...]:
    release = platform.release().split("-")[0]
    return tuple(int(p) for p in release.split(".")[:2] if p.isdigit())


def _applies(rule: dict[str, Any], caps: frozenset[str], arch: str) -> bool:
    """containers/common's filter: a rule applies unless its excludes match or its
    includes do not."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if arch in (exc.get("arches") or ()) or caps & set(exc.get("caps") or ()):
        return False
    if exc.get("minKernel") and _kernel() >= _version(exc["minKernel"]):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    return not (inc.get("minKernel") and _kernel() < _version(inc["minKernel"]))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2])


# Denied (EPERM) to a job without CAP_SYS_ADMIN, as containerd's default profile does:
# namespaces, mounts and the kernel keyring.
_TIGHTEN = (
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
)
# clone with any namespace flag is refused; clone3 (whose flags seccomp cannot see) answers
# ENOSYS, so that the C library falls back to clone
_CLONE_NS_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _tightened(syscalls: list[dict[str, Any]], caps: frozenset[str]) -> list[dict[str, Any]]:
    if "CAP_SYS_ADMIN" in caps:
        return syscalls
    out = []
    for rule in syscalls:
        if rule["action"] == "SCMP_ACT_ALLOW":
            names = [n for n in rule["names"] if n not in (*_TIGHTEN, "clone", "clone3")]
            if not names:
                continue
            rule = {**rule, "names": names}
        out.append(rule)
    return [
        *out,
        {"names": list(_TIGHTEN), "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {"index": 0, "value": _CLONE_NS_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
            ],
        },
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ]


@functools.cache
def seccomp_profile(
    path: Path = SECCOMP_PROFILE, caps: tuple[str, ...] = CAPABILITIES
) -> dict[str, Any]:
    """The OCI `linux.seccomp` section for jobs with `caps` on this architecture."""
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfinementError(
            f"no seccomp profile at {path}: install Debian's {SECCOMP_PACKAGE} "
            "(the profile Podman and CRI-O use)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfinementError(f"cannot read the seccomp profile {path}: {exc}") from None
    machine = platform.machine()
    arch = _ARCH.get(machine, machine)
    native = _SCMP_ARCH.get(machine, "")
    architectures: list[str] = []
    for entry in profile.get("archMap") or ():
        if native and entry.get("architecture") == native:
            architectures = [native, *entry.get("subArchitectures", [])]
    granted = frozenset(caps)
    syscalls = []
    for rule in profile.get("syscalls") or ():
        if not _applies(rule, granted, arch):
            continue
        out: dict[str, Any] = {"names": rule["names"], "action": rule["action"]}
        if rule.get("args"):
            out["args"] = [
                {k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a}
                for a in rule["args"]
            ]
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        syscalls.append(out)
    section: dict[str, Any] = {
        "defaultAction": profile["defaultAction"],
        "architectures": architectures,
        "syscalls": _tightened(syscalls, granted),
    }
    if profile.get("defaultErrnoRet") is not None:
        section["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return section
