"""What the edges enforce on partner traffic before any service sees it.

* ``jwt_authn``: access tokens are verified against the auth service's JWKS, which each
  edge fetches through the mesh (from its own listener: ``GET /v1/auth/jwks`` is
  transcoded to ``AuthService/GetJwks`` and sent to the auth sidecars with the usual
  locality failover), caches for ``JWKS_CACHE_SECONDS`` and refreshes in the
  background. Envoy does not refetch on an unknown ``kid``, so the auth service
  publishes a rotated-in key ``KEY_PUBLICATION_DELAY`` before it signs with it
  (services/auth/handlers.py). Every RPC of the AuthService (the token endpoints and
  the JWKS), gRPC health and reflection, ``/healthz`` and the OpenAPI document need no
  token; everything else does (the last rule catches every path: fail closed).
  The services still verify every token themselves (defence in depth).
* Quotas (Envoy local rate limit, token buckets per edge): per token subject, keyed on
  the ``sub`` claim from the verified payload (dynamic metadata, so a client cannot
  forge it with a header), and per client address on Login and IssueClientToken.
* Limits: request body (``buffer`` filter: 413), request headers (431), and the
  headers/request/stream timeouts, on the edges and on the global entry.
* Errors the edge answers itself carry a ``google.rpc.Status`` with an ``ErrorInfo``
  (domain ``meshbank.dev``), like the services' errors: as JSON for REST clients (the
  format the transcoder gives service errors), and in ``grpc-status-details-bin`` for
  gRPC clients, with a fixed message per status (the details must repeat the
  ``grpc-message`` exactly, and a header value cannot be computed per request).

The public listeners serve TLS only (mesh/envoy.py, mesh/public_tls.py), so the JWKS
fetch through the edge's own listener is HTTPS too, verifying the edge's certificate.
"""

from __future__ import annotations

import base64
from typing import Any

from google.rpc import error_details_pb2, status_pb2

from mesh import api
from regions.topology import EdgePolicy, Quota, Topology
from services.common import config as service_config

Config = dict[str, Any]

EXT = "type.googleapis.com/envoy.extensions."
JWT_FILTER = "envoy.filters.http.jwt_authn"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
PROVIDER = "meshbank"
JWKS_CLUSTER = "jwks"
JWKS_PATH = "/v1/auth/jwks"
# Short: a rotated key reaches every edge within one period (plus a fetch); the fetch
# is one cheap GetJwks per edge per period. KEY_PUBLICATION_DELAY must cover several.
JWKS_CACHE_SECONDS = 5
JWKS_REFETCH_AFTER_FAILURE_SECONDS = 1
# Served by the edges without a token (the OpenAPI route of mesh/openapi.py).
OPENAPI_PATH = "/v1/openapi.yaml"
# Where the verified claims are put for the rate limit (dynamic metadata of jwt_authn).
PAYLOAD_METADATA = "jwt_payload"
# The credential checks a guesser would hammer: limited per client address.
LOGIN_METHODS = ("Login", "IssueClientToken")
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Envoy's access-token (RFC 6750) leeway; the services' TokenVerifier uses the same.
CLOCK_SKEW_SECONDS = 5


def _auth_methods() -> list[api.Method]:
    return [m for m in api.methods() if m.service == "auth"]


def public_paths() -> list[str]:
    """Exact paths that need no token: every AuthService RPC (gRPC and REST) and OpenAPI."""
    paths = [p for m in _auth_methods() for p in (m.path, m.http_template)]
    return [*paths, OPENAPI_PATH]


def login_paths() -> list[str]:
    """Login and IssueClientToken, as gRPC paths and as REST paths.

    Matched as prefixes of ``:path`` before transcoding, so a query string does not
    escape the quota; other spellings (``%3A``, ``//``) are not routed to these RPCs by
    the transcoder, and need a token.
    """
    return [
        p for m in _auth_methods() if m.name in LOGIN_METHODS for p in (m.path, m.http_template)
    ]


def jwt_authn(topology: Topology, region: str) -> Config:
    issuer, audience = service_config.token_identity()
    rules: list[Config] = [{"match": {"path": p}} for p in public_paths()]
    rules += [{"match": {"prefix": p}} for p in PUBLIC_PREFIXES]
    # The catch-all comes last: a path nobody listed needs a token.
    rules.append({"match": {"prefix": "/"}, "requires": {"provider_name": PROVIDER}})
    jwks_uri = f"https://{topology.host_of(region)}:{topology.edge_port(region)}{JWKS_PATH}"
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": EXT + "filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                PROVIDER: {
                    "issuer": issuer,
                    "audiences": [audience],
                    "require_expiration": True,
                    "clock_skew_seconds": CLOCK_SKEW_SECONDS,
                    # Only the header: a token in a query string ends up in logs.
                    "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                    # Keep the header: the services verify the token again.
                    "forward": True,
                    "payload_in_metadata": PAYLOAD_METADATA,
                    "remote_jwks": {
                        "http_uri": {
                            "uri": jwks_uri,
                            "cluster": JWKS_CLUSTER,
                            "timeout": "2s",
                        },
                        "cache_duration": f"{JWKS_CACHE_SECONDS}s",
                        # Fetched in the background (before expiry, and again after a
                        # failure); the listener must not wait for it: the fetch goes
                        # through this very listener.
                        "async_fetch": {
                            "fast_listener": True,
                            "failed_refetch_duration": f"{JWKS_REFETCH_AFTER_FAILURE_SECONDS}s",
                        },
                        "retry_policy": {
                            "num_retries": 2,
                            "retry_back_off": {"base_interval": "0.1s", "max_interval": "0.5s"},
                        },
                    },
                }
            },
            "rules": rules,
        },
    }


def jwks_cluster(topology: Topology, region: str, transport_socket: Config) -> Config:
    """The edge's own listener, where ``GET /v1/auth/jwks`` is transcoded to GetJwks,
    reached over ``transport_socket`` (TLS verifying the edge's public certificate)."""
    return {
        "name": JWKS_CLUSTER,
        "transport_socket": transport_socket,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": JWKS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": topology.host_of(region),
                                        "port_value": topology.edge_port(region),
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _bucket(quota: Quota) -> Config:
    return {
        "max_tokens": quota.burst,
        "tokens_per_fill": quota.refill,
        "fill_interval": f"{quota.interval_seconds}s",
    }


def _always() -> Config:
    # Both default to 0 %: a local_ratelimit without them counts but limits nothing.
    return {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def _quota_filter(
    name: str, quota: Quota, entries: list[Config], actions: list[list[Config]]
) -> Config:
    """One local rate limit with one wildcard descriptor: a bucket per distinct value."""
    return {
        "name": f"{RATE_LIMIT_FILTER}.{name}",
        "typed_config": {
            "@type": EXT + "filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": f"{name}_quota",
            "filter_enabled": {**_always(), "runtime_key": f"{name}_quota.enabled"},
            "filter_enforced": {**_always(), "runtime_key": f"{name}_quota.enforced"},
            # No default bucket: requests without the descriptor are not limited here.
            "descriptors": [{"entries": entries, "token_bucket": _bucket(quota)}],
            "rate_limits": [{"actions": a} for a in actions],
            # Buckets kept per distinct subject or address (least recently used go).
            "max_dynamic_descriptors": 10000,
            "rate_limited_as_resource_exhausted": True,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "response_headers_to_add": [
                {
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    # A bucket refills every interval: by then a call will pass.
                    "header": {"key": "retry-after", "value": str(quota.interval_seconds)},
                }
            ],
        },
    }


def partner_quota(policy: EdgePolicy) -> Config:
    """Per token subject; only requests that carried a verified token have one."""
    subject = {
        "metadata": {
            "descriptor_key": "subject",
            "metadata_key": {
                "key": JWT_FILTER,
                "path": [{"key": PAYLOAD_METADATA}, {"key": "sub"}],
            },
        }
    }
    return _quota_filter("partner", policy.partner, [{"key": "subject"}], [[subject]])


def login_quota(policy: EdgePolicy) -> Config:
    """Per client address (as the global entry saw it) on the credential checks."""

    def login(path: str) -> Config:
        return {
            "header_value_match": {
                "descriptor_key": "credentials",
                "descriptor_value": "check",
                "headers": [{"name": ":path", "string_match": {"prefix": path}}],
            }
        }

    # One action list per path, all producing the same descriptor: one bucket per
    # address for every credential check together.
    return _quota_filter(
        "login",
        policy.login,
        [{"key": "credentials", "value": "check"}, {"key": "remote_address"}],
        [[login(path), {"remote_address": {}}] for path in login_paths()],
    )


def body_limit(policy: EdgePolicy) -> Config:
    """Whole requests up to ``max_request_bytes`` (every RPC is unary): larger is 413."""
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": EXT + "filters.http.buffer.v3.Buffer",
            "max_request_bytes": policy.max_request_bytes,
        },
    }


def _status_json(code: int, reason: str, message: str) -> Config:
    return {
        "json_format": {
            "code": code,
            "message": message,
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "meshbank.dev",
                    "metadata": {"edge_detail": "%RESPONSE_CODE_DETAILS%"},
                }
            ],
        }
    }


# HTTP status of an edge's own answer -> (google.rpc.Code, ErrorInfo reason).
EDGE_ERRORS: dict[int, tuple[int, str]] = {
    401: (16, "TOKEN_REJECTED"),  # UNAUTHENTICATED
    429: (8, "RATE_LIMITED"),  # RESOURCE_EXHAUSTED
    413: (3, "REQUEST_TOO_LARGE"),  # INVALID_ARGUMENT
    431: (3, "HEADERS_TOO_LARGE"),  # INVALID_ARGUMENT
    408: (4, "REQUEST_TIMEOUT"),  # DEADLINE_EXCEEDED
}
# What a gRPC client reads as the message of each of those answers.
EDGE_GRPC_MESSAGES: dict[int, str] = {
    401: "rejected at the edge: the access token is missing, expired or not valid here",
    429: "rate limited at the edge: retry after the Retry-After interval",
    413: "rejected at the edge: the request is larger than the edge accepts",
    431: "rejected at the edge: the request headers are larger than the edge accepts",
    408: "rejected at the edge: the request took too long to arrive",
}


def grpc_status_details(status: int) -> str:
    """``grpc-status-details-bin`` for an edge answer: a serialized google.rpc.Status."""
    code, reason = EDGE_ERRORS[status]
    info = error_details_pb2.ErrorInfo(reason=reason, domain="meshbank.dev")
    detail = status_pb2.Status(code=code, message=EDGE_GRPC_MESSAGES[status])
    detail.details.add().Pack(info)
    return base64.b64encode(detail.SerializeToString()).decode("ascii")


def _status_is(status: int) -> Config:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": f"edge_error_{status}"},
            }
        }
    }


def _content_type_is_grpc(invert: bool) -> Config:
    return {
        "header_filter": {
            "header": {
                "name": "content-type",
                "string_match": {"prefix": "application/grpc"},
                "invert_match": invert,
                "treat_missing_header_as_empty": True,
            }
        }
    }


def _grpc_answer(status: int) -> Config:
    """A gRPC local reply's message and its google.rpc.Status (Envoy sets grpc-status)."""
    return {
        # text_format is deprecated; text_format_source is its replacement.
        "body_format_override": {
            "text_format_source": {"inline_string": EDGE_GRPC_MESSAGES[status]}
        },
        "headers_to_add": [
            {
                "header": {"key": "grpc-status-details-bin", "value": grpc_status_details(status)},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def local_reply_config() -> Config:
    """The edge's own errors as google.rpc.Status, like the services' errors.

    REST: the Status as the JSON body. gRPC: Envoy's gRPC status (401 ->
    UNAUTHENTICATED, 429 -> RESOURCE_EXHAUSTED...) with a fixed message and the Status
    in ``grpc-status-details-bin`` (the body becomes ``grpc-message``; the header is added
    before Envoy turns the reply into a trailers-only gRPC answer). jwt_authn answers a
    token for another audience with 403; it is a credential that is not valid here, so
    both protocols get 401/UNAUTHENTICATED like every other rejected token (the only
    403 the edge itself produces). Mappers are tried in order; the first match applies.
    """
    not_grpc, grpc_ = _content_type_is_grpc(invert=True), _content_type_is_grpc(invert=False)
    code, reason = EDGE_ERRORS[401]
    mappers: list[Config] = [
        {
            "filter": {"and_filter": {"filters": [_status_is(403), not_grpc]}},
            "status_code": 401,
            "body_format_override": _status_json(code, reason, "%LOCAL_REPLY_BODY%"),
        },
        {"filter": _status_is(403), "status_code": 401, **_grpc_answer(401)},
    ]
    for status, (code, reason) in EDGE_ERRORS.items():
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_status_is(status), not_grpc]}},
                "body_format_override": _status_json(code, reason, "%LOCAL_REPLY_BODY%"),
            }
        )
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_status_is(status), grpc_]}},
                **_grpc_answer(status),
            }
        )
    return {"mappers": mappers}


def listener_limits(policy: EdgePolicy) -> Config:
    """HTTP connection manager settings of every public listener (edges, global entry)."""
    return {
        "max_request_headers_kb": policy.max_request_headers_kb,
        "request_headers_timeout": f"{policy.request_headers_timeout_seconds}s",
        "request_timeout": f"{policy.request_timeout_seconds}s",
        "stream_idle_timeout": f"{policy.stream_idle_timeout_seconds}s",
        "local_reply_config": local_reply_config(),
    }


def trusted_client_address(topology: Topology) -> Config:
    """The edge takes the client address from X-Forwarded-For only when the request
    comes from the global entry's host (which appends the address it saw).

    On this one machine that host is loopback, shared with local clients; in
    production it is the global load balancers' addresses alone.
    """
    return {
        "original_ip_detection_extensions": [
            {
                "name": "envoy.http.original_ip_detection.xff",
                "typed_config": {
                    "@type": EXT + "http.original_ip_detection.xff.v3.XffConfig",
                    "xff_trusted_cidrs": {
                        "cidrs": [{"address_prefix": topology.host, "prefix_len": 32}]
                    },
                },
            }
        ]
    }
