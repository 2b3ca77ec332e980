"""A local certificate authority for the mesh's mTLS, made with ``cryptography``.

One CA, and one certificate per identity: each service in each region
(``spiffe://meshbank/region/us-east/service/transfer``) and each region's edge. The
SPIFFE id is the certificate's only URI SAN, which is what the sidecars match on. Keys
are ECDSA P-256; files are written mode 0600. Existing, still-valid files are kept, so
a second ``meshbank up`` does not re-issue everything.

The same CA also signs the *public* server certificates of the edges' and the global
entry's partner-facing listeners (:meth:`LocalCA.issue_server`): plain TLS server
certificates named by the DNS names and addresses clients dial, with no SPIFFE id, so
a public certificate can never pass for a mesh identity at a sidecar.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


def file_stem(identity: str) -> str:
    """A file name for a SPIFFE id: spiffe://meshbank/region/us-east/edge -> us-east-edge."""
    tail = identity.removeprefix("spiffe://meshbank/")
    return re.sub(r"[^a-z0-9-]+", "-", tail.replace("region/", "").replace("service/", ""))


def dns_name(identity: str) -> str:
    return f"{file_stem(identity)}.mesh.meshbank.internal"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _leaf(
    stem: str, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> x509.CertificateBuilder:
    """What every certificate the CA issues has: its name, issuer, key, lifetime, not a CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )


def _still_valid(path: Path, now: dt.datetime) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - now > RENEW_BEFORE


@dataclass(frozen=True)
class ServerNames:
    """What a public server certificate must name: the DNS names and IP addresses
    clients use to reach the listener (checked by every TLS client, gRPC included)."""

    dns: tuple[str, ...]
    ips: tuple[str, ...]

    def general_names(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(self.dns)]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(self.ips)]
        return names


def subject_alt_names(cert: x509.Certificate) -> ServerNames:
    """The DNS and IP SANs of ``cert`` (empty when it has no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ServerNames((), ())
    return ServerNames(
        tuple(ext.get_values_for_type(x509.DNSName)),
        tuple(str(i) for i in ext.get_values_for_type(x509.IPAddress)),
    )


def _names_match(path: Path, names: ServerNames) -> bool:
    """Whether the certificate at ``path`` names exactly ``names`` (a changed address,
    netns mode or an extra name from the topology means issuing it again)."""
    have = subject_alt_names(x509.load_pem_x509_certificate(path.read_bytes()))
    want_ips = {str(ipaddress.ip_address(i)) for i in names.ips}
    return set(have.dns) == set(names.dns) and set(have.ips) == want_ips


class LocalCA:
    """Issues the mesh's certificates into one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_cert_path = directory / "ca.crt"
        self._ca_key_path = directory / "ca.key"

    def ensure_ca(self) -> None:
        now = dt.datetime.now(dt.UTC)
        if _still_valid(self.ca_cert_path, now) and self._ca_key_path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        # A name of its own per CA (its key id in it): a client that trusts several
        # deployments' CAs (the e2e tests) finds the issuer by name, and OpenSSL stops at
        # the first CA of a matching name even when its key does not match.
        name = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"meshbank local mesh CA {key_id.digest.hex()[:12]}"
                )
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_id, critical=False)
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
        _write(self._ca_key_path, _key_pem(key))
        _write(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        # A new CA invalidates every leaf it did not sign.
        for leaf in self.directory.glob("*.crt"):
            if leaf != self.ca_cert_path:
                leaf.unlink()

    def _load_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        ca_key = serialization.load_pem_private_key(self._ca_key_path.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        return ca_key, x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    def issue(self, identity: str) -> Credential:
        """Return the certificate and key for ``identity``, issuing them if needed.

        Besides the SPIFFE URI (what sidecars match on), the certificate names
        ``<stem>.mesh.meshbank.internal`` so that ordinary TLS clients (grpc-python
        always checks a host name) can verify it with ``grpc.ssl_target_name_override``.
        """
        self.ensure_ca()
        stem = file_stem(identity)
        dns_names = (dns_name(identity),)
        cred = Credential(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        now = dt.datetime.now(dt.UTC)
        if _still_valid(cred.cert, now) and cred.key.exists():
            return cred
        ca_key, ca_cert = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
        sans += [x509.DNSName(d) for d in dns_names]
        cert = (
            _leaf(stem, ca_cert, key, now)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(cred.key, _key_pem(key))
        _write(cred.cert, cert.public_bytes(serialization.Encoding.PEM))
        return cred

    def issue_server(self, stem: str, names: ServerNames) -> Credential:
        """A TLS server certificate for a public listener, kept while valid and still
        naming exactly ``names``; otherwise issued again (key included)."""
        if not names.dns and not names.ips:
            raise ValueError(f"a server certificate for {stem} needs at least one name")
        self.ensure_ca()
        cred = Credential(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        now = dt.datetime.now(dt.UTC)
        if _still_valid(cred.cert, now) and cred.key.exists() and _names_match(cred.cert, names):
            return cred
        ca_key, ca_cert = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _leaf(stem, ca_cert, key, now)
            .add_extension(x509.SubjectAlternativeName(names.general_names()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            # Strict (RFC 5280 / CA/B Forum) verifiers require the key identifiers.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(cred.key, _key_pem(key))
        _write(cred.cert, cert.public_bytes(serialization.Encoding.PEM))
        return cred
