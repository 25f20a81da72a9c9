"""What a node runs when it first boots: write the run's join token and the CA of the
orchestrator's join service, put the run's volumes at `VOLUME_ROOT`, then start the
`substrate` agent as a systemd service on the agent port; the agent joins the run for its
certificate (api/squall/v1/join.proto) and serves mutual TLS with it.

One shell script for every cloud (AWS user data, GCP startup-script, Azure custom data all
run it). The node image must carry `squall` (it is the agent) and the NFS tools
(nfs-common, and nfs-kernel-server for the node that exports the volumes): the script
installs nothing and fails loudly in the cloud's console log when something is missing. The
join token is in the script, so every program hands it to its cloud as a Pulumi secret: it is
encrypted in the stack's state.

Volumes, by the spec's storage class:
- node-local: the directory on the node's own disk;
- nfs-first-node: node 0 of the first group exports the directory to the run's network
  (`NfsExport`), every other node mounts it from node 0's private address (`NfsMount`);
- managed: every node mounts the cloud's file system (`NfsMount`), with the options its
  cloud documents (in each program, next to the file system).
A node retries its mount for ten minutes (node 0 or the file system may still be coming up)
and starts no agent when it cannot: a node without the volumes must not take jobs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .spec import PERSISTENT_ROOT, VOLUME_ROOT, ClusterSpec, NodeGroup, StorageClass

__all__ = [
    "AGENT_DIR",
    "MOUNT_TRIES",
    "NFS_SERVER_OPTIONS",
    "TLS_DIR",
    "NfsExport",
    "NfsMount",
    "startup_script",
]

AGENT_DIR = "/etc/squall"
TLS_DIR = f"{AGENT_DIR}/tls"
MOUNT_TRIES, MOUNT_WAIT_S = 60, 10  # ten minutes for node 0 or the file system to answer
PERSISTENT_OPTIONS = (  # a share the whole team writes: no set-uid programs, no devices from it
    "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,nosuid,nodev"
)
# mounting node 0's export: NFSv4.1 over TCP, hard (a write is never dropped while the
# server restarts), as nfs(5) describes; the Linux server serves 1 MiB reads and writes
NFS_SERVER_OPTIONS = "nfsvers=4.1,proto=tcp,hard,timeo=600,retrans=2,rsize=1048576,wsize=1048576"

_UNIT = """[Unit]
Description=Squall node agent (substrate)
After=network-online.target
Wants=network-online.target
{requires}
[Service]
ExecStart={squall} agent --listen 0.0.0.0:{port} --token-file {dir}/agent.token \\
  --data-dir /var/lib/squall/agent --deny-network {control_plane} --host-network auto{extra}
EnvironmentFile=-{dir}/share.env
# what it says goes to the console too: a cloud's console log shows why a node did not join
StandardOutput=journal+console
StandardError=journal+console
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True, slots=True)
class NfsMount:
    """An NFS share this node mounts at VOLUME_ROOT: `host:/path` and the mount options."""

    source: str
    options: str


@dataclass(frozen=True, slots=True)
class NfsExport:
    """This node serves VOLUME_ROOT over NFS to `network` (the run's CIDR)."""

    network: str


def _say(message: str) -> str:
    """A line for the console log as well as the script's own output."""
    quoted = shlex.quote(message)
    return f"echo {quoted} >&2; echo {quoted} > /dev/console 2>/dev/null || true"


def _volumes(spec: ClusterSpec, mount: NfsMount | None, export: NfsExport | None) -> list[str]:
    storage = spec.storage
    if storage is None:
        return []
    root = shlex.quote(VOLUME_ROOT)
    lines = ["# the run's volumes"]
    if export is not None or storage.storage_class is StorageClass.NODE_LOCAL:
        lines.append(f"install -d -m 0755 {root}")
    if export is not None:
        line = f"{VOLUME_ROOT} {export.network}(rw,sync,no_subtree_check,no_root_squash)"
        lines += [
            "# nfs-kernel-server comes with the node image: nothing is installed at boot",
            "command -v exportfs >/dev/null || { "
            + _say("squall: the node image has no NFS server (nfs-kernel-server)")
            + "; exit 1; }",
            # the agents are root on every node and write the volumes as root: no root squash,
            # and the export reaches the run's own network only
            f"grep -qsxF {shlex.quote(line)} /etc/exports || "
            f"echo {shlex.quote(line)} >> /etc/exports",
            "systemctl enable --now nfs-server",
            "exportfs -ra",
        ]
    if mount is not None:
        lines += _nfs_mount(mount, VOLUME_ROOT, "the volumes")
    return lines


def _nfs_mount(mount: NfsMount, point: str, what: str) -> list[str]:
    """Mount `mount` at `point` now and after every boot (fstab), retrying for ten minutes
    with a word on the console: `what` is what it holds."""
    quoted = shlex.quote(point)
    fstab = f"{mount.source} {point} nfs {mount.options},_netdev,nofail 0 0"
    return [
        "command -v mount.nfs >/dev/null || { "
        + _say("squall: the node image has no NFS client (nfs-common)")
        + "; exit 1; }",
        f"install -d -m 0755 {quoted}",
        f"grep -qsF {shlex.quote(f' {point} ')} /etc/fstab || "
        f"echo {shlex.quote(fstab)} >> /etc/fstab",
        "tries=0",
        f"until mountpoint -q {quoted} || mount {quoted}; do",
        "  tries=$((tries + 1))",
        f'  if [ "$tries" -ge {MOUNT_TRIES} ]; then',
        "    "
        + _say(
            f"squall: cannot mount {what} ({mount.source}) at {point} "
            f"after {MOUNT_TRIES} tries; the agent is not started"
        ),
        "    exit 1",
        "  fi",
        "  " + _say(f"squall: waiting for {what} at {mount.source} ({MOUNT_WAIT_S} s)"),
        f"  sleep {MOUNT_WAIT_S}",
        "done",
    ]


def _persistent(spec: ClusterSpec) -> list[str]:
    """The team's share of persistent volumes, when the run has some: not the stack's, so
    NFS 4.1 with the options EFS, Filestore and Azure Files NFS all take."""
    if spec.persistent_share is None:
        return []
    share = NfsMount(spec.persistent_share, PERSISTENT_OPTIONS)
    host = shlex.quote(spec.persistent_share.partition(":")[0])
    return [
        "# the team's persistent volumes",
        *_nfs_mount(share, PERSISTENT_ROOT, "the persistent volumes"),
        # the node mounts it for its agent; a job never speaks NFS to it (every scope's
        # volumes are there): its addresses are denied to the containers
        f"deny=''; for a in $(getent ahostsv4 {host} | cut -d' ' -f1 | sort -u); do "
        'deny="$deny --deny-network $a/32"; done',
        f'[ -n "$deny" ] || {{ {_say("squall: cannot resolve the persistent share " + host)}; '
        "exit 1; }",
        f'echo "SQUALL_SHARE_DENY=$deny" > {AGENT_DIR}/share.env',
    ]


def startup_script(
    spec: ClusterSpec,
    group: NodeGroup,
    *,
    mount: NfsMount | None = None,
    export: NfsExport | None = None,
    index: int | None = None,
) -> str:
    """The boot script of a node of `group`: `mount` is the share it mounts at VOLUME_ROOT
    (nfs-first-node and managed storage), `export` says it serves VOLUME_ROOT itself (node 0
    under nfs-first-node), `index` is its place in the group when the node is made on its
    own (the one that keeps the volumes is 0; None: a node of the group's pool)."""
    if spec.storage is None and (mount or export):
        raise ValueError("a mount or an export for a cluster without storage")
    token = spec.bootstrap.join_token.get_secret_value()
    extra = ""
    if spec.storage is not None:
        extra += f" \\\n  --volume-root {VOLUME_ROOT}"
    if spec.persistent_share is not None:
        # and jobs never reach the team's share themselves: its addresses, found at boot
        extra += f" \\\n  --volume-root {PERSISTENT_ROOT} $SQUALL_SHARE_DENY"
    if group.spot:  # the cloud's two-minute (AWS) or 30-second warning, in Health
        extra += f" \\\n  --interruption-notices {spec.site.cloud}"
    boot = spec.bootstrap
    # the join writes the node's key, its certificate and the run's CA where TLS reads them
    extra += (
        f" \\\n  --join {shlex.quote(boot.orchestrator)}"
        f" --join-ca {AGENT_DIR}/orchestrator-ca.pem"
        f" --join-run {spec.run_id} --join-group {group.name}"
        + (f" --join-index {index}" if index is not None else "")
        + f" \\\n  --tls-cert {TLS_DIR}/node.pem --tls-key {TLS_DIR}/node.key"
        f" --tls-ca {TLS_DIR}/ca.pem"
    )
    for flag, registries in (
        ("--search-registry", boot.search_registries),
        ("--insecure-registry", boot.insecure_registries),
    ):
        extra += "".join(f" \\\n  {flag} {shlex.quote(r)}" for r in registries)
    unit = _UNIT.format(
        squall="/usr/local/bin/squall",
        port=spec.network.agent_port,
        dir=AGENT_DIR,
        # jobs never reach the orchestrator (nor, as on every node, the node itself)
        control_plane=shlex.quote(spec.network.orchestrator_cidr),
        # after a reboot, systemd mounts the share (fstab) before it starts the agent
        requires="".join(
            f"RequiresMountsFor={point}\n"
            for point, mounted in ((VOLUME_ROOT, mount), (PERSISTENT_ROOT, spec.persistent_share))
            if mounted
        ),
        extra=extra,
    )
    return "\n".join(
        [
            "#!/bin/sh",
            f"# squall run {spec.run_id}, node group {group.name}",
            "set -eu",
            "command -v squall >/dev/null || { echo 'squall: the node image has no squall' >&2; "
            "exit 1; }",
            # the unit runs /usr/local/bin/squall (the node image puts it there)
            'found="$(command -v squall)"; [ "$found" = /usr/local/bin/squall ] || '
            'ln -sf "$found" /usr/local/bin/squall',
            f"install -d -m 0700 {AGENT_DIR} /var/lib/squall/agent",
            "umask 077",
            f"printf %s {shlex.quote(token)} > {AGENT_DIR}/agent.token",
            f"cat > {AGENT_DIR}/orchestrator-ca.pem <<'SQUALL_CA'",
            boot.ca_certificate.strip(),
            "SQUALL_CA",
            f"echo {shlex.quote(boot.orchestrator)} > {AGENT_DIR}/orchestrator",
            # the node makes its own key: none of an earlier life of this disk
            f"rm -f {TLS_DIR}/node.pem {TLS_DIR}/node.key {TLS_DIR}/ca.pem",
            "umask 022",
            *_volumes(spec, mount, export),
            *_persistent(spec),
            "cat > /etc/systemd/system/squall-agent.service <<'SQUALL_UNIT'",
            unit.rstrip(),
            "SQUALL_UNIT",
            "systemctl daemon-reload",
            "systemctl enable --now squall-agent.service",
            "",
        ]
    )
