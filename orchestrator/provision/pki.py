"""A run's certificate authority: made when its cluster is, it signs the client certificate
this orchestrator calls the agents with and the node certificates they serve with. Its key
is never written anywhere, so no one can mint another certificate the run's agents would
accept:
- a cluster whose nodes are handed their certificate (the local site) gets one node
  certificate, and the key is forgotten at once (`make_run_pki`);
- a cluster whose nodes join (they boot, make their own key and trade their join token and a
  certificate request for a certificate, see join.proto) keeps the authority in memory for
  as long as its nodes may join (`RunAuthority.sign_node`), then drops it.

The orchestrator's join service shows its own certificate (`join_identity`), from a long-lived
authority of this orchestrator's kept in its data folder: a node checks it before it sends
its token.

Elliptic-curve keys (P-256): quick to make for every run, and accepted by gRPC's TLS.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from substrate.tls import JOIN_NAME, NODE_NAME, ORCHESTRATOR_NAME, ClientTLS

__all__ = ["JoinIdentity", "RunAuthority", "RunPKI", "join_identity", "make_run_pki"]

# long enough for any run: no key is kept that could renew a certificate mid-run
VALID_FOR = dt.timedelta(days=366)
_CLOCK_SKEW = dt.timedelta(minutes=10)
_NODE_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@dataclass(frozen=True, slots=True, repr=False)
class RunPKI:
    """PEM material of one run: what every node gets, and what this orchestrator keeps."""

    ca: bytes  # the run CA's certificate
    node_certificate: bytes
    node_key: bytes
    orchestrator: ClientTLS

    def __repr__(self) -> str:  # never a key
        return "RunPKI(...)"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "squall"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _authority(
    name: x509.Name, now: dt.datetime, valid_for: dt.timedelta
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usages: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName],
    valid_for: dt.timedelta = VALID_FOR,
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class RunAuthority:
    """One run's CA, with its key in memory only: this orchestrator's client certificate for
    the run's agents, and the node certificates it signs as the run's nodes join."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._cert, self._key_of_ca = _authority(
            _name(f"squall run CA {run_id}", f"run {run_id}"), dt.datetime.now(dt.UTC), VALID_FOR
        )
        self.ca = self._cert.public_bytes(serialization.Encoding.PEM)
        key = _key()
        self.orchestrator = ClientTLS(
            ca=self.ca,
            certificate=_leaf(
                self._cert,
                self._key_of_ca,
                _name(ORCHESTRATOR_NAME, f"run {run_id}"),
                key.public_key(),
                [ExtendedKeyUsageOID.CLIENT_AUTH],
                [],
            ),
            key=_pem_key(key),
        )

    def __repr__(self) -> str:  # never the key
        return f"RunAuthority({self.run_id})"

    def node_pair(self) -> tuple[bytes, bytes]:
        """A node certificate and its key (PEM), made here: for nodes that are handed theirs."""
        key = _key()
        return self._node_certificate(key.public_key(), NODE_NAME), _pem_key(key)

    def sign_node(self, csr_pem: bytes, node: str) -> bytes:
        """The certificate (PEM) of a joining node for the key in its request. Whatever the
        request asks, the certificate says what every node's does (NODE_NAME, server and
        client use) and names the node; ValueError when the request is not a valid one."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise ValueError("the certificate request is not a PEM PKCS#10 request") from None
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature does not match its key")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ValueError("a node's key is a P-256 elliptic-curve key")
        return self._node_certificate(public_key, node)

    def _node_certificate(self, public_key: ec.EllipticCurvePublicKey, node: str) -> bytes:
        names: list[x509.GeneralName] = [x509.DNSName(NODE_NAME)]
        if node != NODE_NAME:
            names.append(x509.DNSName(node))
        return _leaf(
            self._cert,
            self._key_of_ca,
            _name(NODE_NAME, f"run {self.run_id}"),
            public_key,
            _NODE_USAGES,
            names,
        )


def make_run_pki(run_id: str) -> RunPKI:
    """A fresh CA for `run_id`, one node certificate for all its nodes (server and client
    use, named NODE_NAME) and the orchestrator's client certificate (named
    ORCHESTRATOR_NAME); the CA's key goes with the authority when this returns."""
    authority = RunAuthority(run_id)
    node_certificate, node_key = authority.node_pair()
    return RunPKI(
        ca=authority.ca,
        node_certificate=node_certificate,
        node_key=node_key,
        orchestrator=authority.orchestrator,
    )


@dataclass(frozen=True, slots=True, repr=False)
class JoinIdentity:
    """What the join service serves with (its certificate and key) and what nodes check it
    against (the CA), PEM."""

    ca: bytes
    certificate: bytes
    key: bytes

    def __repr__(self) -> str:
        return "JoinIdentity(...)"


JOIN_VALID_FOR = dt.timedelta(days=3650)


def join_identity(folder: Path) -> JoinIdentity:
    """This orchestrator's join certificate, from `folder` (made there, mode 0600, the
    first time): one authority per orchestrator, whose certificate every node's boot data
    carries so that a node sends its token to this orchestrator only."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / ".lock", "a") as lock:  # one orchestrator process makes it
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _join_identity(folder)


def _join_identity(folder: Path) -> JoinIdentity:
    files = {name: folder / name for name in ("join-ca.pem", "join.pem", "join.key")}
    if all(path.exists() for path in files.values()):
        ca, certificate, key = (path.read_bytes() for path in files.values())
        try:
            x509.load_pem_x509_certificate(certificate).verify_directly_issued_by(
                x509.load_pem_x509_certificate(ca)
            )
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ValueError(f"the join certificate in {folder} is damaged: {exc}") from None
        return JoinIdentity(ca, certificate, key)
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _authority(_name("squall join CA", "join"), now, JOIN_VALID_FOR)
    server_key = _key()
    certificate = _leaf(
        ca_cert,
        ca_key,
        _name(JOIN_NAME, "join"),
        server_key.public_key(),
        [ExtendedKeyUsageOID.SERVER_AUTH],
        [x509.DNSName(JOIN_NAME)],
        JOIN_VALID_FOR,
    )
    identity = JoinIdentity(
        ca_cert.public_bytes(serialization.Encoding.PEM), certificate, _pem_key(server_key)
    )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, data in zip(
        files.values(), (identity.ca, identity.certificate, identity.key), strict=True
    ):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.rename(path)
    return identity
