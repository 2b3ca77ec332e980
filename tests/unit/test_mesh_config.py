"""The Envoy configs generated from the topology: golden files, traps, routing, retries."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from mesh import api, envoy, lint
from mesh.api import Safety
from regions import topology

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "mesh"
PATHS = envoy.Paths(Path("/etc/meshbank/pki"), Path("/etc/meshbank/meshbank.binpb"))


@pytest.fixture(scope="module")
def configs() -> dict[str, dict[str, Any]]:
    return envoy.render(topology.load(), PATHS)


def test_generated_configs_match_the_golden_files(configs: dict[str, dict[str, Any]]) -> None:
    """Set MESHBANK_UPDATE_GOLDEN=1 to accept a deliberate change (then review the diff)."""
    if os.environ.get("MESHBANK_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for old in GOLDEN.glob("*.yaml"):
            old.unlink()
        for name, config in configs.items():
            (GOLDEN / name).write_text(envoy.dump(config))
    assert sorted(p.name for p in GOLDEN.glob("*.yaml")) == sorted(configs)
    for name, config in configs.items():
        assert (GOLDEN / name).read_text() == envoy.dump(config), name


def test_no_generated_config_has_a_known_trap(configs: dict[str, dict[str, Any]]) -> None:
    assert {name: lint.lint(c) for name, c in configs.items() if lint.lint(c)} == {}


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    clusters: list[dict[str, Any]] = config["static_resources"]["clusters"]
    return next(c for c in clusters if c["name"] == name)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["common_lb_config"].pop("healthy_panic_threshold"),
        lambda c: c["outlier_detection"].update(max_ejection_percent=50),
        lambda c: c["health_checks"][0].pop("no_traffic_interval"),
        lambda c: c.pop("typed_extension_protocol_options"),
        lambda c: c["circuit_breakers"]["thresholds"][0].pop("retry_budget"),
    ],
)
def test_lint_catches_each_trap(configs: dict[str, dict[str, Any]], mutate: Any) -> None:
    config = copy.deepcopy(configs["us-east-edge.yaml"])
    mutate(cluster(config, "transfer"))
    assert lint.lint(config)


def test_lint_catches_retrying_an_unsafe_method(configs: dict[str, dict[str, Any]]) -> None:
    config = copy.deepcopy(configs["us-east-edge.yaml"])
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    login = next(r for r in routes if r["name"] == "/meshbank.auth.v1.AuthService/Login")
    login["route"]["retry_policy"]["retry_on"] = "reset,unavailable"
    assert any("Login" in p for p in lint.lint(config))


def test_lint_catches_a_transcoder_that_passes_unknown_paths(
    configs: dict[str, dict[str, Any]],
) -> None:
    config = copy.deepcopy(configs["us-east-edge.yaml"])
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http_filters"]
    transcoder = next(f for f in filters if "transcoder" in f["name"])
    transcoder["typed_config"]["request_validation_options"] = {}
    assert lint.lint(config)


def test_retry_safety_comes_from_the_protos() -> None:
    safety = api.safety_by_path()
    assert safety["/meshbank.transfer.v1.TransferService/CreateTransfer"] is Safety.IDEMPOTENT
    assert safety["/meshbank.account.v1.AccountService/GetAccount"] is Safety.READ
    assert safety["/meshbank.auth.v1.AuthService/RefreshToken"] is Safety.UNSAFE


def routes_of(config: dict[str, Any], listener: int = 0) -> dict[str, dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]
    return {r["name"]: r for r in hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]}


def test_routes_retry_only_what_is_safe(configs: dict[str, dict[str, Any]]) -> None:
    routes = routes_of(configs["us-east-edge.yaml"])
    create = routes["/meshbank.transfer.v1.TransferService/CreateTransfer"]["route"]
    refresh = routes["/meshbank.auth.v1.AuthService/RefreshToken"]["route"]
    assert "reset" in create["retry_policy"]["retry_on"]
    assert refresh["retry_policy"]["retry_on"] == "connect-failure,refused-stream"
    # The global entry applies the same rule to REST paths, from the http annotations.
    rest = routes_of(configs["global.yaml"])
    assert "reset" in rest["POST /v1/transfers"]["route"]["retry_policy"]["retry_on"]
    assert "reset" not in rest["POST /v1/auth:refresh"]["route"]["retry_policy"]["retry_on"]


def test_endpoints_are_prioritised_by_failover_order(configs: dict[str, dict[str, Any]]) -> None:
    t = topology.load()
    for region in t.region_names:
        localities = cluster(configs[f"{region}-edge.yaml"], "account")["load_assignment"][
            "endpoints"
        ]
        order = {loc["locality"]["region"]: loc["priority"] for loc in localities}
        assert order == {r: i for i, r in enumerate(t.region(region).preference)}
    global_entry = configs["global.yaml"]
    for location in t.region_names:
        edges = cluster(global_entry, f"edges_from_{location}")["load_assignment"]["endpoints"]
        first = next(e for e in edges if e["priority"] == 0)
        assert first["locality"]["region"] == location


def test_sidecars_accept_only_the_edges(configs: dict[str, dict[str, Any]]) -> None:
    sidecar = configs["us-west-transfer-2-sidecar.yaml"]
    inbound = sidecar["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = inbound["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    allowed = {
        m["matcher"]["exact"]
        for m in tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    }
    assert allowed == {
        f"spiffe://meshbank/region/{r}/edge" for r in ("us-east", "us-west", "eu-west")
    }
    assert tls["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == (
        "/etc/meshbank/pki/us-west-transfer.crt"
    )


def test_database_clusters_follow_patroni_or_any_ready_cockroach_node() -> None:
    t = topology.load()
    instance = next(i for i in t.instances() if i.region == "us-west")
    pg = envoy.sidecar(t, instance, PATHS)
    primary = cluster(pg, "database_primary")
    replica = cluster(pg, "database_replica")
    assert primary["health_checks"][0]["http_health_check"]["path"] == "/primary"
    assert {e["priority"] for e in primary["load_assignment"]["endpoints"]} == {0}
    assert replica["health_checks"][0]["http_health_check"]["path"] == "/liveness"
    nearest = min(replica["load_assignment"]["endpoints"], key=lambda e: e["priority"])
    assert nearest["locality"]["region"] == "us-west"
    ports = {
        e["lb_endpoints"][0]["endpoint"]["health_check_config"]["port_value"]
        for e in primary["load_assignment"]["endpoints"]
    }
    assert ports == {t.patroni_port(r) for r in t.region_names}  # Patroni's API, not SQL

    crdb = envoy.sidecar(t, instance, envoy.Paths(PATHS.pki_dir, PATHS.descriptor, "cockroachdb"))
    for name in ("database_primary", "database_replica"):
        c = cluster(crdb, name)
        assert c["health_checks"][0]["http_health_check"]["path"] == "/health?ready=1"
        nearest = min(c["load_assignment"]["endpoints"], key=lambda e: e["priority"])
        assert nearest["locality"]["region"] == "us-west"


def _runtime(config: dict[str, Any]) -> dict[str, Any]:
    layer: dict[str, Any] = config["layered_runtime"]["layers"][0]["static_layer"]
    return layer


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: _runtime(c).pop("tracing.opentelemetry.flush_interval_ms"), "flush_interval"),
        (lambda c: _runtime(c).pop("tracing.opentelemetry.min_flush_spans"), "min_flush_spans"),
        (
            lambda c: c["static_resources"]["clusters"].pop(),  # the collector cluster
            "opentelemetry_collector",
        ),
    ],
)
def test_lint_catches_a_tracer_that_holds_or_loses_spans(
    configs: dict[str, dict[str, Any]], mutate: Any, message: str
) -> None:
    config = copy.deepcopy(configs["us-east-edge.yaml"])
    assert config["static_resources"]["clusters"][-1]["name"] == envoy.TRACING_CLUSTER
    mutate(config)
    assert any(message in p for p in lint.lint(config))


@pytest.mark.parametrize(
    "name", ["global.yaml", "us-east-edge.yaml", "us-east-transfer-1-sidecar.yaml"]
)
def test_every_proxy_traces_and_leaves_health_checks_out(
    configs: dict[str, dict[str, Any]], name: str
) -> None:
    config = configs[name]
    managers = [
        f["typed_config"]
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    assert managers
    for hcm in managers:
        provider = hcm["tracing"]["provider"]
        assert provider["name"] == "envoy.tracers.opentelemetry"
        assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == (
            envoy.TRACING_CLUSTER
        )
        tags = {t["tag"] for t in hcm["tracing"]["custom_tags"]}
        assert "meshbank.proxy" in tags
        routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
        # Every route that reaches a method names its span.
        for route in routes:
            if route["match"].get("path", "").startswith("/meshbank."):
                assert route["decorator"]["operation"] == route["match"]["path"][1:]
        for route in routes:
            match = route["match"]
            if "Health" in match.get("prefix", "") or match.get("path") == "/healthz":
                assert route["tracing"]["overall_sampling"] == {"numerator": 0}
    collector = cluster(config, envoy.TRACING_CLUSTER)
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == (
        topology.load().tracing_otlp_port
    )
