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

import ctypes
import errno
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
    "seccomp_bpf",
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


# ---- the profile, compiled once ---------------------------------------------------------------
#
# crun compiles `linux.seccomp` with libseccomp at every start (about 25 ms of CPU here, more
# than the rest of a launch). The agent compiles the same section once, with the same library,
# and hands crun the program (`run.oci.seccomp_bpf_data`).

_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _action(name: str, errno_ret: int | None) -> int:
    try:
        action = _ACTIONS[name]
    except KeyError:
        raise ConfinementError(f"unknown seccomp action {name!r}") from None
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        action |= (1 if errno_ret is None else errno_ret) & 0xFFFF
    return action


def _libseccomp() -> Any:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise ConfinementError("libseccomp is not installed (crun depends on it)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_arch_add.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    return lib


@functools.cache
def _compiled(section_json: str) -> bytes:
    section = json.loads(section_json)
    lib = _libseccomp()
    default = _action(section["defaultAction"], section.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise ConfinementError("libseccomp could not start a filter")
    try:
        for arch in section.get("architectures") or ():
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            if token and lib.seccomp_arch_add(ctx, token) not in (0, -errno.EEXIST):
                raise ConfinementError(f"libseccomp cannot add the architecture {arch}")
        for rule in section["syscalls"]:
            action = _action(rule["action"], rule.get("errnoRet"))
            if action == default:
                continue  # libseccomp refuses a rule that says what the default says
            args = rule.get("args") or []
            cmps = (_ArgCmp * max(len(args), 1))(
                *(
                    _ArgCmp(a["index"], _OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
                    for a in args
                )
            )
            for name in rule["names"]:
                number = lib.seccomp_syscall_resolve_name(name.encode())
                if number == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp
                    continue
                result = lib.seccomp_rule_add_array(ctx, action, number, len(args), cmps)
                if result != 0 and action != _ACTIONS["SCMP_ACT_ALLOW"]:
                    # an allow that cannot be added only denies more; a denial must hold
                    raise ConfinementError(
                        f"libseccomp refused the rule for {name}: {os.strerror(-result)}"
                    )
        fd = os.memfd_create("seccomp.bpf", os.MFD_CLOEXEC)
        try:
            if lib.seccomp_export_bpf(ctx, fd) != 0:
                raise ConfinementError("libseccomp could not export the filter")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def seccomp_bpf(section: dict[str, Any]) -> bytes:
    """The BPF program of an OCI `linux.seccomp` section, compiled by libseccomp (cached)."""
    return _compiled(json.dumps(section, sort_keys=True))
