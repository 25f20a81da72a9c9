"""The host network's firewall (HostNetwork): sockets of the containers' host ids are kept
from the agent's port and the denied networks over IPv4 and IPv6 alike, the cloud metadata
services' IPv6 addresses included. Its own network namespace, nftables (as root)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PROBE = textwrap.dedent(
    """
    import os, socket, subprocess
    from substrate.network import HostNetwork
    def sh(line):
        subprocess.run(line, shell=True, check=True)
    sh("ip link set lo up; ip link add h0 type veth peer name h1; ip link set h0 up; "
       "ip link set h1 up; ip addr add 10.9.0.5/24 dev h0; "
       "ip route add default via 10.9.0.1; ip -6 addr add fd00:1::5/64 dev h0 nodad; "
       "ip -6 route add default via fd00:1::1")
    host = HostNetwork("fwtest", "10.9.0.5", (100000, 165535),
                       ["169.254.0.0/16", "2001:db8:77::/48"])
    host.start(7431)
    if os.fork() == 0:
        os.setgid(100000)
        os.setuid(100001)
        for address in ("169.254.169.254", "fd00:ec2::254", "fd20:ce::254", "2001:db8:77::9",
                        "fd00:1::9"):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                try:
                    sock.sendto(b"x", (address, 53))
                    print(address, "sent", flush=True)
                except PermissionError:
                    print(address, "dropped", flush=True)
        os._exit(0)
    os.wait()
    host.stop()
    """
)


def test_containers_on_the_host_network_are_kept_from_denied_ipv6_networks(tmp_path: Path) -> None:
    name = f"sqfwtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            timeout=60,
            check=False,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert result.returncode == 0, result.stderr
    assert not result.stderr, result.stderr
    assert result.stdout.splitlines() == [
        "169.254.169.254 dropped",
        "fd00:ec2::254 dropped",
        "fd20:ce::254 dropped",
        "2001:db8:77::9 dropped",  # a denied network given in IPv6
        "fd00:1::9 sent",  # the node's own network
    ]
