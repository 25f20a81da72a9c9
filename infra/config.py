"""A `ClusterSpec` as stack configuration, and back: what lets the orchestrator's stacks and a
hand-run `pulumi up` read the same cluster.

Keys in the `squall` namespace: `spec` (the spec as JSON, without the join token and the
node's TLS key), `joinToken` and, when the agents use mutual TLS, `nodeKey` (Pulumi secrets:
encrypted in the stack's config and state).
"""

from __future__ import annotations

import json

from pydantic import SecretStr

from .spec import ClusterSpec

__all__ = ["NODE_KEY_KEY", "SPEC_KEY", "TOKEN_KEY", "spec_config", "spec_from_config"]

SPEC_KEY = "squall:spec"
TOKEN_KEY = "squall:joinToken"
NODE_KEY_KEY = "squall:nodeKey"
_HIDDEN = "(in squall:joinToken)"
_KEY_HIDDEN = "(in squall:nodeKey)"


def spec_config(spec: ClusterSpec) -> dict[str, tuple[str, bool]]:
    """{key: (value, secret)} for `Stack.set_all_config`."""
    data = spec.model_dump(mode="json")
    data["bootstrap"]["join_token"] = _HIDDEN
    node_key = spec.bootstrap.node_key.get_secret_value()
    data["bootstrap"]["node_key"] = _KEY_HIDDEN if node_key else ""
    config = {
        SPEC_KEY: (json.dumps(data, sort_keys=True), False),
        TOKEN_KEY: (spec.bootstrap.join_token.get_secret_value(), True),
    }
    if node_key:
        config[NODE_KEY_KEY] = (node_key, True)
    return config


def spec_from_config(spec_json: str, join_token: str, node_key: str = "") -> ClusterSpec:
    data = json.loads(spec_json)
    data["bootstrap"]["join_token"] = SecretStr(join_token)
    data["bootstrap"]["node_key"] = SecretStr(node_key)
    return ClusterSpec.model_validate(data)
