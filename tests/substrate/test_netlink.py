"""The agent's rtnetlink requests against `ip`, in a network namespace of the test's own
(`unshare --net`): the bridge and routes it makes, and the networks and routes it lists, are
what `ip` shows there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import ipaddress, json, subprocess, sys
from substrate.netlink import Rtnl

def ip(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, check=True).stdout)

def ip_networks():
    return sorted(
        str(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
        for entry in ip("-4", "addr") for a in entry["addr_info"]
    )

out = {}
with Rtnl() as rtnl:
    rtnl.set_up("lo")
    rtnl.add_bridge("sqbtest")
    rtnl.add_address("sqbtest", ipaddress.IPv4Interface("10.77.3.1/24"))
    rtnl.set_up("sqbtest")
    link = ip("-d", "link", "show", "dev", "sqbtest")[0]
    out["kind"] = link.get("linkinfo", {}).get("info_kind")
    out["up"] = "UP" in link["flags"]
    out["networks"] = sorted(map(str, rtnl.ipv4_networks()))
    out["ip_networks"] = ip_networks()
    import socket
    out["bridge_networks"] = list(map(str, rtnl.ipv4_networks(socket.if_nametoindex("sqbtest"))))
    rtnl.add_route(ipaddress.IPv4Address("10.77.3.9"), ipaddress.IPv4Network("10.88.1.0/24"))
    rtnl.add_default_route(ipaddress.IPv4Address("10.77.3.254"))
    out["routes"] = sorted(map(str, rtnl.ipv4_routes()))
    out["ip_routes"] = sorted(r["dst"] for r in ip("-4", "route") if r["dst"] != "default")
    out["via"] = sorted((r["dst"], r["gateway"]) for r in ip("-4", "route") if "gateway" in r)
    rtnl.delete_link("sqbtest")
    out["left"] = [entry["ifname"] for entry in ip("link")]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip")
def test_the_bridge_and_the_lists_match_what_ip_shows() -> None:
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["kind"] == "bridge"
    assert out["up"]
    assert out["networks"] == out["ip_networks"] == ["10.77.3.0/24", "127.0.0.0/8"]
    assert out["bridge_networks"] == ["10.77.3.0/24"]
    assert out["routes"] == out["ip_routes"]
    assert "10.77.3.0/24" in out["routes"]
    assert [tuple(v) for v in out["via"]] == [
        ("10.88.1.0/24", "10.77.3.9"),
        ("default", "10.77.3.254"),
    ]
    assert out["left"] == ["lo"]
