"""One entry point for every cloud: declare `spec`'s cluster.

The stack has no outputs: its nodes boot with the run's join token and join the run at the
orchestrator's join service (api/squall/v1/join.proto), which learns their addresses then, so
nodes a scale set makes are found like any other.
"""

from __future__ import annotations

from .spec import ClusterSpec

__all__ = ["build"]


def build(spec: ClusterSpec) -> None:
    """Declare the cluster in the current Pulumi stack (call it inside a program)."""
    if spec.site.cloud == "aws":
        from . import aws as cloud
    elif spec.site.cloud == "gcp":
        from . import gcp as cloud  # type: ignore[no-redef]
    else:
        from . import azure as cloud  # type: ignore[no-redef]
    cloud.build(spec)
