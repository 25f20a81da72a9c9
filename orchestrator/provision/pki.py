"""A run's certificate authority: made when its cluster is, signs the node certificate its
agents serve with and the client certificate this orchestrator calls them with, and is then
forgotten (its key is never written anywhere), so no one can mint another certificate the
run's agents would accept.

Elliptic-curve keys (P-256): quick to make for every run, and accepted by gRPC's TLS.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from substrate.tls import NODE_NAME, ORCHESTRATOR_NAME, ClientTLS

__all__ = ["RunPKI", "make_run_pki"]

# long enough for any run: no key is kept that could renew a certificate mid-run
VALID_FOR = dt.timedelta(days=366)
_CLOCK_SKEW = dt.timedelta(minutes=10)


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


def _name(common_name: str, run_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "squall"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"run {run_id}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_run_pki(run_id: str) -> RunPKI:
    """A fresh CA for `run_id`, a node certificate (server and client use, named NODE_NAME)
    and the orchestrator's client certificate (named ORCHESTRATOR_NAME)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = _name(f"squall run CA {run_id}", run_id)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + VALID_FOR)
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
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usages: list[x509.ObjectIdentifier], dns: bool
    ) -> tuple[bytes, bytes]:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, run_id))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    node_cert, node_key = leaf(
        NODE_NAME, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], dns=True
    )
    client_cert, client_key = leaf(ORCHESTRATOR_NAME, [ExtendedKeyUsageOID.CLIENT_AUTH], dns=False)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    return RunPKI(
        ca=ca_pem,
        node_certificate=node_cert,
        node_key=node_key,
        orchestrator=ClientTLS(ca=ca_pem, certificate=client_cert, key=client_key),
    )
