"""The public listeners' certificates: what they name, when they are re-issued, how an
own certificate is checked, and the TLS contexts the Envoy configs get."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from mesh import envoy, k8s_envoy, pki, public_tls
from regions import k8s, local, topology
from services import cli

EDGE_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def netns_topology() -> topology.Topology:
    t = topology.load()
    hosts = {r: f"10.213.35.{i + 2}" for i, r in enumerate(t.region_names)}
    return topology.with_region_hosts(t, hosts, "10.213.35.0/24")


def with_tls(t: topology.Topology, **tls: Any) -> topology.Topology:
    return dataclasses.replace(t, edge=dataclasses.replace(t.edge, tls=topology.EdgeTls(**tls)))


def sans(path: Path) -> pki.ServerNames:
    return pki.subject_alt_names(x509.load_pem_x509_certificate(path.read_bytes()))


def test_local_ca_certificates_name_what_clients_dial(tmp_path: Path) -> None:
    t = with_tls(netns_topology(), extra_names=("api.bank.test", "192.0.2.10"))
    ca = pki.LocalCA(tmp_path)
    assert public_tls.ensure(t, ca) == ca.ca_cert_path
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes())
    for region in t.region_names:
        files = public_tls.files(t, tmp_path, region)
        names = sans(files.cert)
        assert set(names.dns) == {"localhost", f"{region}.edge.meshbank.internal", "api.bank.test"}
        assert set(names.ips) == {"127.0.0.1", "::1", t.host_of(region), t.host, "192.0.2.10"}
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        # A server certificate only: no SPIFFE id, so it is no mesh identity.
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
        assert oct(files.key.stat().st_mode & 0o777) == "0o600"
    glob = sans(public_tls.files(t, tmp_path, public_tls.GLOBAL).cert)
    assert set(glob.dns) == {"localhost", "api.bank.test"}
    assert set(glob.ips) == {"127.0.0.1", "::1", t.host, "192.0.2.10"}


def test_certificates_are_kept_while_valid_and_reissued_when_names_change(
    tmp_path: Path,
) -> None:
    t = topology.load()
    ca = pki.LocalCA(tmp_path)
    public_tls.ensure(t, ca)
    cert = public_tls.files(t, tmp_path, "us-east").cert
    first = cert.read_bytes()
    public_tls.ensure(t, ca)
    assert cert.read_bytes() == first  # kept: still valid, same names
    public_tls.ensure(netns_topology(), ca)
    assert cert.read_bytes() != first  # the region moved to its own address
    assert "10.213.35.2" in sans(cert).ips


def own_certificate(tmp_path: Path, name: str = "api.bank.example") -> dict[str, str]:
    """An 'own' certificate: issued by a CA that is not the deployment's."""
    issuer = pki.LocalCA(tmp_path / "issuer")
    cred = issuer.issue_server("api", pki.ServerNames((name,), ()))
    return {
        "cert_file": str(cred.cert),
        "key_file": str(cred.key),
        "ca_file": str(issuer.ca_cert_path),
        "server_name": name,
    }


def test_an_own_certificate_is_used_by_every_public_listener(tmp_path: Path) -> None:
    own = own_certificate(tmp_path)
    t = with_tls(topology.load(), **own)
    ca = pki.LocalCA(tmp_path / "mesh")
    assert public_tls.ensure(t, ca) == Path(own["ca_file"])
    assert local.public_ca_file(tmp_path, t) == Path(own["ca_file"])
    configs = envoy.render(t, envoy.Paths(tmp_path / "mesh", Path("/d.binpb")))
    for name in [*(f"{r}-edge.yaml" for r in t.region_names), "global.yaml"]:
        for listener in configs[name]["static_resources"]["listeners"]:
            chain = listener["filter_chains"][0]["transport_socket"]["typed_config"]
            certificate = chain["common_tls_context"]["tls_certificates"][0]
            assert certificate["certificate_chain"]["filename"] == own["cert_file"]
    for cluster in configs["global.yaml"]["static_resources"]["clusters"]:
        for match in cluster.get("transport_socket_matches", []):
            upstream = match["transport_socket"]["typed_config"]
            assert upstream["sni"] == "api.bank.example"
            validation = upstream["common_tls_context"]["validation_context"]
            assert validation["trusted_ca"]["filename"] == own["ca_file"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda o, d: {**o, "key_file": own_certificate(d / "b")["key_file"]}, "is not the key"),
        (lambda o, d: {**o, "ca_file": own_certificate(d / "c")["ca_file"]}, "does not verify"),
        (lambda o, _d: {**o, "server_name": "other.example"}, "for the name 'other.example'"),
        (lambda o, d: {**o, "cert_file": str(d / "missing.crt")}, "cannot read"),
        (lambda o, _d: {**o, "key_file": o["cert_file"]}, "not an unencrypted PEM key"),
    ],
)
def test_a_bad_own_certificate_is_refused_with_the_reason(
    tmp_path: Path, change: Any, problem: str
) -> None:
    t = with_tls(topology.load(), **change(own_certificate(tmp_path), tmp_path))
    with pytest.raises(public_tls.PublicTlsError, match=problem):
        public_tls.check_own(t)


def test_an_expired_own_certificate_is_refused(tmp_path: Path) -> None:
    t = with_tls(topology.load(), **own_certificate(tmp_path))
    public_tls.check_own(t)  # the control: valid now
    later = dt.datetime.now(dt.UTC) + pki.LEAF_LIFETIME + dt.timedelta(days=1)
    with pytest.raises(public_tls.PublicTlsError, match="not now"):
        public_tls.check_own(t, now=later)


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ({"cert_file": "/a.crt"}, "an own certificate needs all of"),
        (
            {"cert_file": "a.crt", "key_file": "/k", "ca_file": "/c", "server_name": "x.example"},
            "must be an absolute path",
        ),
        ({"extra_names": ["Not A Name!"]}, "a list of DNS names or IP addresses"),
        ({"colour": "blue"}, "edge.tls: unknown keys ['colour']"),
        (
            {"cert_file": "/a", "key_file": "/k", "ca_file": "/c", "server_name": "10.0.0.1x!"},
            "not a DNS name",
        ),
        ("yes", "edge.tls: must be a mapping"),
    ],
)
def test_a_bad_tls_section_is_refused_with_its_name(tls: Any, problem: str) -> None:
    data = yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())
    data["edge"]["tls"] = tls
    with pytest.raises(topology.TopologyError, match=re.escape(problem)):
        topology.parse(data)


def downstream(listener: dict[str, Any]) -> dict[str, Any]:
    socket = listener["filter_chains"][0]["transport_socket"]
    assert socket["typed_config"]["@type"].endswith(EDGE_TLS)
    context: dict[str, Any] = socket["typed_config"]["common_tls_context"]
    return context


def test_every_public_listener_serves_tls_only(tmp_path: Path) -> None:
    t = topology.load()
    configs = envoy.render(t, envoy.Paths(tmp_path, Path("/d.binpb")))
    for region in t.region_names:
        (listener,) = configs[f"{region}-edge.yaml"]["static_resources"]["listeners"]
        context = downstream(listener)
        assert context["alpn_protocols"] == ["h2", "http/1.1"]
        assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
        certificate = context["tls_certificates"][0]["certificate_chain"]["filename"]
        assert certificate == str(tmp_path / f"{region}-edge-public.crt")
        # One filter chain: there is no plaintext chain to fall into.
        assert len(listener["filter_chains"]) == 1
    listeners = configs["global.yaml"]["static_resources"]["listeners"]
    assert len(listeners) == len(t.region_names)
    for listener in listeners:
        assert downstream(listener)["tls_certificates"][0]["certificate_chain"]["filename"] == (
            str(tmp_path / "global-public.crt")
        )


def test_the_global_entry_verifies_each_edge_by_its_regions_name(tmp_path: Path) -> None:
    t = topology.load()
    config = envoy.global_entry(t, envoy.Paths(tmp_path, Path("/d.binpb")))
    for cluster in config["static_resources"]["clusters"]:
        if not cluster["name"].startswith("edges_from_"):
            continue
        matches = {
            m["match"]["edge"]: m["transport_socket"] for m in cluster["transport_socket_matches"]
        }
        assert set(matches) == set(t.region_names)
        for region, transport in matches.items():
            upstream = transport["typed_config"]
            name = f"{region}.edge.meshbank.internal"
            assert upstream["sni"] == name
            context = upstream["common_tls_context"]
            assert context["alpn_protocols"] == ["h2"]
            assert context["validation_context"]["trusted_ca"]["filename"] == str(
                tmp_path / "ca.crt"
            )
            assert context["validation_context"]["match_typed_subject_alt_names"] == [
                {"san_type": "DNS", "matcher": {"exact": name}}
            ]
        # Every endpoint picks its region's socket: none would fall back to plaintext.
        for locality in cluster["load_assignment"]["endpoints"]:
            for endpoint in locality["lb_endpoints"]:
                match = endpoint["metadata"]["filter_metadata"]["envoy.transport_socket_match"]
                assert match == {"edge": locality["locality"]["region"]}


def test_the_jwks_fetch_through_the_edge_is_verified_tls(tmp_path: Path) -> None:
    t = topology.load()
    for region in t.region_names:
        config = envoy.edge(t, region, envoy.Paths(tmp_path, Path("/d.binpb")))
        (jwks,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "jwks"]
        upstream = jwks["transport_socket"]["typed_config"]
        assert upstream["sni"] == f"{region}.edge.meshbank.internal"
        assert upstream["common_tls_context"]["alpn_protocols"] == ["http/1.1"]


def test_kubernetes_edges_read_their_certificate_from_a_secret() -> None:
    t = topology.load()
    text = topology.DEFAULT_TOPOLOGY.read_text()
    rendered = k8s.render(t, text, local.descriptor_path().read_bytes(), "openapi: 3.0.0\n")
    for region, files in rendered.files.items():
        (edge,) = [m for m in files["30-edge.yaml"] if m["kind"] == "Deployment"]
        pod = edge["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "public-tls"]
        assert volume["secret"]["secretName"] == k8s.PUBLIC_TLS_SECRET
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["public-tls"] == str(k8s.PUBLIC_TLS_DIR)
        assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        dumped = k8s.dump_all(m for f in files.values() for m in f)
        assert "BEGIN" not in dumped, region  # no certificate or key in any manifest
        config = k8s_envoy.edge(t, k8s._settings(t), region, k8s.envoy_paths())
        (listener,) = config["static_resources"]["listeners"]
        certificate = downstream(listener)["tls_certificates"][0]
        assert certificate["certificate_chain"]["filename"] == f"{k8s.PUBLIC_TLS_DIR}/tls.crt"
    assert all(k8s.PUBLIC_TLS_SECRET in names for names in k8s.required_secrets(t).values())


def test_meshbank_up_refuses_a_bad_own_certificate_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = own_certificate(tmp_path)
    data = yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())
    data["edge"]["tls"] = {**own, "key_file": own_certificate(tmp_path / "b")["key_file"]}
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MESHBANK_TOPOLOGY", str(tmp_path / "topology.yaml"))
    monkeypatch.setenv("MESHBANK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MESHBANK_BASE_PORT", raising=False)
    assert cli.main(["up", "--detach"]) == 2
    assert "is not the key of the certificate" in capsys.readouterr().err
    assert not (tmp_path / "state" / "supervisor.log").exists()  # nothing was started


def test_a_client_trusting_several_local_cas_verifies_each_ones_servers(tmp_path: Path) -> None:
    """Two deployments' CAs in one client (as in the e2e session): OpenSSL finds the
    issuer by name, so each CA needs a name of its own (and a key id)."""
    cas = [pki.LocalCA(tmp_path / name) for name in ("first", "second")]
    for ca in cas:
        ca.ensure_ca()
    names = pki.ServerNames(dns=("localhost",), ips=("127.0.0.1",))
    server = cas[1].issue_server("edge", names)
    subjects = {x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes()).subject for ca in cas}
    assert len(subjects) == 2
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(server.cert, server.key)
    client = ssl.create_default_context()
    for ca in cas:  # the other deployment's CA first
        client.load_verify_locations(cafile=str(ca.ca_cert_path))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with (
                contextlib.suppress(ssl.SSLError, OSError),
                served.wrap_socket(conn, server_side=True) as tls,
            ):
                tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        thread.join(10)
