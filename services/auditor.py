"""The ledger auditor: checks the ledger's invariants periodically and exports the result.

``python -m services.auditor`` runs the loop (the supervisor runs one per deployment)
and serves the results on ``/metrics`` for Prometheus, where the alert
``LedgerInvariantBroken`` watches them; ``--once`` checks once, prints the report and
exits 1 if an invariant is broken (for an operator, or a cron job elsewhere).

Configuration, from the environment (checked at start, every problem at once):

    MESHBANK_DATABASE_URL            the ledger database; a libpq multi-host URL with
                                     target_session_attrs=prefer-standby keeps the scan
                                     off the primary and follows failovers
    MESHBANK_METRICS_ADDRESS         host:port of /metrics (not needed with --once)
    MESHBANK_AUDIT_INTERVAL_SECONDS  seconds between checks (default 30)

The invariant series appear only once a check has completed: before that, a 0 would
read as "broken" and a 1 would be a claim nobody checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from services.common import db
from services.common.config import ConfigError
from services.common.metrics import serve_registry
from services.ledger import invariants

log = logging.getLogger("meshbank.auditor")


@dataclass(frozen=True)
class AuditorConfig:
    database_url: str
    metrics_address: str | None
    interval_seconds: float


def load_config(env: Mapping[str, str], *, needs_metrics: bool) -> AuditorConfig:
    problems = []
    url = env.get("MESHBANK_DATABASE_URL", "")
    if not url.startswith(("postgresql+psycopg://", "cockroachdb+psycopg://")):
        problems.append(
            "MESHBANK_DATABASE_URL must be set to a postgresql+psycopg:// or "
            "cockroachdb+psycopg:// URL"
        )
    address = env.get("MESHBANK_METRICS_ADDRESS") or None
    if address is None and needs_metrics:
        problems.append("MESHBANK_METRICS_ADDRESS is not set (host:port to serve /metrics on)")
    elif address is not None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            problems.append(f"MESHBANK_METRICS_ADDRESS={address!r} must be host:port")
    raw = env.get("MESHBANK_AUDIT_INTERVAL_SECONDS", "30")
    try:
        interval = float(raw)
    except ValueError:
        interval = 0.0
    if not 1 <= interval <= 3600:
        problems.append(f"MESHBANK_AUDIT_INTERVAL_SECONDS={raw!r} must be 1 to 3600 seconds")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return AuditorConfig(url, address, interval)


class AuditCollector(Collector):
    """Exports the last completed check (nothing before the first one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report: invariants.InvariantReport | None = None
        self._finished_at = 0.0
        self._duration = 0.0

    def record(self, report: invariants.InvariantReport, finished_at: float, took: float) -> None:
        with self._lock:
            self._report, self._finished_at, self._duration = report, finished_at, took

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            report, finished_at, duration = self._report, self._finished_at, self._duration
        if report is None:
            return
        yield GaugeMetricFamily(
            "meshbank_ledger_invariant_ok",
            "1 if every ledger invariant held at the last check, 0 if one is broken.",
            value=1 if report.ok else 0,
        )
        violations = GaugeMetricFamily(
            "meshbank_ledger_invariant_violations",
            "Rows breaking each ledger invariant at the last check.",
            labels=["invariant"],
        )
        for name in invariants.INVARIANTS:
            violations.add_metric(
                [name], report.violations.get(name, invariants.Violations()).count
            )
        yield violations
        sums = GaugeMetricFamily(
            "meshbank_ledger_entry_sum_minor",
            "Sum of all ledger entries per currency, in minor units (must be 0).",
            labels=["currency"],
        )
        entries = GaugeMetricFamily(
            "meshbank_ledger_entries", "Ledger entries per currency.", labels=["currency"]
        )
        for c in report.currencies:
            sums.add_metric([c.currency], c.entry_sum_minor)
            entries.add_metric([c.currency], c.entries)
        yield sums
        yield entries
        yield GaugeMetricFamily(
            "meshbank_ledger_check_last_success_timestamp_seconds",
            "When the last check completed (Unix time).",
            value=finished_at,
        )
        yield GaugeMetricFamily(
            "meshbank_ledger_check_duration_seconds",
            "How long the last completed check took.",
            value=duration,
        )


# The scan reads one consistent snapshot; a standby serves REPEATABLE READ.
ISOLATION = "REPEATABLE READ"
# A check that cannot reach the database gives up quickly and tries at the next tick.
AUDIT_POLICY = db.RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.5)


class Auditor:
    def __init__(self, engine: Engine, registry: CollectorRegistry) -> None:
        self._engine = engine
        self.collector = AuditCollector()
        registry.register(self.collector)
        self.failures = Counter(
            "meshbank_ledger_check_failures",
            "Checks that could not run (database unreachable, ...).",
            registry=registry,
        )

    def check_once(self) -> invariants.InvariantReport:
        start = time.monotonic()
        report = db.run_transaction(
            self._engine, invariants.check, policy=AUDIT_POLICY, readonly=True
        )
        self.collector.record(report, time.time(), time.monotonic() - start)
        (log.info if report.ok else log.error)("%s", report.summary())
        return report

    def run(self, interval: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.check_once()
            except Exception:
                self.failures.inc()
                log.exception("the ledger check could not run; retrying in %.0f s", interval)
            stop.wait(interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.auditor", description=__doc__)
    parser.add_argument("--once", action="store_true", help="check once, print, exit 1 if broken")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MESHBANK_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(os.environ, needs_metrics=not args.once)
    except ConfigError as exc:
        print(f"auditor: {exc}", file=sys.stderr)
        return 2
    engine = db.make_engine(
        config.database_url,
        pool_size=1,
        application_name="meshbank-auditor",
        isolation_level=ISOLATION,
    )
    registry = CollectorRegistry()
    auditor = Auditor(engine, registry)
    try:
        if args.once:
            report = auditor.check_once()
            print(report.summary())
            return 0 if report.ok else 1
        assert config.metrics_address is not None
        server = serve_registry(registry, config.metrics_address)
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info(
            "serving /metrics on port %d, checking every %.0f s",
            server.port,
            config.interval_seconds,
        )
        try:
            auditor.run(config.interval_seconds, stop)
        finally:
            server.stop()
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
