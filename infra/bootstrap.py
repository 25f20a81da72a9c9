"""What a node runs when it first boots: write the agent's token and the orchestrator's CA,
then start the `substrate` agent as a systemd service on the agent port.

One shell script for every cloud (AWS user data, GCP startup-script, Azure custom data all
run it). The node image must carry `squall` (it is the agent); the script fails loudly in
the cloud's console log when it does not. The join token is in the script, so every program
hands it to its cloud as a Pulumi secret: it is encrypted in the stack's state.
"""

from __future__ import annotations

import shlex

from .spec import ClusterSpec, NodeGroup

__all__ = ["AGENT_DIR", "startup_script"]

AGENT_DIR = "/etc/squall"

_UNIT = """[Unit]
Description=Squall node agent (substrate)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={squall} agent --listen 0.0.0.0:{port} --token-file {dir}/agent.token \\
  --data-dir /var/lib/squall/agent --deny-network {control_plane} --host-network auto
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def startup_script(spec: ClusterSpec, group: NodeGroup) -> str:
    """The boot script of every node of `group`."""
    token = spec.bootstrap.join_token.get_secret_value()
    unit = _UNIT.format(
        squall="/usr/local/bin/squall",
        port=spec.network.agent_port,
        dir=AGENT_DIR,
        # jobs never reach the orchestrator (nor, as on every node, the node itself)
        control_plane=shlex.quote(spec.network.orchestrator_cidr),
    )
    return "\n".join(
        [
            "#!/bin/sh",
            f"# squall run {spec.run_id}, node group {group.name}",
            "set -eu",
            "command -v squall >/dev/null || { echo 'squall: the node image has no squall' >&2; "
            "exit 1; }",
            'ln -sf "$(command -v squall)" /usr/local/bin/squall 2>/dev/null || true',
            f"install -d -m 0700 {AGENT_DIR} /var/lib/squall/agent",
            "umask 077",
            f"printf %s {shlex.quote(token)} > {AGENT_DIR}/agent.token",
            *(
                [
                    f"cat > {AGENT_DIR}/orchestrator-ca.pem <<'SQUALL_CA'",
                    spec.bootstrap.ca_certificate.strip(),
                    "SQUALL_CA",
                ]
                if spec.bootstrap.ca_certificate
                else []
            ),
            *(
                [f"echo {shlex.quote(spec.bootstrap.orchestrator)} > {AGENT_DIR}/orchestrator"]
                if spec.bootstrap.orchestrator
                else []
            ),
            "cat > /etc/systemd/system/squall-agent.service <<'SQUALL_UNIT'",
            unit.rstrip(),
            "SQUALL_UNIT",
            "systemctl daemon-reload",
            "systemctl enable --now squall-agent.service",
            "",
        ]
    )
