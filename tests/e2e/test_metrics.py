"""Metrics end to end: `meshbank up` runs Prometheus, which scrapes every process; a
transfer shows in the transfer service's counters through Prometheus' query API; the
alert rules are loaded; the ledger auditor reports the invariants hold."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from typing import Any

import pytest

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from tests.e2e.conftest import Deployment

# Bounded polls: Prometheus scrapes every 10 s, the auditor checks every 15 s; on a
# loaded shared machine a scrape can take seconds.
DEADLINE_S = 180
# Bringing 48 processes up on a loaded 2-core machine can take minutes of its own.
pytestmark = pytest.mark.timeout(900)


NOT_SCRAPED = {"tracing"}


def api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    url = f"{base}/api/v1/{path}{query}"
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - loopback http
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


def value(base: str, promql: str) -> float | None:
    result = api(base, "query", query=promql)["result"]
    return float(result[0]["value"][1]) if result else None


def poll(what: str, probe: Any, deadline_s: float = DEADLINE_S) -> Any:
    """Call ``probe`` until it returns something truthy (bounded); returns that."""
    deadline = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last and last[0]:
            return last
        time.sleep(2)
    raise AssertionError(f"{what} within {deadline_s}s; last: {last}")


def test_prometheus_scrapes_every_process_and_sees_a_transfer(deployment: Deployment) -> None:
    status = deployment.status()
    base = status["endpoints"]["prometheus"]
    assert base.startswith("http://127.0.0.1:")
    assert base in deployment.up_output  # `up` prints the URL

    # One target per process of `meshbank status` (plus Prometheus itself), all up;
    # but the tracing UI: Phoenix serves its metrics only on a fixed port (9090) that
    # parallel deployments would share, so it is not scraped (its /healthz is checked
    # by the supervisor, like every process).
    processes = {p["name"]: p for p in status["processes"] if p["role"] not in NOT_SCRAPED}

    # Every target must answer a scrape. They are collected across polls: on a loaded
    # machine one slow scrape (timeout) at any moment is likely among 48 targets, and
    # what is tested is that each endpoint exists, is labelled right and is scrapable.
    seen_up: set[str] = set()

    def targets_up() -> tuple[bool, Any]:
        active = api(base, "targets", state="active")["activeTargets"]
        by_instance = {t["labels"]["instance"]: t for t in active}
        seen_up.update(i for i, t in by_instance.items() if t["health"] == "up")
        missing = sorted(set(processes) - set(by_instance))
        never_up = {i: t["lastError"] for i, t in by_instance.items() if i not in seen_up}
        return not never_up and not missing, {"never up": never_up, "missing": missing}

    poll("every target scraped successfully", targets_up)
    active = api(base, "targets", state="active")["activeTargets"]
    roles = Counter(t["labels"]["role"] for t in active)
    assert roles == Counter(p["role"] for p in processes.values())
    for t in active:
        labels = t["labels"]
        process = processes.get(labels["instance"])
        if process is not None:
            assert labels["region"] == process["region"]
            assert labels["service"] == process["service"]
            assert labels["role"] == process["role"]
        if labels["role"] in ("service", "sidecar"):
            assert labels["zone"].startswith(labels["region"])

    # The rules are loaded, and evaluate cleanly.
    groups = api(base, "rules")["groups"]
    alerts = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert {"RegionDown", "LedgerInvariantBroken", "ErrorBudgetBurnFast"} <= set(alerts)
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups

    # One transfer through the global entry, in a currency nothing else used so far.
    entry = status["endpoints"]["global_grpc"]
    token = deployment.token()
    md = (("authorization", f"Bearer {token}"),)
    secret = deployment.secrets
    with deployment.channel(entry) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        before = accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id=secret["demo_checking"]),
            metadata=md,
            timeout=10,
        ).account
        transfer_pb2_grpc.TransferServiceStub(channel).CreateTransfer(
            transfer_pb2.CreateTransferRequest(
                request_id=f"e2e-metrics-{uuid.uuid4()}",
                source_account_id=secret["demo_checking"],
                destination_account_id=secret["demo_savings"],
                amount_minor=1234,
                currency_code=before.currency_code,
            ),
            metadata=md,
            timeout=20,
        )
    currency = before.currency_code

    def committed() -> tuple[bool, Any]:
        amount = value(
            base,
            f'sum(meshbank_transfer_amount_minor_total{{role="service",currency="{currency}"}})',
        )
        count = value(base, "sum(meshbank_transfers_committed_total)")
        handled = value(
            base,
            'sum(grpc_server_handled_total{service="transfer",grpc_method="CreateTransfer",'
            'grpc_code="OK"})',
        )
        return bool(amount and amount >= 1234 and count and handled), (
            amount,
            count,
            handled,
        )

    poll("the transfer in the transfer service's metrics", committed)

    # The sidecars' Envoy stats are there too (the RED view from the mesh).
    assert value(base, 'count(envoy_server_live{role="sidecar"})') == len(
        [p for p in processes.values() if p["role"] == "sidecar"]
    )
    # Patroni: exactly one primary, and a synchronous standby.
    assert value(base, "sum(patroni_primary)") == 1
    assert value(base, "sum(patroni_sync_standby)") == 1

    # The auditor's check covers the new transfer's entries and finds the ledger whole.
    def audited() -> tuple[bool, Any]:
        ok = value(base, "meshbank_ledger_invariant_ok")
        entries = value(base, f'meshbank_ledger_entries{{currency="{currency}"}}')
        return ok == 1 and entries is not None and entries >= 4, (ok, entries)

    poll("the ledger invariant check reporting OK", audited)
    assert value(base, "sum(meshbank_ledger_invariant_violations)") == 0
    assert value(base, f'meshbank_ledger_entry_sum_minor{{currency="{currency}"}}') == 0
    assert alerts["LedgerInvariantBroken"]["state"] == "inactive"
