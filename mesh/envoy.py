"""Envoy configuration for every proxy of the mesh, generated from the topology alone.

* ``sidecar``: one per service instance. An mTLS inbound listener that accepts only the
  edges' identities and forwards to the service on loopback over HTTP/2, and an
  outbound TCP listener the service uses to reach the database.
* ``edge``: one per region. gRPC and REST/JSON (grpc_json_transcoder) on one port;
  a cluster per service whose endpoints are every instance's sidecar, grouped by
  locality, priority 0 for its own region and 1, 2, ... in its failover order.
* ``global``: one process with a listener per client location, sending each to that
  region's edge first and to the next-nearest healthy edge when it is down (what
  GeoDNS/anycast does in production).

The public listeners (edges and global entry) terminate TLS (``_public_tls``: TLS 1.2+,
ALPN ``h2``/``http/1.1``, certificates from ``mesh.public_tls``); the global entry
re-encrypts to the edges and verifies each edge's certificate by name. Only the admin
listeners, on loopback, are plaintext.

The traps measured on these machines (DESIGN.md) are handled here and checked by
``mesh.lint``: explicit HTTP/2 upstreams, ``no_traffic_interval`` equal to the health
check interval, ``healthy_panic_threshold`` 0, ``max_ejection_percent`` 100 so a whole
region can be ejected, a retry budget instead of the default 3 concurrent retries, and
retries on reset/unavailable only for methods the protos mark safe to repeat.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh import api, edge_policy, openapi, public_tls
from mesh.api import Safety
from regions.topology import Instance, Topology, edge_identity, service_identity

Config = dict[str, Any]

HC_INTERVAL = "1s"
# How long a database health check waits for Patroni, and how often each sidecar checks
# each member (see _database_cluster).
DB_HC_TIMEOUT = "2s"
DB_REPLICA_HC_TIMEOUT = "1s"  # Patroni's /liveness (the replica cluster): no query
DB_HC_INTERVAL = "1s"
TYPE_URL = "type.googleapis.com/"
EXT = TYPE_URL + "envoy.extensions."
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS_SOCKET = "envoy.transport_sockets.tls"
# Retryable outcomes for calls that are safe to repeat (reads, request_id writes).
SAFE_RETRY_ON = "connect-failure,refused-stream,reset,unavailable,gateway-error"
# For everything else only failures where the request never reached a server.
UNSAFE_RETRY_ON = "connect-failure,refused-stream"
# Every proxy exports its spans over OTLP/gRPC to the collector of the topology's port
# plan (the tracing UI locally; an OpenTelemetry Collector in front of Jaeger/Tempo in
# production listens on the same port).
TRACING_CLUSTER = "opentelemetry_collector"
# The tracer holds spans 5 s or until 5 have ended by default (DESIGN.md): a trace would
# reach the UI seconds after the call, and a proxy that is killed loses what it held.
# Every 250 ms, then, in one OTLP request per batch: exporting each span on its own
# (min_flush_spans 1) made the collector take one request per span, and the tracing UI
# cost a third of the transfer throughput even at 10% sampling (docs/benchmarks.md).
TRACING_RUNTIME = {
    "tracing.opentelemetry.flush_interval_ms": 250,
    "tracing.opentelemetry.min_flush_spans": 256,
}
# Health checks are not traced: the proxies' own probes every second would bury the
# requests' traces (the services skip grpc.health.v1.Health on their side too).
NOT_TRACED: Config = {
    "client_sampling": {"numerator": 0},
    "random_sampling": {"numerator": 0},
    "overall_sampling": {"numerator": 0},
}


@dataclass(frozen=True)
class Paths:
    """Where the generated configs point at files, and which database sits underneath."""

    pki_dir: Path
    descriptor: Path
    # "postgres" (Patroni health endpoints) or "cockroachdb" (every node serves SQL).
    database: str = "postgres"
    # Every public listener's certificate when it is not where the topology says
    # (Kubernetes: a Secret volume); None: mesh.public_tls.files.
    public: public_tls.PublicCert | None = None

    def public_cert(self, topology: Topology, listener: str) -> public_tls.PublicCert:
        return self.public or public_tls.files(topology, self.pki_dir, listener)

    def cert(self, stem: str) -> str:
        return str(self.pki_dir / f"{stem}.crt")

    def key(self, stem: str) -> str:
        return str(self.pki_dir / f"{stem}.key")

    @property
    def openapi(self) -> Path:
        """The OpenAPI document the edges serve; tools/gen.sh writes it beside the descriptors."""
        return self.descriptor.with_name("openapi.yaml")

    @property
    def ca(self) -> str:
        return str(self.pki_dir / "ca.crt")


def _address(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def _bootstrap(node_id: str, cluster: str, admin_port: int, host: str) -> Config:
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": _address(host, admin_port)},
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        "overload.global_downstream_max_connections": 50000,
                        **TRACING_RUNTIME,
                    },
                }
            ]
        },
    }


def _http2() -> Config:
    return {
        HTTP_PROTOCOL_OPTIONS: {
            "@type": f"{TYPE_URL}{HTTP_PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1000}},
        }
    }


def _san_matchers(identities: Iterable[str]) -> list[Config]:
    return [{"san_type": "URI", "matcher": {"exact": i}} for i in identities]


def _common_tls(paths: Paths, own: str, peers: Iterable[str]) -> Config:
    """Our certificate, and a peer must chain to the mesh CA and carry one of ``peers``."""
    return {
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": paths.cert(own)},
                "private_key": {"filename": paths.key(own)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": paths.ca},
            "match_typed_subject_alt_names": _san_matchers(peers),
        },
    }


def _upstream_tls(paths: Paths, own: str, peers: Iterable[str]) -> Config:
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": EXT + "transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": _common_tls(paths, own, peers),
        },
    }


def _downstream_mtls(paths: Paths, own: str, peers: Iterable[str]) -> Config:
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": EXT + "transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls(paths, own, peers),
        },
    }


# Partners' clients: nothing older than TLS 1.2 (Envoy's default minimum for servers
# too, written out so that a changed default cannot lower it).
TLS_PARAMS: Config = {"tls_minimum_protocol_version": "TLSv1_2"}
PUBLIC_ALPN = ["h2", "http/1.1"]  # gRPC and REST/JSON on one port


def _public_tls(cert: public_tls.PublicCert) -> Config:
    """A public listener's TLS: server authentication only (partners authenticate with
    tokens), HTTP/2 or HTTP/1.1 by ALPN."""
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": EXT + "transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_params": TLS_PARAMS,
                "alpn_protocols": PUBLIC_ALPN,
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert.cert)},
                        "private_key": {"filename": str(cert.key)},
                    }
                ],
            },
        },
    }


def public_upstream_tls(cert: public_tls.PublicCert, name: str, alpn: str) -> Config:
    """TLS to a public listener (the global entry to an edge, an edge to itself for the
    JWKS): SNI ``name``, and the certificate must chain to ``cert.ca`` and name it."""
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": EXT + "transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": name,
            "common_tls_context": {
                "tls_params": TLS_PARAMS,
                "alpn_protocols": [alpn],
                "validation_context": {
                    "trusted_ca": {"filename": str(cert.ca)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": name}}
                    ],
                },
            },
        },
    }


def _edges_over_tls(cluster: Config, topology: Topology, paths: Paths) -> Config:
    """Each edge endpoint verified by its own region's name: one transport socket per
    region, chosen by the endpoint's metadata (a cluster has one SNI otherwise)."""
    matches = []
    for locality in cluster["load_assignment"]["endpoints"]:
        region = locality["locality"]["region"]
        for lb_endpoint in locality["lb_endpoints"]:
            lb_endpoint["metadata"] = {
                "filter_metadata": {"envoy.transport_socket_match": {"edge": region}}
            }
    for region in topology.region_names:
        cert = paths.public_cert(topology, region)
        matches.append(
            {
                "name": f"edge_{region}",
                "match": {"edge": region},
                "transport_socket": public_upstream_tls(
                    cert, public_tls.server_name(topology, region), "h2"
                ),
            }
        )
    cluster["transport_socket_matches"] = matches
    return cluster


def _router() -> Config:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": EXT + "filters.http.router.v3.Router"},
    }


def _hcm(stat_prefix: str, routes: Config, filters: list[Config], **extra: Any) -> Config:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": EXT + "filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": routes,
            "http_filters": [*filters, _router()],
            "http2_protocol_options": {"max_concurrent_streams": 1000},
            # Bounded request headers; body limits are enforced per route by timeouts
            # and by the services' max message size.
            "max_request_headers_kb": 64,
            "common_http_protocol_options": {"idle_timeout": "300s"},
            "stream_idle_timeout": "60s",
            "request_timeout": "60s",
            **extra,
        },
    }


def _tracing(topology: Topology, service_name: str, tags: dict[str, str]) -> Config:
    """The HCM's OpenTelemetry tracer: W3C ``traceparent`` in and out, one span per
    request named by the route's ``decorator``, exported to ``TRACING_CLUSTER``.

    Head sampling: a request that arrives without a ``traceparent`` is traced with the
    topology's ``tracing.sample_percent`` (``random_sampling``), or always when it carries
    ``x-client-trace-id`` (``client_sampling``, Envoy's default 100%). One that arrives
    with a ``traceparent`` keeps its sampled flag: Envoy's OpenTelemetry tracer follows
    the parent, and so do the services' SDKs (``parentbased_traceidratio``). The first
    hop decides for the whole trace, so a trace is complete or absent.

    ``tags`` become attributes of every span: which proxy and region handled the
    request, visible per span in any UI (Phoenix does not show resource attributes).
    Envoy records no request headers unless asked, so ``authorization`` never appears.
    """
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": TYPE_URL + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": TRACING_CLUSTER},
                    "timeout": "1s",
                },
                "service_name": service_name,
            },
        },
        "random_sampling": {"value": topology.trace_sample_percent},
        "custom_tags": [{"tag": k, "literal": {"value": v}} for k, v in tags.items()],
    }


def _tracing_cluster(topology: Topology) -> Config:
    return {
        "name": TRACING_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": _http2(),
        "circuit_breakers": _circuit_breakers(),
        "load_assignment": {
            "cluster_name": TRACING_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": _address(
                                    topology.shared_host, topology.tracing_otlp_port
                                )
                            }
                        }
                    ]
                }
            ],
        },
    }


def _circuit_breakers() -> Config:
    # A retry budget instead of max_retries: the default allows only 3 concurrent
    # retries per cluster, which fails calls during a region failover.
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": 4096,
                "max_pending_requests": 4096,
                "max_requests": 4096,
                "retry_budget": {
                    "budget_percent": {"value": 25.0},
                    "min_retry_concurrency": 32,
                },
            }
        ]
    }


def _outlier_detection() -> Config:
    return {
        "consecutive_5xx": 5,
        "consecutive_gateway_failure": 2,
        "enforcing_consecutive_gateway_failure": 100,
        "interval": "1s",
        "base_ejection_time": "5s",
        "max_ejection_time": "30s",
        # A whole region (every endpoint at one priority) must be ejectable.
        "max_ejection_percent": 100,
    }


def _health_check(kind: str, target: str) -> Config:
    check: Config = {
        "timeout": "0.5s",
        "interval": HC_INTERVAL,
        "interval_jitter": "0.1s",
        # Default 60 s: a cluster that had no traffic yet would notice a dead host a
        # minute late.
        "no_traffic_interval": HC_INTERVAL,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
    }
    if kind == "grpc":
        check["grpc_health_check"] = {"service_name": target}
    else:
        check["http_health_check"] = {"path": target, "codec_client_type": "HTTP2"}
    return check


def _locality_cluster(
    name: str,
    topology: Topology,
    from_region: str,
    endpoints: dict[str, list[tuple[str, int]]],
    health: Config,
    transport: Config | None,
) -> Config:
    """A cluster with one locality per (region, zone); priority = failover distance."""
    localities = []
    for priority, region in enumerate(topology.region(from_region).preference):
        by_zone: dict[str, list[Config]] = {}
        for zone, port in endpoints.get(region, []):
            by_zone.setdefault(zone, []).append(
                {"endpoint": {"address": _address(topology.host_of(region), port)}}
            )
        for zone, lb_endpoints in sorted(by_zone.items()):
            localities.append(
                {
                    "locality": {"region": region, "zone": zone},
                    "priority": priority,
                    "lb_endpoints": lb_endpoints,
                }
            )
    cluster: Config = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _http2(),
        "load_assignment": {"cluster_name": name, "endpoints": localities},
        "health_checks": [health],
        "outlier_detection": _outlier_detection(),
        "circuit_breakers": _circuit_breakers(),
        # Never send traffic to hosts known to be dead, whatever share is left.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "close_connections_on_host_health_failure": True,
    }
    if transport is not None:
        cluster["transport_socket"] = transport
    return cluster


def _retry_policy(safety: Safety) -> Config:
    return {
        "retry_on": UNSAFE_RETRY_ON if safety is Safety.UNSAFE else SAFE_RETRY_ON,
        "num_retries": 3,
        "per_try_timeout": "2s" if safety is Safety.READ else "5s",
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": EXT + "retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
        # After two attempts in one priority (region), try the next one.
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": EXT + "retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 2,
            },
        },
        "retry_back_off": {"base_interval": "0.02s", "max_interval": "0.25s"},
    }


def _method_routes(cluster_of: dict[str, str]) -> list[Config]:
    """One route per RPC (exact gRPC path) with the retry policy its proto allows."""
    routes = []
    for m in api.methods():
        if m.service not in cluster_of:
            continue
        routes.append(
            {
                "name": m.path,
                "match": {"path": m.path},
                "route": {
                    "cluster": cluster_of[m.service],
                    "timeout": "10s" if m.safety is Safety.READ else "20s",
                    "retry_policy": _retry_policy(m.safety),
                },
                "decorator": {"operation": m.path.lstrip("/")},
            }
        )
    return routes


def _rest_routes(cluster: str) -> list[Config]:
    """One route per RPC's REST mapping (verb + path template from google.api.http)."""
    return [
        {
            "name": f"{m.http_verb} {m.http_template}",
            "match": {
                "safe_regex": {"regex": m.http_regex},
                "headers": [{"name": ":method", "string_match": {"exact": m.http_verb}}],
            },
            "route": {
                "cluster": cluster,
                "timeout": "10s" if m.safety is Safety.READ else "20s",
                "retry_policy": _retry_policy(m.safety),
            },
            "decorator": {"operation": m.path.lstrip("/")},
        }
        for m in api.methods()
    ]


def _reflection_routes(cluster: str) -> list[Config]:
    """Server reflection (grpcurl list/describe): every service describes the whole API."""
    return [
        {
            "name": f"reflection {version}",
            "match": {"prefix": f"/grpc.reflection.{version}.ServerReflection/"},
            "route": {"cluster": cluster, "timeout": "10s"},
            # A bidirectional stream: the edge's body limit (a buffer filter) would hold
            # it until the client half-closes, which grpcurl never does first.
            "typed_per_filter_config": {
                "envoy.filters.http.buffer": {
                    "@type": EXT + "filters.http.buffer.v3.BufferPerRoute",
                    "disabled": True,
                }
            },
        }
        for version in ("v1alpha", "v1")
    ]


def _healthz_route() -> Config:
    """``/healthz`` (answered by the health_check filter before routing): untraced."""
    return {
        "name": "healthz",
        "match": {"path": "/healthz"},
        "direct_response": {"status": 200},
        "tracing": NOT_TRACED,
    }


# Envoy refuses a direct_response body above this (default 4 KiB); the document is ~40 KiB.
OPENAPI_MAX_BYTES = 1024 * 1024


def _openapi_route(paths: Paths) -> Config:
    """GET /v1/openapi.yaml answered by the edge itself, from the generated file.

    The transcoder is disabled on this route: with ``reject_unknown_method`` it would
    answer 404 for a path that maps to no RPC. No token is needed to read it.
    """
    return {
        "name": "openapi",
        "match": {
            "path": openapi.DOCUMENT_PATH,
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "direct_response": {"status": 200, "body": {"filename": str(paths.openapi)}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/yaml"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "typed_per_filter_config": {
            "envoy.filters.http.grpc_json_transcoder": {
                "@type": TYPE_URL + "envoy.config.route.v3.FilterConfig",
                "disabled": True,
            }
        },
    }


def _unknown_route() -> Config:
    return {
        "name": "unknown",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": "unknown method\n"}},
    }


def _database_listener(name: str, host: str, port: int) -> Config:
    return {
        "name": name,
        "address": _address(host, port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": EXT + "filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": name,
                            "cluster": name,
                            "idle_timeout": "3600s",
                        },
                    }
                ]
            }
        ],
    }


def _database_cluster(
    name: str, topology: Topology, region: str, primary: bool, engine: str = "postgres"
) -> Config:
    """PostgreSQL members as a TCP cluster.

    The primary cluster is health-checked on Patroni's REST API, which answers
    ``/primary`` 200 only on the leader, so it follows failovers by itself; connections
    to a host that stops being healthy are closed and the services' retry helper
    reconnects. The replica cluster (reads that accept staleness) only needs a live
    member, nearest first: the service measures the staleness in the database itself.
    It is checked on Patroni's ``/liveness``, which answers at once unless the member is
    dead or paused; ``/read-only`` stopped answering in time while Patroni's loop waited
    on a lost etcd member (emptying the cluster during failovers), and a plain TCP check
    passes for a SIGSTOPped PostgreSQL, whose kernel still accepts connections.

    A ``/primary`` check waits up to ``DB_HC_TIMEOUT`` for Patroni. Under the benchmark's
    load a 1 s timeout ran out twice in a row often enough to mark the leader unhealthy:
    the sidecar then closed every connection to it, and the transactions on them failed
    (docs/benchmarks.md). A dead or demoted member still fails at once (connection
    refused, 503); a paused one is marked down after two timeouts, about 5 s, before
    Patroni's 6 s TTL lets another member take over. ``/liveness`` runs no query: under
    the same load it answered within 0.33 s at most (2,400 probes), so the replica
    cluster waits ``DB_REPLICA_HC_TIMEOUT`` (1 s), and the reads on a paused member's
    connections move to the next region after about 3 s instead of 5.

    Every sidecar checks every member once a second (``DB_HC_INTERVAL``), about 36
    requests a second per Patroni here, each a new connection, a thread and a query
    (Patroni's REST API speaks HTTP/1.0). Twice a second, the idle deployment spent a
    quarter of a core in Patroni alone, and its HA loop overran (``Loop time exceeded``)
    so often that a new leader named its synchronous standby 8-13 s after the standby
    was streaming. A new leader is found up to 0.5 s later than at twice a second.
    """
    localities: list[Config] = []
    for priority, other in enumerate(topology.region(region).preference):
        endpoint: Config = {
            "address": _address(topology.host_of(other), topology.database_port(other)),
            "health_check_config": {"port_value": topology.patroni_port(other)},
        }
        localities.append(
            {
                "locality": {"region": other},
                "priority": 0 if primary else priority,
                "lb_endpoints": [{"endpoint": endpoint}],
            }
        )
    path, timeout = ("/primary", DB_HC_TIMEOUT) if primary else ("/liveness", DB_REPLICA_HC_TIMEOUT)
    if engine == "cockroachdb":
        # Any ready node takes reads and writes (CockroachDB routes to leaseholders);
        # the nearest ready one is best for both.
        path, timeout = "/health?ready=1", DB_HC_TIMEOUT
        for priority, locality in enumerate(localities):
            locality["priority"] = priority
    check: Config = {"http_health_check": {"path": path}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": localities},
        "health_checks": [
            {
                "timeout": timeout,
                "interval": DB_HC_INTERVAL,
                "no_traffic_interval": DB_HC_INTERVAL,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                **check,
            }
        ],
        "outlier_detection": _outlier_detection(),
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "close_connections_on_host_health_failure": True,
        "circuit_breakers": _circuit_breakers(),
    }


def sidecar(topology: Topology, instance: Instance, paths: Paths) -> Config:
    host = topology.host_of(instance.region)
    stem = f"{instance.region}-{instance.service}"
    config = _bootstrap(
        instance.name, f"{instance.region}/{instance.service}", instance.admin_port, host
    )
    served_by = f"{instance.region}/{instance.zone}/{instance.service}/{instance.replica}"
    inbound_routes = {
        "name": "inbound",
        "virtual_hosts": [
            {
                "name": "local_service",
                "domains": ["*"],
                "routes": [
                    {
                        "name": "health",
                        "match": {"prefix": "/grpc.health.v1.Health/"},
                        "route": {"cluster": "local_service", "timeout": "30s"},
                        "tracing": NOT_TRACED,
                    },
                    # One route per RPC only so that each span is named by its method.
                    *(
                        {
                            "name": m.path,
                            "match": {"path": m.path},
                            "route": {"cluster": "local_service", "timeout": "30s"},
                            "decorator": {"operation": m.path.lstrip("/")},
                        }
                        for m in api.methods()
                        if m.service == instance.service
                    ),
                    {
                        "match": {"prefix": "/"},
                        "route": {"cluster": "local_service", "timeout": "30s"},
                    },
                ],
                "response_headers_to_add": [
                    {"header": {"key": "x-meshbank-served-by", "value": served_by}}
                ],
            }
        ],
    }
    config["static_resources"] = {
        "listeners": [
            {
                "name": "inbound",
                "address": _address(host, instance.inbound_port),
                "filter_chains": [
                    {
                        "filters": [
                            _hcm(
                                "inbound",
                                inbound_routes,
                                [],
                                forward_client_cert_details="SANITIZE_SET",
                                set_current_client_cert_details={"uri": True},
                                tracing=_tracing(
                                    topology,
                                    f"meshbank-{instance.service}-sidecar",
                                    {
                                        "meshbank.proxy": "sidecar",
                                        "meshbank.region": instance.region,
                                        "meshbank.zone": instance.zone,
                                        "meshbank.instance": instance.name,
                                    },
                                ),
                            )
                        ],
                        # Only the edges call services today; the list grows when
                        # services call each other.
                        "transport_socket": _downstream_mtls(
                            paths, stem, [edge_identity(r) for r in topology.region_names]
                        ),
                    }
                ],
            },
            _database_listener("database_primary", host, instance.db_primary_port),
            _database_listener("database_replica", host, instance.db_replica_port),
        ],
        "clusters": [
            {
                "name": "local_service",
                "type": "STATIC",
                "connect_timeout": "0.25s",
                "typed_extension_protocol_options": _http2(),
                "circuit_breakers": _circuit_breakers(),
                "load_assignment": {
                    "cluster_name": "local_service",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {"endpoint": {"address": _address(host, instance.service_port)}}
                            ]
                        }
                    ],
                },
            },
            _database_cluster("database_primary", topology, instance.region, True, paths.database),
            # Reads that accept staleness: the region's own member first (replica or
            # primary), then the others in failover order.
            _database_cluster("database_replica", topology, instance.region, False, paths.database),
            _tracing_cluster(topology),
        ],
    }
    return config


def edge(topology: Topology, region: str, paths: Paths) -> Config:
    host = topology.host_of(region)
    own = f"{region}-edge"
    config = _bootstrap(f"{region}-edge", f"{region}/edge", topology.edge_admin_port(region), host)
    clusters = []
    for service in topology.services:
        endpoints: dict[str, list[tuple[str, int]]] = {}
        for i in topology.instances():
            if i.service == service:
                endpoints.setdefault(i.region, []).append((i.zone, i.inbound_port))
        clusters.append(
            _locality_cluster(
                service,
                topology,
                region,
                endpoints,
                _health_check("grpc", api.full_service_name(service)),
                _upstream_tls(
                    paths, own, [service_identity(r, service) for r in topology.region_names]
                ),
            )
        )
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": EXT + "filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(paths.descriptor),
            "services": [api.full_service_name(s) for s in topology.services],
            "print_options": {
                "add_whitespace": False,
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
                "preserve_proto_field_names": False,
            },
            # Errors become the JSON form of google.rpc.Status with the HTTP status
            # grpc-gateway uses for each gRPC code.
            "convert_grpc_status": True,
            "request_validation_options": {
                # Without this, an unknown REST path is passed on and answered 503.
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
            },
        },
    }
    health = {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": EXT + "filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
        },
    }
    routes = {
        "name": "edge",
        "max_direct_response_body_size_bytes": OPENAPI_MAX_BYTES,
        "virtual_hosts": [
            {
                "name": "meshbank",
                "domains": ["*"],
                "routes": [
                    _openapi_route(paths),
                    *_method_routes({s: s for s in topology.services}),
                    *_reflection_routes(topology.services[0]),
                    _healthz_route(),
                    _unknown_route(),
                ],
                "response_headers_to_add": [
                    {"header": {"key": "x-meshbank-edge", "value": region}}
                ],
            }
        ],
    }
    config["static_resources"] = {
        "listeners": [
            {
                "name": "edge",
                "address": _address(host, topology.edge_port(region)),
                "filter_chains": [
                    {
                        "filters": [_edge_hcm(topology, region, routes, health, transcoder)],
                        "transport_socket": _public_tls(paths.public_cert(topology, region)),
                    }
                ],
            }
        ],
        "clusters": [
            *clusters,
            edge_policy.jwks_cluster(
                topology,
                region,
                public_upstream_tls(
                    paths.public_cert(topology, region),
                    public_tls.server_name(topology, region),
                    "http/1.1",
                ),
            ),
            _tracing_cluster(topology),
        ],
    }
    return config


def _edge_hcm(
    topology: Topology, region: str, routes: Config, health: Config, transcoder: Config
) -> Config:
    """Tokens, quotas and limits (mesh/edge_policy.py) in front of the transcoder.

    Health first (load balancers probe without a token), then token verification, the
    quotas (keyed on the verified subject and on the client address), the body limit,
    and the transcoder last: the edge's own refusals happen while the request is still
    REST or gRPC as the client sent it, so they are answered in the client's format.
    """
    policy = topology.edge
    filters = [
        health,
        edge_policy.jwt_authn(topology, region),
        edge_policy.partner_quota(policy),
        edge_policy.login_quota(policy),
        edge_policy.body_limit(policy),
        transcoder,
    ]
    return _hcm(
        f"edge_{region}",
        routes,
        filters,
        tracing=_tracing(
            topology, "meshbank-edge", {"meshbank.proxy": "edge", "meshbank.region": region}
        ),
        **edge_policy.listener_limits(policy),
        **edge_policy.trusted_client_address(topology),
    )


def global_entry(topology: Topology, paths: Paths) -> Config:
    host = topology.host
    config = _bootstrap("global", "global", topology.ports["global_admin"], host)
    listeners = []
    clusters = []
    for location in topology.region_names:
        cluster = f"edges_from_{location}"
        endpoints = {
            r: [(topology.region(r).zones[0], topology.edge_port(r))] for r in topology.region_names
        }
        clusters.append(
            _edges_over_tls(
                _locality_cluster(
                    cluster, topology, location, endpoints, _health_check("http", "/healthz"), None
                ),
                topology,
                paths,
            )
        )
        routes = {
            "name": f"global_{location}",
            "virtual_hosts": [
                {
                    "name": "meshbank",
                    "domains": ["*"],
                    # The same per-method retry safety as the edges, for gRPC paths
                    # and for the REST paths of the http annotations; anything else
                    # is retried only when it never reached an edge.
                    "routes": [
                        *_method_routes({s: cluster for s in topology.services}),
                        *_rest_routes(cluster),
                        *_reflection_routes(cluster),
                        {
                            "name": "rest",
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": cluster,
                                "timeout": "20s",
                                "retry_policy": _retry_policy(Safety.UNSAFE),
                            },
                        },
                    ],
                    "response_headers_to_add": [
                        {"header": {"key": "x-meshbank-location", "value": location}},
                        # The trace of this very request, to look up in the tracing UI.
                        {"header": {"key": "x-meshbank-trace-id", "value": "%TRACE_ID%"}},
                    ],
                }
            ],
        }
        listeners.append(
            {
                "name": f"global_{location}",
                "address": _address(host, topology.global_port(location)),
                "filter_chains": [
                    {
                        "filters": [
                            _hcm(
                                f"global_{location}",
                                routes,
                                [edge_policy.body_limit(topology.edge)],
                                tracing=_tracing(
                                    topology,
                                    "meshbank-global-entry",
                                    {"meshbank.proxy": "global", "meshbank.location": location},
                                ),
                                # The x-request-id the mesh logged, for support tickets.
                                always_set_request_id_in_response=True,
                                **edge_policy.listener_limits(topology.edge),
                                # Append the client's address to X-Forwarded-For: the
                                # edges key the login quota on it.
                                use_remote_address=True,
                            )
                        ],
                        "transport_socket": _public_tls(
                            paths.public_cert(topology, public_tls.GLOBAL)
                        ),
                    }
                ],
            }
        )
    clusters.append(_tracing_cluster(topology))
    config["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return config


def render(topology: Topology, paths: Paths) -> dict[str, Config]:
    """Every proxy's configuration, by file name."""
    configs: dict[str, Config] = {"global.yaml": global_entry(topology, paths)}
    for region in topology.region_names:
        configs[f"{region}-edge.yaml"] = edge(topology, region, paths)
    for instance in topology.instances():
        configs[f"{instance.name}-sidecar.yaml"] = sidecar(topology, instance, paths)
    return configs


def dump(config: Config) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


def write(topology: Topology, paths: Paths, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, config in render(topology, paths).items():
        path = out_dir / name
        path.write_text(dump(config))
        written[name] = path
    return written


def identities(topology: Topology) -> list[str]:
    """Every identity that needs a certificate."""
    names = [edge_identity(r) for r in topology.region_names]
    names += [service_identity(r, s) for r in topology.region_names for s in topology.services]
    return names
