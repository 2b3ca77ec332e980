"""Every generated config passes `envoy --mode validate` with real certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from mesh import envoy, pki, public_tls
from regions import local, topology


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mesh")
    t = topology.load()
    ca = pki.LocalCA(base / "pki")
    for identity in envoy.identities(t):
        ca.issue(identity)
    public_tls.ensure(t, ca)
    return envoy.write(t, envoy.Paths(base / "pki", local.descriptor_path()), base / "configs")


def test_every_config_validates(rendered: dict[str, Path]) -> None:
    assert len(rendered) == 1 + 3 + 18
    failures = {}
    for name, path in rendered.items():
        out = subprocess.run(
            [local.envoy_binary(), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = out.stdout + out.stderr
        if out.returncode != 0:
            failures[name] = output[-2000:]
        elif "Deprecated field" in output:
            # It works today and breaks on a later Envoy: refuse it now.
            failures[name] = "uses a deprecated field:\n" + output[-2000:]
    assert failures == {}


def test_certificates_carry_exactly_their_spiffe_identity(tmp_path: Path) -> None:
    ca = pki.LocalCA(tmp_path)
    identity = "spiffe://meshbank/region/us-east/service/transfer"
    cred = ca.issue(identity)
    cert = x509.load_pem_x509_certificate(cred.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
    assert sans.get_values_for_type(x509.DNSName) == ["us-east-transfer.mesh.meshbank.internal"]
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert oct(cred.key.stat().st_mode & 0o777) == "0o600"
    # Issuing again keeps the still-valid certificate.
    assert ca.issue(identity).cert.read_bytes() == cred.cert.read_bytes()
