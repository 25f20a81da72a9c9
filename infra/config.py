"""A `ClusterSpec` as stack configuration, and back: what lets the orchestrator's stacks and a
hand-run `pulumi up` read the same cluster.

Keys in the `squall` namespace: `spec` (the spec as JSON, without the join token) and
`joinToken` (a Pulumi secret: encrypted in the stack's config and state).
"""

from __future__ import annotations

import json

from pydantic import SecretStr

from .spec import ClusterSpec

__all__ = ["SPEC_KEY", "TOKEN_KEY", "spec_config", "spec_from_config"]

SPEC_KEY = "squall:spec"
TOKEN_KEY = "squall:joinToken"
_HIDDEN = "(in squall:joinToken)"


def spec_config(spec: ClusterSpec) -> dict[str, tuple[str, bool]]:
    """{key: (value, secret)} for `Stack.set_all_config`."""
    data = spec.model_dump(mode="json")
    data["bootstrap"]["join_token"] = _HIDDEN
    return {
        SPEC_KEY: (json.dumps(data, sort_keys=True), False),
        TOKEN_KEY: (spec.bootstrap.join_token.get_secret_value(), True),
    }


def spec_from_config(spec_json: str, join_token: str) -> ClusterSpec:
    data = json.loads(spec_json)
    data["bootstrap"]["join_token"] = SecretStr(join_token)
    return ClusterSpec.model_validate(data)
