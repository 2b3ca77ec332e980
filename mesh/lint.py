"""Checks of any Envoy config for the traps already hit on these machines (DESIGN.md).

Run on every generated config by the tests and by ``meshbank mesh lint DIR``. Each
finding names the cluster, route or filter and the trap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mesh import api
from mesh.api import Safety

UNSAFE_RETRY_CONDITIONS = {
    "reset",
    "unavailable",
    "gateway-error",
    "5xx",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "retriable-status-codes",
}


def _seconds(value: str) -> float:
    return float(value.rstrip("s"))


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _is_http_cluster(cluster: dict[str, Any]) -> bool:
    return "typed_extension_protocol_options" in cluster or "health_checks" in cluster


def lint_cluster(cluster: dict[str, Any]) -> list[str]:
    name = cluster.get("name", "?")
    problems = []
    endpoints = cluster.get("load_assignment", {}).get("endpoints", [])
    priorities = {e.get("priority", 0) for e in endpoints}
    upstream_is_grpc = (
        any("grpc_health_check" in hc for hc in cluster.get("health_checks", []))
        or name == "local_service"
    )
    if upstream_is_grpc:
        options = cluster.get("typed_extension_protocol_options", {})
        http: dict[str, Any] = next(iter(options.values()), {}) if options else {}
        if "http2_protocol_options" not in http.get("explicit_http_config", {}):
            problems.append(
                f"cluster {name}: gRPC upstream without explicit http2_protocol_options"
            )
    for hc in cluster.get("health_checks", []):
        interval = _seconds(hc.get("interval", "0s"))
        no_traffic = _seconds(hc.get("no_traffic_interval", "60s"))
        if no_traffic > interval:
            problems.append(
                f"cluster {name}: no_traffic_interval {no_traffic}s > interval {interval}s "
                "(a cluster without traffic notices dead hosts late; default is 60 s)"
            )
    if len(priorities) > 1 or cluster.get("health_checks"):
        panic = cluster.get("common_lb_config", {}).get("healthy_panic_threshold", {})
        if panic.get("value", 50.0) != 0.0:
            problems.append(
                f"cluster {name}: healthy_panic_threshold must be 0 or traffic goes to dead hosts"
            )
        outlier = cluster.get("outlier_detection")
        if outlier is None:
            problems.append(f"cluster {name}: no outlier_detection")
        elif outlier.get("max_ejection_percent", 10) < 100:
            problems.append(
                f"cluster {name}: max_ejection_percent {outlier.get('max_ejection_percent', 10)} "
                "cannot eject a whole region"
            )
        if not cluster.get("health_checks"):
            problems.append(f"cluster {name}: failover cluster without active health checks")
    if _is_http_cluster(cluster):
        thresholds = cluster.get("circuit_breakers", {}).get("thresholds", [])
        default: dict[str, Any] = next(
            (t for t in thresholds if t.get("priority", "DEFAULT") == "DEFAULT"), {}
        )
        if "retry_budget" not in default and default.get("max_retries", 3) <= 3:
            problems.append(
                f"cluster {name}: default retry circuit breaker allows only 3 concurrent retries"
            )
    return problems


def lint_routes(config: dict[str, Any]) -> list[str]:
    safety = api.safety_by_path()
    rest = {m.http_regex: m.safety for m in api.methods()}
    problems = []
    for node in _walk(config):
        if "match" not in node or "route" not in node or not isinstance(node["route"], dict):
            continue
        policy = node["route"].get("retry_policy")
        if not policy:
            continue
        conditions = set(policy.get("retry_on", "").split(","))
        match = node["match"]
        method_safety = safety.get(match.get("path", "")) or rest.get(
            match.get("safe_regex", {}).get("regex", "")
        )
        unsafe = method_safety in (None, Safety.UNSAFE)
        if unsafe and conditions & UNSAFE_RETRY_CONDITIONS:
            risky = sorted(conditions & UNSAFE_RETRY_CONDITIONS)
            problems.append(
                f"route {node.get('name', match)}: retries on {risky} "
                "re-send a request that may have been applied; only methods the protos mark "
                "NO_SIDE_EFFECTS or IDEMPOTENT may"
            )
        if "per_try_timeout" not in policy:
            problems.append(f"route {node.get('name', match)}: retries without a per_try_timeout")
    return problems


def lint_transcoder(config: dict[str, Any]) -> list[str]:
    problems = []
    for node in _walk(config):
        if node.get("name") != "envoy.filters.http.grpc_json_transcoder":
            continue
        options = node.get("typed_config", {}).get("request_validation_options", {})
        if not options.get("reject_unknown_method"):
            problems.append(
                "grpc_json_transcoder: set request_validation_options.reject_unknown_method "
                "(otherwise unknown REST paths become 503)"
            )
    return problems


def lint_tracing(config: dict[str, Any]) -> list[str]:
    """The OpenTelemetry tracer holds spans 5 s or until 5 have ended unless its runtime
    keys say otherwise (DESIGN.md), and it exports to a cluster that must exist."""
    providers = [n for n in _walk(config) if n.get("name") == "envoy.tracers.opentelemetry"]
    if not providers:
        return []
    problems = []
    runtime: dict[str, Any] = {}
    for layer in config.get("layered_runtime", {}).get("layers", []):
        runtime.update(layer.get("static_layer", {}))
    if runtime.get("tracing.opentelemetry.flush_interval_ms", 5000) > 1000:
        problems.append(
            "tracing: set runtime tracing.opentelemetry.flush_interval_ms (default 5 s "
            "delays every span)"
        )
    if "tracing.opentelemetry.min_flush_spans" not in runtime:
        problems.append(
            "tracing: set runtime tracing.opentelemetry.min_flush_spans (the export batch; "
            "the interval above bounds how long a span waits)"
        )
    clusters = {c.get("name") for c in config.get("static_resources", {}).get("clusters", [])}
    for provider in providers:
        grpc_service = provider.get("typed_config", {}).get("grpc_service", {})
        target = grpc_service.get("envoy_grpc", {}).get("cluster_name")
        if target not in clusters:
            problems.append(f"tracing: exports to cluster {target!r}, which is not defined")
    return problems


def _seconds_of(duration: Any) -> float:
    return _seconds(duration) if isinstance(duration, str) else 0.0


def lint_edge_policy(config: dict[str, Any]) -> list[str]:
    """Token verification and quotas that look configured but do not protect anything."""
    from services.auth.handlers import KEY_PUBLICATION_DELAY

    problems = []
    for node in _walk(config):
        typed = node.get("typed_config", {})
        kind = typed.get("@type", "") if isinstance(typed, dict) else ""
        if kind.endswith("local_ratelimit.v3.LocalRateLimit"):
            for key in ("filter_enabled", "filter_enforced"):
                share = typed.get(key, {}).get("default_value", {})
                if share.get("numerator", 0) == 0:
                    problems.append(
                        f"{node.get('name')}: {key} defaults to 0 %: the quota limits nothing"
                    )
        if not kind.endswith("jwt_authn.v3.JwtAuthentication"):
            continue
        for name, provider in typed.get("providers", {}).items():
            if not provider.get("forward"):
                problems.append(
                    f"jwt_authn provider {name}: forward is false, so the services never see "
                    "the token they verify again"
                )
            jwks = provider.get("remote_jwks", {})
            cache = _seconds_of(jwks.get("cache_duration", "300s"))
            if jwks and 3 * cache > KEY_PUBLICATION_DELAY.total_seconds():
                problems.append(
                    f"jwt_authn provider {name}: JWKS cache_duration {cache}s is too long for "
                    f"the {KEY_PUBLICATION_DELAY.total_seconds()}s key publication delay "
                    "(tokens of a rotated-in key would be refused)"
                )
        rules = typed.get("rules", [])
        last = rules[-1] if rules else {}
        if last.get("match") != {"prefix": "/"} or "requires" not in last:
            problems.append(
                "jwt_authn: the last rule must require a token for every path (prefix '/'), "
                "or a path nobody listed is open"
            )
    return problems


def lint(config: dict[str, Any]) -> list[str]:
    """Every trap found in one Envoy bootstrap config."""
    clusters = config.get("static_resources", {}).get("clusters", [])
    problems = [p for c in clusters for p in lint_cluster(c)]
    return (
        problems
        + lint_routes(config)
        + lint_transcoder(config)
        + lint_tracing(config)
        + lint_edge_policy(config)
    )
