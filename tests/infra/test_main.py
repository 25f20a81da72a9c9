"""`pulumi up` by hand: infra/__main__.py reads the spec from stack config (Pulumi's mocks
stand in for the engine; there is no `pulumi` CLI here)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pulumi

from infra.config import SPEC_KEY, TOKEN_KEY, spec_config, spec_from_config

from .mocks import install
from .specs import TOKEN, cpu_job, placed

MAIN = Path(__file__).resolve().parents[2] / "infra" / "__main__.py"


def test_the_spec_survives_stack_config_without_its_token_in_plain_text():
    spec = placed("aws", cpu_job())
    config = spec_config(spec)
    assert TOKEN not in config[SPEC_KEY][0]
    assert config[TOKEN_KEY] == (TOKEN, True)  # set as a secret
    assert spec_from_config(config[SPEC_KEY][0], config[TOKEN_KEY][0]) == spec


def test_main_builds_the_cluster_from_stack_config():
    spec = placed("gcp", cpu_job())
    mocks = install(
        spec.stack_name, {"gcp:compute/getZones:getZones": {"names": ["us-central1-a"]}}
    )
    for key, (value, _) in spec_config(spec).items():
        pulumi.runtime.set_config(key, value)

    @pulumi.runtime.test
    def run():
        runpy.run_path(str(MAIN), run_name="__main__")

    run()
    [node] = mocks.of("gcp:compute/instanceTemplate:InstanceTemplate")
    assert node.inputs["machineType"] == spec.node_groups[0].instance_type
    assert TOKEN in node.inputs["metadata"]["value"]["user-data"]  # a secret
