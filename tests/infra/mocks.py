"""A recording stand-in for the Pulumi engine and the cloud providers.

No cloud can be reached from here and there is no `pulumi` CLI, so the programs run under
`pulumi.runtime.set_mocks`: every resource registration reaches `new_resource`, which records
the inputs and answers with what a provider would compute (ids, names, IPs, self links). The
tests assert on both the recorded inputs and the program's resolved outputs.
"""

from __future__ import annotations

import itertools
from typing import Any

import pulumi

# what a lookup answers unless a test says otherwise: an AMI's root device, an SSM parameter
DEFAULT_INVOKES: dict[str, dict[str, Any]] = {
    "aws:ec2/getAmi:getAmi": {"rootDeviceName": "/dev/xvda", "id": "ami-0123"},
    "aws:ssm/getParameter:getParameter": {"value": "ami-0123", "type": "String"},
}


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self, invokes: dict[str, dict[str, Any]] | None = None) -> None:
        self.created: list[pulumi.runtime.MockResourceArgs] = []
        self.states: dict[tuple[str, str], dict[str, Any]] = {}  # what each one answered
        self.invokes = invokes or {}
        self._n = itertools.count(1)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        key = (args.typ, args.name)
        # the real engine refuses two resources with one URN; the mock monitor does not
        assert key not in {(r.typ, r.name) for r in self.created}, f"duplicate {key}"
        self.created.append(args)
        n = next(self._n)
        physical = args.inputs.get("name", f"{args.name}-{n:04x}")
        state = {
            **args.inputs,
            "name": physical,
            "arn": f"arn:aws:mock:::{args.name}",
            "latestVersion": 1,
            "publicIp": f"198.51.{n // 250}.{n % 250 + 1}",
            "privateIp": f"10.42.{n // 250}.{n % 250 + 1}",
            "primaryNetworkInterfaceId": f"eni-{n:08x}",
            "selfLink": f"https://compute.mock/{args.typ}/{args.name}",
            "selfLinkUnique": f"https://compute.mock/{args.typ}/{args.name}?uniqueId={n}",
            "ipAddress": f"198.51.{n // 250}.{n % 250 + 1}",
        }
        if args.typ == "gcp:compute/instance:Instance":  # GCP computes the addresses
            state["networkInterfaces"] = [
                {
                    **nic,
                    "networkIp": state["privateIp"],
                    "accessConfigs": [
                        {**c, "natIp": state["publicIp"]} for c in nic.get("accessConfigs", [])
                    ],
                }
                for nic in args.inputs.get("networkInterfaces", [])
            ]
        if args.typ == "azure-native:network:NetworkInterface":  # Azure assigns the address
            state["ipConfigurations"] = [
                {**c, "privateIPAddress": state["privateIp"]}
                for c in args.inputs.get("ipConfigurations", [])
            ]
        named_by = {  # ARM names these by an input of their own
            "azure-native:storage:StorageAccount": "accountName",
            "azure-native:storage:FileShare": "shareName",
        }.get(args.typ)
        if named_by in args.inputs:
            state["name"] = args.inputs[named_by]
        if args.typ == "aws:efs/mountTarget:MountTarget":  # in the run's subnet
            state["ipAddress"] = state["privateIp"]
        if args.typ == "gcp:filestore/instance:Instance":  # an address on the peered range
            state["networks"] = [
                {**net, "ipAddresses": [f"10.200.{n // 250}.{n % 250 + 2}"]}
                for net in args.inputs.get("networks", [])
            ]
        rid = f"{args.name}-id"
        if args.typ.startswith("azure-native:"):
            rid = f"/subscriptions/mock/resourceGroups/rg/providers/{args.typ}/{args.name}"
        self.states[key] = state
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {**DEFAULT_INVOKES.get(args.token, {}), **self.invokes.get(args.token, {})}

    def of(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.created if r.typ == typ]

    def named(self, typ: str, name: str) -> pulumi.runtime.MockResourceArgs:
        [found] = [r for r in self.created if r.typ == typ and r.name == name]
        return found

    def state(self, typ: str, name: str) -> dict[str, Any]:
        """What the mock answered for a resource: its outputs (inputs echoed, and computed)."""
        return self.states[(typ, name)]

    def types(self) -> set[str]:
        return {r.typ for r in self.created}


def install(stack: str, invokes: dict[str, dict[str, Any]] | None = None) -> RecordingMocks:
    mocks = RecordingMocks(invokes)
    pulumi.runtime.set_mocks(mocks, project="squall", stack=stack, preview=False)
    return mocks


def run(spec: Any, invokes: dict[str, dict[str, Any]] | None = None) -> RecordingMocks:
    """Build `spec`'s program under fresh mocks; return the record (the assertions run after
    every registration and output has settled)."""
    from infra import program

    mocks = install(spec.stack_name, invokes)

    @pulumi.runtime.test
    def build() -> None:
        program.build(spec)

    build()
    return mocks
