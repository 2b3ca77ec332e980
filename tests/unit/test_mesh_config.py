"""The Envoy configs generated from the topology: golden files, traps, routing, retries."""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2, status_pb2

from mesh import api, edge_policy, envoy, lint
from mesh.api import Safety
from regions import topology
from services.auth.handlers import KEY_PUBLICATION_DELAY
from services.common import config as service_config

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


def connection_managers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The typed configs of every HTTP connection manager of every listener."""
    return [
        f["typed_config"]
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]


@pytest.mark.parametrize(
    "name", ["global.yaml", "us-east-edge.yaml", "us-east-transfer-1-sidecar.yaml"]
)
def test_every_proxy_traces_and_leaves_health_checks_out(
    configs: dict[str, dict[str, Any]], name: str
) -> None:
    config = configs[name]
    managers = connection_managers(config)
    assert managers
    for hcm in managers:
        provider = hcm["tracing"]["provider"]
        assert provider["name"] == "envoy.tracers.opentelemetry"
        assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == (
            envoy.TRACING_CLUSTER
        )
        tags = {t["tag"] for t in hcm["tracing"]["custom_tags"]}
        assert "meshbank.proxy" in tags
        # Head sampling at the topology's rate; x-client-trace-id always traced
        # (client_sampling left at Envoy's 100%).
        assert hcm["tracing"]["random_sampling"] == {"value": topology.load().trace_sample_percent}
        assert "client_sampling" not in hcm["tracing"]
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


def test_the_sample_rate_comes_from_the_topology() -> None:
    t = dataclasses.replace(topology.load(), trace_sample_percent=2.5)
    instance = next(i for i in t.instances() if i.service == "transfer")
    for config in (
        envoy.global_entry(t, PATHS),
        envoy.edge(t, "us-east", PATHS),
        envoy.sidecar(t, instance, PATHS),
    ):
        rates = [
            hcm["tracing"]["random_sampling"]
            for hcm in connection_managers(config)
            if "tracing" in hcm
        ]
        assert rates
        assert rates == [{"value": 2.5}] * len(rates)


# -- the partner edge: tokens, quotas, limits (mesh/edge_policy.py) ------------------------


def edge_hcm(config: dict[str, Any], listener: int = 0) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][listener]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]
    return hcm


def http_filter(hcm: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        f["typed_config"] for f in hcm["http_filters"] if f["name"] == name
    )
    return found


def first_rule(rules: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The jwt_authn rule Envoy applies to ``path`` (the first that matches)."""
    for rule in rules:
        match = rule["match"]
        if match.get("path") == path.split("?")[0] or path.startswith(match.get("prefix", "\0")):
            return rule
    raise AssertionError(f"no rule matches {path}")


def test_edges_verify_tokens_before_transcoding(configs: dict[str, dict[str, Any]]) -> None:
    issuer, audience = service_config.token_identity({})
    for region in topology.load().region_names:
        hcm = edge_hcm(configs[f"{region}-edge.yaml"])
        names = [f["name"] for f in hcm["http_filters"]]
        assert names.index("envoy.filters.http.health_check") < names.index(edge_policy.JWT_FILTER)
        assert names.index(edge_policy.JWT_FILTER) < names.index(
            "envoy.filters.http.grpc_json_transcoder"
        )
        provider = http_filter(hcm, edge_policy.JWT_FILTER)["providers"][edge_policy.PROVIDER]
        assert (provider["issuer"], provider["audiences"]) == (issuer, [audience])
        assert provider["forward"] is True  # the services verify the token again
        assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]
        jwks = provider["remote_jwks"]
        assert jwks["async_fetch"]["fast_listener"] is True  # the fetch uses this listener
        # Through the mesh: the edge's own listener, which transcodes GetJwks to auth.
        t = topology.load()
        assert (
            jwks["http_uri"]["uri"]
            == f"https://{t.host_of(region)}:{t.edge_port(region)}/v1/auth/jwks"
        )
        jwks_cluster = cluster(configs[f"{region}-edge.yaml"], jwks["http_uri"]["cluster"])
        endpoint = jwks_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"]["port_value"] == t.edge_port(region)


def test_the_token_issuer_and_audience_follow_the_services_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESHBANK_TOKEN_ISSUER", "https://auth.example")
    monkeypatch.setenv("MESHBANK_TOKEN_AUDIENCE", "partners")
    provider = edge_policy.jwt_authn(topology.load(), "us-east")["typed_config"]["providers"]
    assert provider[edge_policy.PROVIDER]["issuer"] == "https://auth.example"
    assert provider[edge_policy.PROVIDER]["audiences"] == ["partners"]


def test_only_the_token_endpoints_health_and_reflection_are_open(
    configs: dict[str, dict[str, Any]],
) -> None:
    hcm = edge_hcm(configs["us-east-edge.yaml"])
    rules = http_filter(hcm, edge_policy.JWT_FILTER)["rules"]
    for m in api.methods():
        for path in (m.path, m.http_template, m.http_template + "?x=1"):
            needs_token = "requires" in first_rule(rules, path)
            assert needs_token is (m.service != "auth"), path
    for path in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/v1/openapi.yaml",
    ):
        assert "requires" not in first_rule(rules, path), path
    for path in ("/v1/auth%3Alogin", "/v1//auth:login", "/anything", "/"):
        assert "requires" in first_rule(rules, path), path


def test_a_rotated_key_is_published_for_several_jwks_cache_periods() -> None:
    period = edge_policy.JWKS_CACHE_SECONDS + edge_policy.JWKS_REFETCH_AFTER_FAILURE_SECONDS
    assert KEY_PUBLICATION_DELAY.total_seconds() >= 2 * period


def test_quotas_come_from_the_topology(configs: dict[str, dict[str, Any]]) -> None:
    policy = topology.load().edge
    hcm = edge_hcm(configs["eu-west-edge.yaml"])
    for name, quota in (("partner", policy.partner), ("login", policy.login)):
        rl = http_filter(hcm, f"{edge_policy.RATE_LIMIT_FILTER}.{name}")
        (descriptor,) = rl["descriptors"]
        assert descriptor["token_bucket"] == {
            "max_tokens": quota.burst,
            "tokens_per_fill": quota.refill,
            "fill_interval": f"{quota.interval_seconds}s",
        }
        (retry_after,) = rl["response_headers_to_add"]
        assert retry_after["header"] == {"key": "retry-after", "value": str(quota.interval_seconds)}
        assert rl["rate_limited_as_resource_exhausted"] is True
    smaller = dataclasses.replace(
        topology.load(),
        edge=topology.EdgePolicy(partner=topology.Quota(7, 3, 2), max_request_bytes=2048),
    )
    hcm = edge_hcm(envoy.edge(smaller, "us-east", PATHS))
    partner = http_filter(hcm, f"{edge_policy.RATE_LIMIT_FILTER}.partner")
    assert partner["descriptors"][0]["token_bucket"]["max_tokens"] == 7
    assert http_filter(hcm, "envoy.filters.http.buffer")["max_request_bytes"] == 2048


def test_the_partner_quota_is_keyed_on_the_verified_subject(
    configs: dict[str, dict[str, Any]],
) -> None:
    hcm = edge_hcm(configs["us-east-edge.yaml"])
    partner = http_filter(hcm, f"{edge_policy.RATE_LIMIT_FILTER}.partner")
    (limit,) = partner["rate_limits"]
    (action,) = limit["actions"]
    # From jwt_authn's verified payload, not from a header a client could set.
    assert action["metadata"]["metadata_key"] == {
        "key": edge_policy.JWT_FILTER,
        "path": [{"key": edge_policy.PAYLOAD_METADATA}, {"key": "sub"}],
    }


def test_the_login_quota_covers_both_credential_checks_in_both_protocols(
    configs: dict[str, dict[str, Any]],
) -> None:
    hcm = edge_hcm(configs["us-east-edge.yaml"])
    login = http_filter(hcm, f"{edge_policy.RATE_LIMIT_FILTER}.login")
    prefixes = {
        a["actions"][0]["header_value_match"]["headers"][0]["string_match"]["prefix"]
        for a in login["rate_limits"]
    }
    assert prefixes == {
        "/meshbank.auth.v1.AuthService/Login",
        "/meshbank.auth.v1.AuthService/IssueClientToken",
        "/v1/auth:login",
        "/v1/auth:token",
    }
    assert all(a["actions"][1] == {"remote_address": {}} for a in login["rate_limits"])


def test_public_listeners_have_size_limits_timeouts_and_json_errors(
    configs: dict[str, dict[str, Any]],
) -> None:
    policy = topology.load().edge
    listeners = [edge_hcm(configs["us-east-edge.yaml"])] + [
        edge_hcm(configs["global.yaml"], i) for i in range(3)
    ]
    for hcm in listeners:
        assert hcm["max_request_headers_kb"] == policy.max_request_headers_kb
        assert hcm["request_headers_timeout"] == f"{policy.request_headers_timeout_seconds}s"
        assert hcm["stream_idle_timeout"] == f"{policy.stream_idle_timeout_seconds}s"
        buffer = http_filter(hcm, "envoy.filters.http.buffer")
        assert buffer["max_request_bytes"] == policy.max_request_bytes
        mappers = hcm["local_reply_config"]["mappers"]
        json_bodies = {
            _mapper_status(m) for m in mappers if "json_format" in m["body_format_override"]
        }
        grpc_answers = {
            _mapper_status(m): m
            for m in mappers
            if "text_format_source" in m["body_format_override"]
        }
        # jwt_authn's 403 for a token of another audience becomes 401, in both protocols.
        assert [m["status_code"] for m in mappers if "status_code" in m] == [401, 401]
        assert json_bodies == {401, 403, 408, 413, 429, 431}
        assert set(grpc_answers) == json_bodies
        for status, mapper in grpc_answers.items():
            # The details a gRPC client reads must repeat its code and message exactly
            # (grpc_status.rpc_status.from_call refuses them otherwise).
            (added,) = mapper["headers_to_add"]
            assert added["header"]["key"] == "grpc-status-details-bin"
            details = status_pb2.Status.FromString(base64.b64decode(added["header"]["value"]))
            code, reason = edge_policy.EDGE_ERRORS[401 if status == 403 else status]
            assert details.code == code
            assert (
                details.message
                == mapper["body_format_override"]["text_format_source"]["inline_string"]
            )
            info = error_details_pb2.ErrorInfo()
            assert details.details[0].Unpack(info)
            assert (info.reason, info.domain) == (reason, "meshbank.dev")


def _mapper_status(mapper: dict[str, Any]) -> int:
    """The HTTP status a local-reply mapper matches on (alone or first in an and_filter)."""
    found = mapper["filter"]
    if "and_filter" in found:
        found = found["and_filter"]["filters"][0]
    status: int = found["status_code_filter"]["comparison"]["value"]["default_value"]
    return status


def test_the_global_entry_only_forwards(configs: dict[str, dict[str, Any]]) -> None:
    for i in range(3):
        hcm = edge_hcm(configs["global.yaml"], i)
        names = {f["name"] for f in hcm["http_filters"]}
        assert edge_policy.JWT_FILTER not in names  # the edges verify tokens
        assert not any(n.startswith(edge_policy.RATE_LIMIT_FILTER) for n in names)
        # It appends the client's address to X-Forwarded-For, which the edges trust
        # from its host only.
        assert hcm["use_remote_address"] is True
    detection = edge_hcm(configs["us-east-edge.yaml"])["original_ip_detection_extensions"]
    cidrs = detection[0]["typed_config"]["xff_trusted_cidrs"]["cidrs"]
    assert cidrs == [{"address_prefix": topology.load().host, "prefix_len": 32}]


JWT = edge_policy.JWT_FILTER
PARTNER_QUOTA = f"{edge_policy.RATE_LIMIT_FILTER}.partner"


@pytest.mark.parametrize(
    ("filter_name", "mutate"),
    [
        (JWT, lambda f: f["providers"]["meshbank"].update(forward=False)),
        (JWT, lambda f: f["rules"].pop()),
        (JWT, lambda f: f["providers"]["meshbank"]["remote_jwks"].update(cache_duration="300s")),
        (PARTNER_QUOTA, lambda f: f.pop("filter_enabled")),
        (PARTNER_QUOTA, lambda f: f.pop("filter_enforced")),
    ],
)
def test_lint_catches_an_edge_policy_that_protects_nothing(
    configs: dict[str, dict[str, Any]], filter_name: str, mutate: Any
) -> None:
    config = copy.deepcopy(configs["us-east-edge.yaml"])
    mutate(http_filter(edge_hcm(config), filter_name))
    assert lint.lint(config)
