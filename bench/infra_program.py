"""How long Squall's Pulumi programs take to declare a big cluster, next to the floor: the
same number of bare instances declared straight with the provider SDK, in one run.

Run: .venv/bin/python bench/infra_program.py [--nodes 128] [--repeat 3]

Both sides run under `pulumi.runtime.set_mocks` (there is no `pulumi` engine or cloud here),
so what is timed is the program itself: building the resource graph, registering every
resource with the (mock) engine and resolving every output the program exports. Imports are
done before the clock starts. For each cloud:
- squall: `infra.program.build` on a spec of NODES nodes in one compact group on a fabric
  (AWS p5.48xlarge with 32 EFA cards; GCP a3-highgpu-8g; Azure Standard_HB176rs_v4);
- bare: NODES instances of the same type, no network, no placement, no tags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pulumi  # noqa: E402
import pulumi_aws as aws  # noqa: E402
import pulumi_gcp as gcp  # noqa: E402
from pulumi_azure_native import compute  # noqa: E402

from infra import program  # noqa: E402
from infra.spec import Bootstrap, ClusterSpec, Fabric, Network, NodeGroup, SiteRef  # noqa: E402

GROUPS = {
    "aws": ("us-east-2", "p5.48xlarge", Fabric.EFA, 32, "ami-0123456789", 8, "H100"),
    "gcp": (
        "us-central1",
        "a3-highgpu-8g",
        Fabric.GPUDIRECT,
        0,
        "projects/p/global/images/i",
        8,
        "H100",
    ),
    "azure": (
        "eastus",
        "Standard_HB176rs_v4",
        Fabric.INFINIBAND,
        0,
        "Debian:debian-12:12-gen2:latest",
        0,
        "",
    ),
}


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.count = 0

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.count += 1
        state = {
            **args.inputs,
            "name": f"{args.name}-x",
            "publicIp": "198.51.100.1",
            "ipAddress": "198.51.100.1",
            "selfLink": args.name,
            "latestVersion": 1,
        }
        if args.typ == "gcp:compute/instance:Instance":
            state["networkInterfaces"] = [
                {
                    **n,
                    "networkIp": "10.0.0.1",
                    "accessConfigs": [
                        {"natIp": "198.51.100.1"} for _ in n.get("accessConfigs", [])
                    ],
                }
                for n in args.inputs.get("networkInterfaces", [])
            ]
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {"names": ["zone-a"]}


def spec(cloud: str, nodes: int) -> ClusterSpec:
    region, kind, fabric, efa, image, gpus, model = GROUPS[cloud]
    return ClusterSpec(
        run_id="0f8fad5b-d9cb-469f-a165-70867728950e",
        owner="bench",
        expires_at=datetime(2026, 11, 23, tzinfo=UTC),
        site=SiteRef(cloud=cloud, region=region),  # type: ignore[arg-type]
        node_groups=(
            NodeGroup(
                name="mpi",
                instance_type=kind,
                count=nodes,
                image=image,
                fabric=fabric,
                efa_interfaces=efa,
                compact=True,
                gpus=gpus,
                gpu_model=model,
            ),
        ),
        network=Network(orchestrator_cidr="203.0.113.7/32"),
        bootstrap=Bootstrap(
            orchestrator="203.0.113.7:7443",
            ca_certificate="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            join_token="bench-token",
        ),
    )


def bare(cloud: str, nodes: int) -> list[Any]:
    region, kind, *_, image, _gpus, _model = GROUPS[cloud]
    if cloud == "aws":
        return [aws.ec2.Instance(f"n{i}", instance_type=kind, ami=image).id for i in range(nodes)]
    if cloud == "gcp":
        return [
            gcp.compute.Instance(
                f"n{i}",
                machine_type=kind,
                zone="zone-a",
                boot_disk=gcp.compute.InstanceBootDiskArgs(
                    initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(image=image)
                ),
                network_interfaces=[gcp.compute.InstanceNetworkInterfaceArgs(network="default")],
            ).id
            for i in range(nodes)
        ]
    return [
        compute.VirtualMachine(
            f"n{i}",
            resource_group_name="rg",
            location=region,
            hardware_profile=compute.HardwareProfileArgs(vm_size=kind),
        ).id
        for i in range(nodes)
    ]


def timed(make: Callable[[], list[Any]], stack: str) -> tuple[float, int]:
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="squall", stack=stack, preview=False)
    start = time.perf_counter()

    @pulumi.runtime.test
    def run() -> Any:
        return pulumi.Output.all(*make())

    run()
    return time.perf_counter() - start, mocks.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.nodes}-node cluster, best and median of {args.repeat} (s); resources registered")
    print(
        f"{'cloud':<6} {'squall best':>11} {'median':>7} {'res':>5}   "
        f"{'bare best':>9} {'median':>7} {'res':>5}"
    )
    for n, cloud in enumerate(GROUPS):
        # warm up: the provider SDKs load their modules lazily, on first use
        timed(lambda c=cloud: program.build(spec(c, 2)) or [], f"w{n}")
        timed(lambda c=cloud: bare(c, 2), f"v{n}")
        s = spec(cloud, args.nodes)
        ours, floor = [], []
        for r in range(args.repeat):
            t, ours_count = timed(lambda s=s: program.build(s) or [], f"s{n}{r}")
            ours.append(t)
            t, bare_count = timed(lambda c=cloud: bare(c, args.nodes), f"b{n}{r}")
            floor.append(t)
        print(
            f"{cloud:<6} {min(ours):>11.2f} {statistics.median(ours):>7.2f} {ours_count:>5}   "
            f"{min(floor):>9.2f} {statistics.median(floor):>7.2f} {bare_count:>5}"
        )


if __name__ == "__main__":
    main()
