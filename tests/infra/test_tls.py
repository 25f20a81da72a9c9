"""The agents' mutual TLS material on every cloud, under Pulumi's mocks (no cloud account, no
`pulumi` CLI here): the run's CA, the node certificate and its key reach every node in its
boot script, which each cloud gets as a Pulumi secret; the key is in no input in the clear,
in no repr, and in no stack configuration value that is not secret."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from infra.bootstrap import TLS_DIR
from infra.config import NODE_KEY_KEY, SPEC_KEY, TOKEN_KEY, spec_config, spec_from_config
from infra.spec import Bootstrap, StorageClass

from .mocks import run
from .scripts import boot_scripts, in_plain_sight
from .specs import BOOT, NODE_CERT, NODE_KEY, TLS_BOOT, TLS_CA, TOKEN, with_volumes

CLOUDS = ("aws", "gcp", "azure")
INVOKES = {"gcp:compute/getZones:getZones": {"names": ["us-central1-a"]}}
FLAGS = f"--tls-cert {TLS_DIR}/node.pem --tls-key {TLS_DIR}/node.key --tls-ca {TLS_DIR}/ca.pem"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_node_gets_the_tls_material_in_its_secret_boot_script_and_nowhere_in_the_clear(
    cloud: str,
) -> None:
    spec = with_volumes(cloud, StorageClass.NFS_FIRST_NODE, 2, 1, bootstrap=TLS_BOOT)
    mocks = run(spec, INVOKES)
    scripts = boot_scripts(mocks, cloud)  # each one asserted to be a secret input
    assert len(scripts) == 3
    for script in scripts.values():
        lines = script.splitlines()
        # written under umask 077, into a 0700 directory, each file 0600
        umask = lines.index("umask 077")
        assert lines.index(f"install -d -m 0700 {TLS_DIR}") > umask
        for name, pem in (("ca.pem", TLS_CA), ("node.pem", NODE_CERT), ("node.key", NODE_KEY)):
            marker = "SQUALL_" + name.replace(".", "_").upper()
            start = lines.index(f"cat > {TLS_DIR}/{name} <<'{marker}'")
            assert start > umask
            assert "\n".join(lines[start + 1 : start + 4]) == pem
        assert lines.index("umask 022") > start
        assert f"chmod 0600 {TLS_DIR}/ca.pem {TLS_DIR}/node.pem {TLS_DIR}/node.key" in lines
        assert FLAGS in script  # the agent serves and checks mutual TLS with them
        assert script.index(FLAGS) < script.index("systemctl enable --now squall-agent")
    # the key and the token: in the secret scripts only, never in an input stored in the clear
    assert in_plain_sight(mocks, "MC4node-key-s3cr3t-77e1") == []
    assert in_plain_sight(mocks, TOKEN) == []
    assert in_plain_sight(mocks, "MIIBrunCA") == []  # only ever inside the scripts


@pytest.mark.parametrize("cloud", CLOUDS)
def test_without_tls_material_the_agent_joins_for_its_own_certificate(cloud: str) -> None:
    spec = with_volumes(cloud, StorageClass.MANAGED, bootstrap=BOOT)
    assert spec.bootstrap.joins
    mocks = run(spec, INVOKES)
    for group, script in boot_scripts(mocks, cloud).items():
        del group
        # it trades the token for a certificate at the orchestrator's join service, checked
        # against the join CA written beside the token; the key is made on the node
        assert (
            f"--join 203.0.113.7:7433 --join-ca /etc/squall/orchestrator-ca.pem "
            f"--join-run {spec.run_id} --join-group " in script
        )
        assert FLAGS in script  # where the join writes the key, certificate and run CA
        assert "PRIVATE KEY" not in script
        assert f"cat > {TLS_DIR}/" not in script
        # and starts from no certificate of an earlier life of its disk
        assert f"rm -f {TLS_DIR}/node.pem {TLS_DIR}/node.key {TLS_DIR}/ca.pem" in script


def test_a_node_handed_its_certificate_does_not_join() -> None:
    assert not TLS_BOOT.joins
    assert not Bootstrap(join_token=SecretStr("t")).joins  # nowhere to join
    mocks = run(with_volumes("aws", StorageClass.MANAGED, bootstrap=TLS_BOOT), INVOKES)
    for script in boot_scripts(mocks, "aws").values():
        assert "--join" not in script


def test_the_node_key_never_shows_and_comes_with_its_certificate_and_ca() -> None:
    spec = with_volumes("aws", StorageClass.MANAGED, bootstrap=TLS_BOOT)
    assert NODE_KEY not in repr(spec)
    assert NODE_KEY not in str(spec.bootstrap)
    assert "MC4node-key" not in spec.model_dump_json()
    assert spec.bootstrap.node_key.get_secret_value() == NODE_KEY
    with pytest.raises(ValidationError, match="node_key missing"):
        Bootstrap(join_token=SecretStr("t"), tls_ca=TLS_CA, node_certificate=NODE_CERT)
    with pytest.raises(ValidationError, match="tls_ca, node_certificate missing"):
        Bootstrap(join_token=SecretStr("t"), node_key=SecretStr(NODE_KEY))


def test_the_node_key_survives_stack_config_as_a_secret_only() -> None:
    spec = with_volumes("gcp", StorageClass.MANAGED, bootstrap=TLS_BOOT)
    config = spec_config(spec)
    assert "MC4node-key" not in config[SPEC_KEY][0]
    assert config[NODE_KEY_KEY] == (NODE_KEY, True)
    assert config[TOKEN_KEY] == (TOKEN, True)
    back = spec_from_config(config[SPEC_KEY][0], TOKEN, NODE_KEY)
    assert back == spec
    assert back.storage == spec.storage
    # without TLS there is no key to keep
    plain = with_volumes("gcp", StorageClass.MANAGED)
    assert NODE_KEY_KEY not in spec_config(plain)
    assert spec_from_config(spec_config(plain)[SPEC_KEY][0], TOKEN) == plain
