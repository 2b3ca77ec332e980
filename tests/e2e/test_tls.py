"""TLS on the public listeners, against the real edges and global entry.

gRPC and REST/JSON share each TLS port (ALPN h2 / http/1.1) and verify against the
deployment's CA; plaintext gets no API answer; a client trusting another CA refuses the
server; the certificates name what clients dial.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from mesh import pki, public_tls
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from regions import local, public_client
from regions.topology import Topology
from tests.e2e.conftest import Deployment


@pytest.fixture(scope="module")
def topo(deployment: Deployment) -> Topology:
    return local.load_topology(deployment.env)


def public_targets(deployment: Deployment, topo: Topology) -> dict[str, str]:
    """Every public listener: each region's edge and the global entry's listeners."""
    endpoints = deployment.status()["endpoints"]
    targets = {f"edge {r}": f"{topo.host_of(r)}:{topo.edge_port(r)}" for r in topo.region_names}
    targets.update({f"global {r}": a for r, a in endpoints["global"].items()})
    return targets


def served_by(channel: grpc.Channel) -> str:
    _, call = auth_pb2_grpc.AuthServiceStub(channel).GetJwks.with_call(
        auth_pb2.GetJwksRequest(), timeout=10
    )
    return str(dict(call.initial_metadata())["x-meshbank-served-by"])


def test_status_names_the_ca_and_https_urls(deployment: Deployment) -> None:
    endpoints = deployment.status()["endpoints"]
    assert endpoints["global_url"] == f"https://{endpoints['global_rest']}"
    ca = x509.load_pem_x509_certificate(Path(endpoints["ca_cert"]).read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert endpoints["global_url"] in deployment.up_output  # the quick start shows it
    assert "--cacert" in deployment.up_output


def test_grpc_and_rest_work_over_tls_on_every_public_listener(
    deployment: Deployment, topo: Topology
) -> None:
    ca = deployment.ca_file
    context = public_client.ssl_context(ca)
    for what, target in public_targets(deployment, topo).items():
        with public_client.grpc_channel(target, ca) as channel:
            assert served_by(channel), what
        with public_client.urlopen(f"https://{target}/v1/auth/jwks", ca, timeout=20) as reply:
            assert reply.status == 200, what
            assert json.loads(reply.read())["keys"], what
        # The same port negotiates HTTP/2 (gRPC) and HTTP/1.1 (REST), TLS 1.2 or newer.
        for alpn in ("h2", "http/1.1"):
            context.set_alpn_protocols([alpn])
            with tls_socket(target, context) as s:
                assert s.selected_alpn_protocol() == alpn, what
                assert s.version() in ("TLSv1.2", "TLSv1.3"), what


@contextlib.contextmanager
def tls_socket(target: str, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    host, port = target.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as s,
    ):
        yield s


def test_plaintext_gets_no_api_answer(deployment: Deployment, topo: Topology) -> None:
    for what, target in public_targets(deployment, topo).items():
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /v1/auth/jwks HTTP/1.1\r\nhost: meshbank\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while chunk := s.recv(4096):
                    answer += chunk
        assert not answer.startswith(b"HTTP/"), (what, answer[:200])
        assert b"keys" not in answer, what
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
            served_by(channel)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, what


def test_a_client_trusting_another_ca_refuses_the_server(
    deployment: Deployment, topo: Topology, tmp_path: Path
) -> None:
    other = pki.LocalCA(tmp_path / "other")
    other.ensure_ca()
    for what, target in public_targets(deployment, topo).items():
        with pytest.raises(urllib.error.URLError) as refused:
            public_client.urlopen(f"https://{target}/v1/auth/jwks", other.ca_cert_path, 10)
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), what
        with (
            public_client.grpc_channel(target, other.ca_cert_path) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            served_by(channel)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, what


def test_certificates_name_what_clients_dial(deployment: Deployment, topo: Topology) -> None:
    context = public_client.ssl_context(deployment.ca_file)
    for region in topo.region_names:
        target = f"{topo.host_of(region)}:{topo.edge_port(region)}"
        with tls_socket(target, context) as s:
            der = s.getpeercert(binary_form=True)
        assert der is not None
        names = pki.subject_alt_names(x509.load_der_x509_certificate(der))
        assert {"localhost", public_tls.server_name(topo, region)} <= set(names.dns)
        assert {"127.0.0.1", "::1", topo.host_of(region)} <= set(names.ips)
    # The name a client dials must match: the right CA is not enough.
    wrong_name = public_client.ssl_context(deployment.ca_file)
    target = f"{topo.host}:{topo.edge_port(topo.region_names[0])}"
    host, port = target.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        wrong_name.wrap_socket(raw, server_hostname="api.bank.example")
