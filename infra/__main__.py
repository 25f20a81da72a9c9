"""`pulumi up` by hand, from the repository root (Pulumi.yaml points here):

    pulumi config set squall:spec "$(cat spec.json)"
    pulumi config set --secret squall:joinToken "$TOKEN"
    pulumi up

Squall itself runs the same `build` through the Automation API, one stack per run.
"""

import pulumi

from infra.config import spec_from_config
from infra.program import build

_config = pulumi.Config("squall")
build(spec_from_config(_config.require("spec"), _config.require("joinToken")))
