"""How every cloud's nodes get their mutual TLS, under Pulumi's mocks (no cloud account, no
`pulumi` CLI here): no certificate or key is made for them; each node's secret boot script
carries the run's join token and the join service's CA, and starts the agent joining the run,
which writes the node's own key and certificate where the agent's TLS reads them. The token
is in no input in the clear, in no repr, and in no stack configuration value that is not
secret."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.bootstrap import TLS_DIR
from infra.config import SPEC_KEY, TOKEN_KEY, spec_config, spec_from_config
from infra.spec import Bootstrap, StorageClass

from .mocks import run
from .scripts import boot_scripts, in_plain_sight
from .specs import BOOT, TOKEN, with_volumes

CLOUDS = ("aws", "gcp", "azure")
INVOKES = {"gcp:compute/getZones:getZones": {"names": ["us-central1-a"]}}
FLAGS = f"--tls-cert {TLS_DIR}/node.pem --tls-key {TLS_DIR}/node.key --tls-ca {TLS_DIR}/ca.pem"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_node_joins_for_its_own_certificate_and_the_token_is_only_in_secrets(
    cloud: str,
) -> None:
    spec = with_volumes(cloud, StorageClass.NFS_FIRST_NODE, 2, 1, bootstrap=BOOT)
    mocks = run(spec, INVOKES)
    scripts = boot_scripts(mocks, cloud)  # each one asserted to be a secret input
    assert len(scripts) >= 2
    for script in scripts.values():
        lines = script.splitlines()
        # it trades the token for a certificate at the orchestrator's join service, checked
        # against the join CA written beside the token, under umask 077
        umask = lines.index("umask 077")
        assert lines.index(f"printf %s {TOKEN} > /etc/squall/agent.token") > umask
        ca = lines.index("cat > /etc/squall/orchestrator-ca.pem <<'SQUALL_CA'")
        assert "\n".join(lines[ca + 1 : ca + 4]) == BOOT.ca_certificate
        assert umask < ca < lines.index("umask 022")
        assert (
            f"--join 203.0.113.7:7433 --join-ca /etc/squall/orchestrator-ca.pem "
            f"--join-run {spec.run_id} --join-group " in script
        )
        assert FLAGS in script  # where the join writes the key, certificate and run CA
        assert script.index(FLAGS) < script.index("systemctl enable --now squall-agent")
        assert "PRIVATE KEY" not in script  # the key is made on the node
        assert f"cat > {TLS_DIR}/" not in script
        # and starts from no certificate of an earlier life of its disk
        assert f"rm -f {TLS_DIR}/node.pem {TLS_DIR}/node.key {TLS_DIR}/ca.pem" in script
    assert in_plain_sight(mocks, TOKEN) == []


def test_a_node_is_told_where_to_join_and_whose_certificate_to_trust() -> None:
    with pytest.raises(ValidationError, match="orchestrator"):
        Bootstrap(ca_certificate=BOOT.ca_certificate, join_token="t")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="ca_certificate"):
        Bootstrap(orchestrator="203.0.113.7:7433", ca_certificate="", join_token="t")
    with pytest.raises(ValidationError, match="orchestrator"):
        Bootstrap(orchestrator="no-port", ca_certificate=BOOT.ca_certificate, join_token="t")


def test_the_token_survives_stack_config_as_a_secret_only() -> None:
    spec = with_volumes("gcp", StorageClass.MANAGED, bootstrap=BOOT)
    assert TOKEN not in repr(spec)
    assert TOKEN not in spec.model_dump_json()
    config = spec_config(spec)
    assert TOKEN not in config[SPEC_KEY][0]
    assert config[TOKEN_KEY] == (TOKEN, True)
    back = spec_from_config(config[SPEC_KEY][0], TOKEN)
    assert back == spec
    assert back.storage == spec.storage
