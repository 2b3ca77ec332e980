"""The certificates of the public listeners: each region's edge and the global entry.

Partners reach meshbank only over TLS (TLS 1.2 or newer; ALPN ``h2`` for gRPC and
``http/1.1`` for REST/JSON on the same port). Two sources, chosen by the topology's
``edge.tls`` section (:class:`regions.topology.EdgeTls`):

* **the local CA** (default): :func:`ensure` issues one server certificate per public
  listener from the mesh's CA (``mesh/pki.py``), naming what clients dial: ``localhost``,
  ``127.0.0.1``, ``::1``, the listener's own address (a region's address in netns
  mode), ``<region>.edge.meshbank.internal`` for an edge (the name the global entry
  and the edge's own JWKS fetch verify) and any ``extra_names``. Clients trust
  ``state/pki/ca.crt`` (``meshbank status --json``: ``endpoints.ca_cert``).
* **one's own certificate** (``cert_file``, ``key_file``, ``ca_file``, ``server_name``):
  every public listener serves it; it is checked at start by :func:`check_own` (files
  readable, key matches, still valid, names ``server_name``, issued by ``ca_file``).

Where a listener finds its files is :func:`files`; Kubernetes overrides it with a
Secret volume (``regions/k8s.py``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from mesh import pki
from regions.topology import Topology

GLOBAL = "global"  # the global entry's listener name among the regions' edges
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
INTERNAL_DOMAIN = "edge.meshbank.internal"


class PublicTlsError(ValueError):
    """The configured public certificate cannot be used (the message says why)."""


@dataclass(frozen=True)
class PublicCert:
    """A public listener's certificate and key, and the CA that verifies it."""

    cert: Path
    key: Path
    ca: Path


def server_name(topology: Topology, region: str) -> str:
    """The name the global entry (and the edge's JWKS fetch) sends as SNI to ``region``'s
    edge and requires in its certificate."""
    return topology.edge.tls.server_name or f"{region}.{INTERNAL_DOMAIN}"


def _stem(listener: str) -> str:
    return f"{listener}-public" if listener == GLOBAL else f"{listener}-edge-public"


def names(topology: Topology, listener: str) -> pki.ServerNames:
    """What the local CA's certificate for ``listener`` (a region or ``global``) names."""
    host = topology.host if listener == GLOBAL else topology.host_of(listener)
    dns = list(LOOPBACK_NAMES)
    if listener != GLOBAL:
        dns.append(server_name(topology, listener))
    ips = [*LOOPBACK_IPS, host]
    for extra in topology.edge.tls.extra_names:
        (ips if _is_ip(extra) else dns).append(extra)
    return pki.ServerNames(tuple(dns), tuple(ips))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def listeners(topology: Topology) -> list[str]:
    return [*topology.region_names, GLOBAL]


def files(topology: Topology, pki_dir: Path, listener: str) -> PublicCert:
    """Where ``listener``'s certificate, key and verifying CA are."""
    tls = topology.edge.tls
    if tls.cert_file and tls.key_file and tls.ca_file:
        return PublicCert(Path(tls.cert_file), Path(tls.key_file), Path(tls.ca_file))
    stem = _stem(listener)
    return PublicCert(pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key", pki_dir / "ca.crt")


def ensure(topology: Topology, ca: pki.LocalCA) -> Path:
    """Issue (or keep) every public listener's certificate, or check one's own; return
    the CA file clients verify the public listeners with."""
    tls = topology.edge.tls
    if tls.own_certificate:
        check_own(topology)
        return files(topology, ca.directory, GLOBAL).ca
    for listener in listeners(topology):
        ca.issue_server(_stem(listener), names(topology, listener))
    return ca.ca_cert_path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PublicTlsError(f"edge.tls.{what}: cannot read {path}: {exc.strerror}") from None


def check_own(topology: Topology, now: dt.datetime | None = None) -> None:
    """Refuse an own certificate that Envoy or the clients would reject later, and say why."""
    tls = topology.edge.tls
    if not (tls.cert_file and tls.key_file and tls.ca_file and tls.server_name):
        raise PublicTlsError("edge.tls: no own certificate is configured")
    now = now or dt.datetime.now(dt.UTC)
    try:
        chain = x509.load_pem_x509_certificates(_read(Path(tls.cert_file), "cert_file"))
    except ValueError as exc:
        raise PublicTlsError(f"edge.tls.cert_file: {tls.cert_file} is not PEM: {exc}") from None
    try:
        key = serialization.load_pem_private_key(_read(Path(tls.key_file), "key_file"), None)
    except (ValueError, TypeError) as exc:
        raise PublicTlsError(
            f"edge.tls.key_file: {tls.key_file} is not an unencrypted PEM key: {exc}"
        ) from None
    try:
        roots = x509.load_pem_x509_certificates(_read(Path(tls.ca_file), "ca_file"))
    except ValueError as exc:
        raise PublicTlsError(f"edge.tls.ca_file: {tls.ca_file} is not PEM: {exc}") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise PublicTlsError(
            f"edge.tls.key_file: {tls.key_file} is not the key of the certificate {tls.cert_file}"
        )
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise PublicTlsError(
            f"edge.tls.cert_file: {tls.cert_file} is valid from {leaf.not_valid_before_utc} "
            f"to {leaf.not_valid_after_utc}, not now"
        )
    # The same checks a client does: chain to ca_file, server auth, and the name.
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(now)
        .build_server_verifier(x509.DNSName(tls.server_name))
    )
    try:
        verifier.verify(leaf, chain[1:])
    except verification.VerificationError as exc:
        raise PublicTlsError(
            f"edge.tls: {tls.cert_file} does not verify against {tls.ca_file} "
            f"for the name {tls.server_name!r}: {exc}"
        ) from None
