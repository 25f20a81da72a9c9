"""One entry point for every cloud: declare `spec`'s cluster and export its agents.

The stack's only output is `agents`: a list of {name, group, address}, where address is the
host:port of the node's agent API. The orchestrator turns it into agent endpoints.
"""

from __future__ import annotations

from typing import Any

import pulumi

from .spec import ClusterSpec

__all__ = ["build"]


def build(spec: ClusterSpec) -> list[dict[str, Any]]:
    """Declare the cluster in the current Pulumi stack (call it inside a program)."""
    if spec.site.cloud == "aws":
        from . import aws as cloud
    elif spec.site.cloud == "gcp":
        from . import gcp as cloud  # type: ignore[no-redef]
    else:
        from . import azure as cloud  # type: ignore[no-redef]
    agents = cloud.build(spec)
    pulumi.export("agents", agents)
    return agents
