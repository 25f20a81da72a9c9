"""Reading what the programs handed each cloud, as the mocks recorded it: every node's boot
script, and every input that is not a Pulumi secret."""

from __future__ import annotations

import base64
import binascii
import contextlib
import shlex
from collections.abc import Iterator
from typing import Any

from .mocks import RecordingMocks

# how a secret input reaches the engine (and so the mock): {SIG: VALUE, "value": ...}
SECRET_SIG, SECRET_VALUE = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"
INSTANCES = {
    "aws": "aws:ec2/instance:Instance",
    "gcp": "gcp:compute/instance:Instance",
    "azure": "azure-native:compute:VirtualMachine",
}
SCALE_SETS = {
    "aws": "aws:ec2/fleet:Fleet",
    "gcp": "gcp:compute/instanceGroupManager:InstanceGroupManager",
    "azure": "azure-native:compute:VirtualMachineScaleSet",
}


def secret(value: Any) -> Any:
    """The value inside a secret input; fails when the input is not secret."""
    assert isinstance(value, dict), "not a secret"
    assert value.get(SECRET_SIG) == SECRET_VALUE, "not a secret"
    return value["value"]


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


def template_of(mocks: RecordingMocks, template_id: str) -> Any:
    """The AWS launch template `template_id` names."""
    [template] = [
        t
        for t in mocks.of("aws:ec2/launchTemplate:LaunchTemplate")
        if f"{t.name}-id" == template_id
    ]
    return template


def fleet_template(mocks: RecordingMocks, fleet: Any) -> Any:
    """The launch template of an AWS fleet."""
    [config] = fleet.inputs["launchTemplateConfigs"]
    return template_of(mocks, config["launchTemplateSpecification"]["launchTemplateId"])


def mig_template(mocks: RecordingMocks, mig: Any) -> Any:
    """The instance template of a GCP managed instance group."""
    [version] = mig.inputs["versions"]
    [template] = [
        t
        for t in mocks.of("gcp:compute/instanceTemplate:InstanceTemplate")
        if mocks.state(t.typ, t.name)["selfLinkUnique"] == version["instanceTemplate"]
    ]
    return template


def boot_scripts(mocks: RecordingMocks, cloud: str) -> dict[str, str]:
    """Node name (or, for a scale set's nodes, the scale set's) -> the boot script its cloud
    runs (each asserted to be a secret input)."""
    scripts = {}
    for pool in mocks.of(SCALE_SETS.get(cloud, "none")):
        if cloud == "aws":
            scripts[pool.name] = _b64(secret(fleet_template(mocks, pool).inputs["userData"]))
            continue
        if cloud == "gcp":
            template = mig_template(mocks, pool)
            scripts[pool.name] = secret(template.inputs["metadata"])["user-data"]
            continue
        profile = secret(pool.inputs["virtualMachineProfile"])  # the custom data makes it so
        scripts[pool.name] = _b64(profile["osProfile"]["customData"])
    for node in mocks.of(INSTANCES[cloud]):
        if cloud == "aws":  # the user data of the node's launch template
            template = template_of(mocks, node.inputs["launchTemplate"]["id"])
            scripts[node.name] = _b64(secret(template.inputs["userData"]))
        elif cloud == "gcp":
            scripts[node.name] = secret(node.inputs["metadata"])["user-data"]
        else:  # the custom data makes the whole OS profile secret
            scripts[node.name] = _b64(secret(node.inputs["osProfile"])["customData"])
    return scripts


def groups_of(scripts: dict[str, str]) -> list[str]:
    """The node group of each boot script (keyed NODE or GROUP-nodes by `boot_scripts`)."""
    return sorted(name.rsplit("-", 1)[0] for name in scripts)


def node_disks(mocks: RecordingMocks, cloud: str) -> list[int]:
    """The root disk size (GiB) of every node, a scale set's counted once per VM."""
    disks = {
        "aws": lambda n: n.inputs["rootBlockDevice"]["volumeSize"],
        "gcp": lambda n: n.inputs["bootDisk"]["initializeParams"]["size"],
        "azure": lambda n: n.inputs["storageProfile"]["osDisk"]["diskSizeGB"],
    }
    sizes = [int(disks[cloud](n)) for n in mocks.of(INSTANCES[cloud])]
    for pool in mocks.of(SCALE_SETS.get(cloud, "none")):
        if cloud == "aws":
            [root] = fleet_template(mocks, pool).inputs["blockDeviceMappings"]
            count = pool.inputs["targetCapacitySpecification"]["totalTargetCapacity"]
            sizes += [int(root["ebs"]["volumeSize"])] * int(count)
            continue
        if cloud == "gcp":
            [disk] = mig_template(mocks, pool).inputs["disks"]
            sizes += [int(disk["diskSizeGb"])] * int(pool.inputs["targetSize"])
            continue
        profile = secret(pool.inputs["virtualMachineProfile"])
        sizes += [int(profile["storageProfile"]["osDisk"]["diskSizeGB"])] * int(
            pool.inputs["sku"]["capacity"]
        )
    return sizes


def plain_texts(value: Any) -> Iterator[str]:
    """Every string in `value` outside a secret, and what it decodes to when it is base64."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG) == SECRET_VALUE:
            return
        for v in value.values():
            yield from plain_texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from plain_texts(v)
    elif isinstance(value, str):
        yield value
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            yield base64.b64decode(value, validate=True).decode()


def in_plain_sight(mocks: RecordingMocks, text: str) -> list[str]:
    """The resources with `text` in an input that is not secret (and so is stored in the
    stack's state in the clear)."""
    return [
        f"{r.typ} {r.name}" for r in mocks.created if any(text in t for t in plain_texts(r.inputs))
    ]


def mounted_source(script: str, root: str = "", what: str = "the volumes") -> tuple[str, str]:
    """(source, options) of the share the script mounts at `root` (VOLUME_ROOT by default),
    after checking that it mounts it (retrying) before it starts the agent, and starts the
    agent on it."""
    from infra.spec import VOLUME_ROOT

    root = root or VOLUME_ROOT
    [line] = [line for line in script.splitlines() if f" {root} nfs " in line]
    [fstab] = [word for word in shlex.split(line) if f" {root} nfs " in word]
    source, point, kind, options = fstab.split()[:4]
    assert (point, kind) == (root, "nfs")
    mount = script.index(f"until mountpoint -q {root} || mount {root}; do")
    assert mount < script.index("systemctl enable --now squall-agent.service")
    assert f"squall: cannot mount {what} (" in script  # what the console says when it gives up
    assert f"--volume-root {root}" in script
    assert f"RequiresMountsFor={root}" in script
    return source, options.removesuffix(",_netdev,nofail")
