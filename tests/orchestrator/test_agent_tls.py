"""Mutual TLS between the orchestrator and a run's agents, on the local site's separate nodes
(real agents in their own network namespaces, as root): only the run's orchestrator
certificate, with the agent token, opens an agent; a plaintext client, a certificate of
another run's CA, or the node certificate itself (another node of the run) are refused; and
the node key lies in the agent's folder for root alone."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.provision import Cluster, LocalProvisioner, NodeSlice, local_plan
from orchestrator.provision.pki import make_run_pki
from substrate.client import ClientTLS, connect
from substrate.tls import NODE_NAME

MiB = 2**20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    root = tmp_path_factory.mktemp("tls-site")
    site = LocalProvisioner(root, namespaced=True)
    up = site.up(local_plan("tls-run", [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)] * 2))
    yield up, root
    site.down(up)


def health(address: str, token: str, tls: ClientTLS | None) -> grpc.StatusCode:
    channel, stub = connect(address, token, tls)
    try:
        stub.Health(pb.HealthRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def test_the_runs_orchestrator_certificate_opens_every_node(cluster) -> None:
    up, _ = cluster
    assert all(a.tls is not None for a in up.agents)
    for agent in up.agents:
        assert health(agent.address, agent.token, agent.tls) is grpc.StatusCode.OK


def test_plaintext_or_another_runs_certificate_cannot_call_an_agent(cluster) -> None:
    up, _ = cluster
    agent = up.agents[0]
    # the handshake fails: no method is reached
    assert health(agent.address, agent.token, None) is grpc.StatusCode.UNAVAILABLE
    stranger = make_run_pki("another-run").orchestrator
    assert health(agent.address, agent.token, stranger) is grpc.StatusCode.UNAVAILABLE
    # a certificate of the right CA is not enough without the token, nor the token without it
    assert health(agent.address, "wrong", agent.tls) is grpc.StatusCode.UNAUTHENTICATED


def test_a_nodes_own_certificate_opens_only_what_a_grant_does(cluster) -> None:
    up, root = cluster
    agent = up.agents[1]
    folder = root / "tls-run" / "node-0" / "tls"
    node = ClientTLS(
        ca=(folder / "ca.pem").read_bytes(),
        certificate=(folder / "node.pem").read_bytes(),
        key=(folder / "node.key").read_bytes(),
    )
    # another node of the run (a launcher) may not use the agent's API, token or not
    assert health(agent.address, agent.token, node) is grpc.StatusCode.PERMISSION_DENIED


def test_the_node_key_is_for_root_alone_and_the_certificate_names_the_node_role(cluster) -> None:
    _, root = cluster
    folder = root / "tls-run" / "node-0" / "tls"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("node.key", "node.pem", "ca.pem"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((folder / "node.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [NODE_NAME]
