"""Nodes join their run (api/squall/v1/join.proto): a real join service on loopback, real
agents started with --join. A node trades its run's token and a certificate request for a
certificate of the run's CA and serves mutual TLS with it; a wrong token, an unknown group,
one node too many, or a join service whose certificate the node does not trust get nothing;
the orchestrator's wait names the nodes missing and what they said."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.provision.base import ProvisionError
from orchestrator.provision.pki import RunAuthority, join_identity
from orchestrator.provision.registrar import Registrar
from substrate.client import connect
from substrate.join import JoinError, JoinRequest, join, say
from substrate.tls import NODE_NAME

TOKEN = "join-token-of-run-1"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Registrar, RunAuthority, Path]]:
    identity = join_identity(tmp_path / "join")
    registrar = Registrar(identity, "127.0.0.1:0")
    authority = RunAuthority("run-1")
    registrar.open("run-1", TOKEN, authority, {"ring": 2})
    yield registrar, authority, tmp_path
    registrar.stop()


def request(registrar: Registrar, folder: Path, **change: object) -> JoinRequest:
    fields: dict[str, object] = {
        "orchestrator": f"127.0.0.1:{registrar.port}",
        "join_ca": (folder / "join" / "join-ca.pem").read_bytes(),
        "run_id": "run-1",
        "token": TOKEN,
        "group": "ring",
        "agent_port": 7431,
        "hostname": "host-a",
    }
    fields.update(change)
    return JoinRequest(**fields)  # type: ignore[arg-type]


def test_a_node_gets_a_certificate_of_its_runs_ca_for_its_own_key(service) -> None:
    registrar, authority, folder = service
    name = join(request(registrar, folder), folder / "tls", deadline_s=10)
    assert name == "ring-0"
    cert = x509.load_pem_x509_certificate((folder / "tls" / "node.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(authority.ca))
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == NODE_NAME
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {NODE_NAME, "ring-0"}
    assert (folder / "tls" / "ca.pem").read_bytes() == authority.ca
    key = folder / "tls" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # the key is the node's: the certificate holds its public half
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert private.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    (joined,) = registrar.joined("run-1")
    assert (joined.node, joined.hostname, joined.peer) == ("ring-0", "host-a", "127.0.0.1")
    assert joined.address == "127.0.0.1"  # where this machine's route to the service leaves


def test_a_name_taken_with_another_key_and_a_third_node_are_refused(service) -> None:
    registrar, _, folder = service
    assert join(request(registrar, folder), folder / "a", deadline_s=10) == "ring-0"
    assert join(request(registrar, folder, hostname="host-b"), folder / "b", 10) == "ring-1"
    # host-a's name again, with a new key (join makes one): not the node that joined
    with pytest.raises(JoinError, match="with another key"):
        join(request(registrar, folder), folder / "a2", deadline_s=10)
    with pytest.raises(JoinError, match="all 2 nodes of group ring have joined"):
        join(request(registrar, folder, hostname="host-c"), folder / "c", deadline_s=10)
    assert [j.node for j in registrar.wait("run-1", 1)] == ["ring-0", "ring-1"]


def test_the_place_kept_for_the_node_that_keeps_the_volumes_goes_to_that_node_only(service):
    registrar, authority, folder = service
    registrar.open("run-1", TOKEN, authority, {"ring": 2}, kept={"ring": frozenset({0})})
    # a pooled node that boots first takes the next free place, not the kept one
    assert join(request(registrar, folder, hostname="pooled"), folder / "p", 10) == "ring-1"
    with pytest.raises(JoinError, match="places left in group ring are kept for named nodes"):
        join(request(registrar, folder, hostname="another"), folder / "x", deadline_s=10)
    with pytest.raises(JoinError, match="place 1 of group ring is not kept"):
        join(request(registrar, folder, hostname="claims-1", index=1), folder / "y", 10)
    assert join(request(registrar, folder, hostname="keeper", index=0), folder / "k", 10) == (
        "ring-0"
    )
    with pytest.raises(JoinError, match="ring-0 has joined already"):
        join(request(registrar, folder, hostname="second-keeper", index=0), folder / "z", 10)
    assert [(j.node, j.hostname) for j in registrar.wait("run-1", 1)] == [
        ("ring-0", "keeper"),
        ("ring-1", "pooled"),
    ]


def test_a_node_asking_again_keeps_its_address_and_another_key_gets_nothing(service):
    """A node asks again with the key it made once (its reply was lost): it gets its name
    back, and the address and port it joined with stay. The same name with another key is
    someone else."""
    import grpc

    from api.squall.v1 import join_pb2, join_pb2_grpc
    from substrate.tls import JOIN_NAME

    registrar, _, folder = service
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def csr() -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)])
        request = x509.CertificateSigningRequestBuilder().subject_name(name)
        return request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    credentials = grpc.ssl_channel_credentials((folder / "join" / "join-ca.pem").read_bytes())
    options = (("grpc.ssl_target_name_override", JOIN_NAME),)
    mine = csr()
    with grpc.secure_channel(f"127.0.0.1:{registrar.port}", credentials, options) as channel:
        stub = join_pb2_grpc.NodeJoinStub(channel)

        def ask(request_csr: bytes, address: str, port: int) -> str:
            reply = stub.Join(
                join_pb2.JoinRequest(
                    run_id="run-1", token=TOKEN, group="ring", hostname="host-a",
                    address=address, agent_port=port, csr=request_csr,
                ),
                timeout=10,
            )  # fmt: skip
            return reply.node

        assert ask(mine, "127.0.0.1", 7431) == "ring-0"
        assert ask(mine, "203.0.113.66", 22) == "ring-0"  # the same node asking again
        with pytest.raises(grpc.RpcError, match="with another key"):
            ask(csr(), "127.0.0.1", 7431)
    (joined,) = registrar.joined("run-1")
    assert (joined.address, joined.agent_port) == ("127.0.0.1", 7431)


def test_a_reported_address_outside_the_runs_network_is_refused_unless_it_is_the_callers(
    service,
) -> None:
    registrar, authority, folder = service
    registrar.open("run-1", TOKEN, authority, {"ring": 2}, reported_in=("10.42.0.0/16",))
    with pytest.raises(JoinError, match="not in the run's network"):
        join(request(registrar, folder, address="198.51.100.7"), folder / "a", deadline_s=10)
    # where it calls from (no NAT between): that is where it is
    assert join(request(registrar, folder), folder / "b", deadline_s=10) == "ring-0"


def test_a_second_join_service_cannot_share_the_port(service) -> None:
    registrar, _, folder = service
    with pytest.raises(ProvisionError, match="cannot listen"):
        Registrar(join_identity(folder / "join"), f"127.0.0.1:{registrar.port}")


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"token": "guessed"}, "not that of a run taking nodes"),
        ({"run_id": "run-2"}, "not that of a run taking nodes"),
        ({"group": "other"}, "has no node group 'other'"),
        ({"address": "not-an-address"}, "is not an address"),
    ],
)
def test_a_wrong_token_run_or_group_gets_nothing(service, change, refusal) -> None:
    registrar, _, folder = service
    with pytest.raises(JoinError, match=refusal):
        join(request(registrar, folder, **change), folder / "tls", deadline_s=10)
    assert not (folder / "tls").exists()
    assert registrar.joined("run-1") == []


def test_a_node_sends_its_token_only_to_the_join_service_it_trusts(service, tmp_path) -> None:
    registrar, _, folder = service
    stranger = join_identity(tmp_path / "other")  # another orchestrator's join CA
    with pytest.raises(JoinError, match="could not join run run-1"):
        join(request(registrar, folder, join_ca=stranger.ca), folder / "tls", deadline_s=2)
    assert registrar.joined("run-1") == []


def test_the_wait_names_the_missing_nodes_what_they_said_and_their_consoles(service) -> None:
    registrar, _, folder = service
    join(request(registrar, folder), folder / "tls", deadline_s=10)
    say(request(registrar, folder, hostname="host-b"), "cannot mount the volumes")
    say(request(registrar, folder, hostname="host-x", token="guessed"), "not kept")
    with pytest.raises(ProvisionError) as caught:
        registrar.wait(
            "run-1",
            0.5,
            consoles=lambda: {"vm-1": "Booting\nKernel panic - not syncing\n"},
        )
    text = str(caught.value)
    assert "ring: 1 of 2" in text
    assert "ring-0 (host-a, 127.0.0.1)" in text
    assert "host-b said: cannot mount the volumes" in text
    assert "not kept" not in text
    assert "vm-1 console" in text
    assert "Kernel panic" in text


def test_a_window_of_nodes_without_nat_takes_each_from_its_own_address(service) -> None:
    registrar, authority, folder = service
    registrar.open("run-1", TOKEN, authority, {"ring": 2}, from_itself=True)
    with pytest.raises(JoinError, match=r"joins from its own address \(10.9.9.9\)"):
        join(request(registrar, folder, address="10.9.9.9"), folder / "tls", deadline_s=10)
    assert join(request(registrar, folder), folder / "tls", deadline_s=10) == "ring-0"


def test_a_closed_window_takes_no_node(service) -> None:
    registrar, _, folder = service
    registrar.close("run-1")
    with pytest.raises(JoinError, match="not that of a run taking nodes"):
        join(request(registrar, folder), folder / "tls", deadline_s=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_agent_started_with_join_serves_mutual_tls_with_its_certificate(service) -> None:
    registrar, authority, folder = service
    (folder / "token").write_text(TOKEN)
    tls = folder / "agent-tls"
    port = _free_port()
    with subprocess.Popen(
        [
            sys.executable, "-m", "substrate", "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(folder / "agent"), "--token-file", str(folder / "token"),
            "--weak-runtimes", "--no-pod-network",
            "--join", f"127.0.0.1:{registrar.port}",
            "--join-ca", str(folder / "join" / "join-ca.pem"),
            "--join-run", "run-1", "--join-group", "ring",
            "--tls-cert", str(tls / "node.pem"), "--tls-key", str(tls / "node.key"),
            "--tls-ca", str(tls / "ca.pem"),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    ) as proc:  # fmt: skip
        try:
            _check_agent(proc, registrar, authority, port)
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def _check_agent(proc, registrar: Registrar, authority: RunAuthority, port: int) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on"), proc.stderr.read() if proc.stderr else ""
    (joined,) = registrar.joined("run-1")
    channel, stub = connect(f"127.0.0.1:{port}", TOKEN, authority.orchestrator)
    try:
        assert stub.Health(pb.HealthRequest(), timeout=10) is not None
    finally:
        channel.close()
    # another run's orchestrator certificate opens nothing
    other = RunAuthority("run-2").orchestrator
    channel, stub = connect(f"127.0.0.1:{port}", TOKEN, other)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Health(pb.HealthRequest(), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    assert joined.agent_port == port


def test_an_agent_whose_join_is_refused_exits_and_says_why(service) -> None:
    registrar, _, folder = service
    (folder / "token").write_text("guessed")
    tls = folder / "agent-tls"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, "-m", "substrate", "--listen", "127.0.0.1:7999",
            "--data-dir", str(folder / "agent"), "--token-file", str(folder / "token"),
            "--join", f"127.0.0.1:{registrar.port}",
            "--join-ca", str(folder / "join" / "join-ca.pem"),
            "--join-run", "run-1", "--join-group", "ring",
            "--tls-cert", str(tls / "node.pem"), "--tls-key", str(tls / "node.key"),
            "--tls-ca", str(tls / "ca.pem"),
        ],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert done.returncode == 3
    assert "refused to join this node" in done.stderr
    assert time.monotonic() - started < 30  # a refusal is final: no retrying until the deadline
    assert not tls.exists()
