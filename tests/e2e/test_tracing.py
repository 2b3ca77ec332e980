"""One REST transfer through the global entry is one trace in the tracing UI; one that
the first hop did not sample leaves nothing anywhere.

The trace is read back from Phoenix's HTTP API (what an SRE's tooling would do), not
from an in-process exporter: global entry -> edge -> sidecar -> transfer service ->
database, all under one trace id, every parent link resolving inside the trace.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from tests.e2e.conftest import Deployment

POLL_SECONDS = 45.0


def http(
    url: str,
    body: dict[str, Any] | None = None,
    token: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    if token:
        sent["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(  # noqa: S310 - loopback URL built by the test
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers=sent,
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310
            return reply.status, _lower(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, _lower(err.headers), json.loads(err.read())


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def phoenix_spans(ui: str, **query: str) -> list[dict[str, Any]]:
    """Spans of the default project matching ``query`` (Phoenix REST API), newest first."""
    params = urllib.parse.urlencode({"limit": "1000", **query})
    status, _, body = http(f"{ui}/v1/projects/default/spans?{params}")
    assert status == 200, body
    spans: list[dict[str, Any]] = body["data"]
    return spans


def attr(span: dict[str, Any], dotted: str) -> Any:
    """An attribute by its dotted name (Phoenix nests ``a.b`` as ``{"a": {"b": ...}}``)."""
    node: Any = span.get("attributes", {})
    if dotted in node:
        return node[dotted]
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def wait_for_trace(ui: str, trace_id: str, complete: Any) -> list[dict[str, Any]]:
    """Poll (bounded) until the trace's spans satisfy ``complete``; proxies flush every
    250 ms and services every 250 ms, so this normally takes about a second."""
    deadline = time.monotonic() + POLL_SECONDS
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        spans = phoenix_spans(ui, trace_id=trace_id)
        if complete(spans):
            return spans
        time.sleep(0.5)
    names = sorted(s["name"] for s in spans)
    raise AssertionError(f"trace {trace_id} incomplete after {POLL_SECONDS}s: {names}")


def ancestors(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    chain = []
    while span["parent_id"] is not None:
        span = by_id[span["parent_id"]]
        chain.append(span)
    return chain


def test_a_rest_transfer_is_one_trace_across_every_hop(deployment: Deployment) -> None:
    endpoints = deployment.status()["endpoints"]
    ui = endpoints["tracing_ui"]
    assert ui.startswith("http://127.0.0.1:")
    assert endpoints["trace_collector"].startswith("http://127.0.0.1:")
    assert ui in deployment.up_output  # `meshbank up` prints where the UI is
    base = f"https://{endpoints['global_rest']}"
    secret = deployment.secrets
    code, _, login = http(
        f"{base}/v1/auth:login", {"username": "demo", "password": secret["demo_password"]}
    )
    assert code == 200, login
    token = login["accessToken"]
    # Head sampling (topology tracing.sample_percent) would trace this call only
    # sometimes; a client asks for its trace with x-client-trace-id (the runbook's way).
    request_id = f"trace-e2e-{uuid.uuid4().hex[:12]}"
    code, headers, created = http(
        f"{base}/v1/transfers",
        {
            "requestId": request_id,
            "sourceAccountId": secret["demo_checking"],
            "destinationAccountId": secret["demo_savings"],
            "amountMinor": "100",
            "currencyCode": "USD",
        },
        token,
        {"x-client-trace-id": request_id},
    )
    assert code == 200, created
    transfer_id = created["transfer"]["transferId"]
    trace_id = headers["x-meshbank-trace-id"]  # the trace of this very request
    assert len(trace_id) == 32
    assert headers["x-request-id"]

    def proxy(spans: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
        return [s for s in spans if attr(s, "meshbank.proxy") == role]

    def service(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            s for s in spans if attr(s, "rpc.service") == "meshbank.transfer.v1.TransferService"
        ]

    def database(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in spans if attr(s, "db.system") == "postgresql"]

    def complete(spans: list[dict[str, Any]]) -> bool:
        commits = [s for s in database(spans) if s["name"] == "COMMIT"]
        return all((proxy(spans, "global"), proxy(spans, "edge"), proxy(spans, "sidecar"), commits))

    spans = wait_for_trace(ui, trace_id, complete)
    by_id = {s["context"]["span_id"]: s for s in spans}
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}

    # Connected: one root (the global entry), every other parent inside the trace.
    roots = [s for s in spans if s["parent_id"] is None]
    assert [attr(s, "meshbank.proxy") for s in roots] == ["global"]
    dangling = [s["name"] for s in spans if s["parent_id"] and s["parent_id"] not in by_id]
    assert dangling == []

    # The hops nest in order: database inside the service, inside the sidecar,
    # inside the edge, inside the global entry.
    (server,) = [s for s in service(spans) if attr(s, "rpc.method") == "CreateTransfer"]
    above = [attr(s, "meshbank.proxy") for s in ancestors(server, by_id)]
    assert above[:1] == ["sidecar"]
    assert above.index("sidecar") < above.index("edge") < above.index("global")
    for db in database(spans):
        assert server in ancestors(db, by_id), db["name"]
    assert {s["name"] for s in database(spans)} >= {"COMMIT", "INSERT ledger_entries"}

    # Where it ran, and the ids to search by.
    assert attr(server, "meshbank.request_id") == request_id
    assert attr(server, "meshbank.transfer_id") == transfer_id
    assert attr(server, "meshbank.service") == "meshbank-transfer"
    assert attr(server, "meshbank.region") == "us-east"
    assert str(attr(server, "meshbank.instance")).startswith("us-east-transfer-")
    (edge,) = proxy(spans, "edge")
    assert attr(edge, "meshbank.region") == "us-east"
    (entry,) = proxy(spans, "global")
    # Named by the REST route's decorator (the edge sees the REST path first and is
    # routed by the transcoded gRPC path, so its name depends on Envoy's route refresh).
    assert entry["name"] == "meshbank.transfer.v1.TransferService/CreateTransfer"
    # The runbook's search: spans by the client's request_id.
    found = phoenix_spans(ui, attribute=f"meshbank.request_id:{request_id}")
    assert [s["context"]["span_id"] for s in found] == [server["context"]["span_id"]]

    # Nothing recorded anywhere carries the bearer token (nor the demo password).
    everything = phoenix_spans(ui)
    dumped = json.dumps(everything)
    assert token not in dumped
    assert secret["demo_password"] not in dumped
    # Health checks (Envoy's probes of edges and services) are not traced.
    names = {s["name"] for s in everything}
    assert not [n for n in names if "Health" in n or "healthz" in n]
    urls = {str(attr(s, "http.url")) for s in everything}
    assert not [u for u in urls if "/healthz" in u or "grpc.health" in u]


def test_a_call_the_first_hop_did_not_sample_leaves_no_span_anywhere(
    deployment: Deployment,
) -> None:
    """A caller's unsampled traceparent is honoured by every proxy and service: the
    decision of the first hop holds for the whole path (a trace is whole or absent)."""
    endpoints = deployment.status()["endpoints"]
    ui, base = endpoints["tracing_ui"], f"https://{endpoints['global_rest']}"
    secret = deployment.secrets
    token = deployment.token()
    transfer = {
        "sourceAccountId": secret["demo_checking"],
        "destinationAccountId": secret["demo_savings"],
        "amountMinor": "1",
        "currencyCode": "USD",
    }
    unsampled = uuid.uuid4().hex
    code, headers, created = http(
        f"{base}/v1/transfers",
        {**transfer, "requestId": f"unsampled-{unsampled[:12]}"},
        token,
        {"traceparent": f"00-{unsampled}-{uuid.uuid4().hex[:16]}-00"},
    )
    assert code == 200, created
    assert headers["x-meshbank-trace-id"] == unsampled
    # A forced call after it: once its trace is in the UI, every process on the path
    # has flushed what it held from before.
    forced = f"forced-{uuid.uuid4().hex[:12]}"
    code, headers, created = http(
        f"{base}/v1/transfers",
        {**transfer, "requestId": forced},
        token,
        {"x-client-trace-id": forced},
    )
    assert code == 200, created
    trace_id = headers["x-meshbank-trace-id"]

    def reached_the_database(spans: list[dict[str, Any]]) -> bool:
        return any(s["name"] == "COMMIT" for s in spans)

    wait_for_trace(ui, trace_id, reached_the_database)
    assert phoenix_spans(ui, trace_id=unsampled) == []
