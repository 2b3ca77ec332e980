"""The ledger benchmark: the database ceiling of a transfer, and what the service and the
mesh keep of it. One command against a running replicated deployment:

    .venv/bin/python -m bench.run [--duration 5] [--concurrency 8] [--accounts 128] [--json]

Phases, each ``--concurrency`` clients for ``--duration`` seconds:

1. ``db-ceiling``: pgbench on the database primary running the transfer service's own
   transaction (``bench.pgbench_script``: recorded from the real use case, one script per
   account pair), with pgbench's retries of serialization failures like the service's.
2. ``CreateTransfer direct``: gRPC straight to the region's transfer replicas (no Envoy).
3. ``CreateTransfer full``: through the global entry, the region's edge and a sidecar.
4. ``GetAccount direct`` and ``GetAccount full``: a strong balance read.

Every transfer moves 1 minor unit between a random pair of a pool of accounts (a ring:
account i pays account i+1), so concurrent transfers rarely touch the same rows; the
same pairs are used by pgbench and the gRPC phases. It prints throughput, p50 and p99
of each phase and its ratio to the database ceiling, the targets (full-mesh transfers
>= 50% of the ceiling with p99 <= 25 ms), the load average, and the CPU each group of
processes used during each phase (where the time goes). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from bench import mesh_bench, pgbench_script
from bench.mesh_bench import (
    BenchError,
    CpuProbe,
    Deployment,
    Fixture,
    _positive,
    _ratio,
    summarize,
)
from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import drills, local, public_client, workload
from regions.topology import TopologyError
from services.common.db import DEFAULT_POLICY

PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")
TARGET_MESH_SHARE = 0.5  # full-mesh transfer throughput >= this share of the DB ceiling
TARGET_MESH_P99_MS = 25.0  # ... with p99 at most this at that load
MAX_PGBENCH_SCRIPTS = 128  # pgbench's limit on -f scripts
# Each transfer moves 1 minor unit: a million per account outlasts any run, and the
# demo treasury (overdraft 10**15) funds millions of runs (10**12 had it dry after 7).
FUNDING_MINOR = 10**6
CALL_TIMEOUT = 10.0
WARMUP_S = 1.0
# The same retry budget as the service's retry helper.
PGBENCH_MAX_TRIES = DEFAULT_POLICY.max_attempts


@dataclass(frozen=True)
class Pool:
    accounts: list[str]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        n = len(self.accounts)
        return [(self.accounts[i], self.accounts[(i + 1) % n]) for i in range(n)]


SETUP_CLIENTS = 4
SETUP_RETRY_WINDOW = 60.0


def open_pool(fixture: Fixture, count: int, run_id: str) -> Pool:
    """``count`` fresh USD accounts of the demo partner, each funded from the treasury.

    Every funding transfer debits the one treasury row: concurrent ones lose SERIALIZABLE
    races to each other and re-run, so a few clients, and each account's open-and-fund
    re-sent with the same request_ids on a retryable status (safe: both calls are
    idempotent), instead of failing the bench on one slow call.
    """
    fixture.refresh_token()

    def one(n: int) -> str:
        with public_client.grpc_channel(
            fixture.deployment.global_grpc, fixture.deployment.ca_file
        ) as channel:
            md = tuple(fixture.metadata)
            treasury = fixture.deployment.secrets["demo_treasury"]
            return workload.call_retrying(
                lambda: drills.open_funded_account(
                    channel, md, md, treasury, f"bench-{run_id}", n, FUNDING_MINOR, CALL_TIMEOUT
                ),
                window=SETUP_RETRY_WINDOW,
            )

    with concurrent.futures.ThreadPoolExecutor(SETUP_CLIENTS) as pool:
        return Pool(list(pool.map(one, range(count))))


# -- the database ceiling ------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL of the primary as a libpq URI (what pgbench takes)."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pgbench_latencies(log_dir: Path) -> tuple[list[float], int]:
    """Latencies (s) of the committed transactions in pgbench's -l logs, and the failures.

    A log line: client_id transaction_no time script_no time_epoch time_us [retries];
    ``time`` is the latency in microseconds (retries included) or ``failed``.
    """
    latencies: list[float] = []
    failed = 0
    for path in log_dir.glob("pgb.*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            if fields[2].isdigit():
                latencies.append(int(fields[2]) / 1e6)
            else:
                failed += 1
    return latencies, failed


def db_ceiling(
    deployment: Deployment,
    pool: Pool,
    duration: float,
    concurrency: int,
    run_id: str,
) -> dict[str, Any]:
    if not PGBENCH.exists():
        raise BenchError(f"{PGBENCH} is missing: install Debian's postgresql-15 (bootstrap does)")
    url = local.primary_url(deployment.state, deployment.topology)
    engine = pgbench_script.engine_for(url)
    try:
        source, destination = (uuid.UUID(a) for a in pool.pairs[0])
        recording = pgbench_script.record_transfer(
            engine,
            f"partners/{deployment.secrets['demo_client_id']}",
            source,
            destination,
            request_id=f"bench-{run_id}-recorded",
        )
    finally:
        engine.dispose()
    pairs = [(uuid.UUID(a), uuid.UUID(b)) for a, b in pool.pairs[:MAX_PGBENCH_SCRIPTS]]
    scripts = pgbench_script.scripts(recording, pairs)
    work = Path(tempfile.mkdtemp(prefix="meshbank-pgbench-"))
    try:
        files = []
        for n, text in enumerate(scripts):
            path = work / f"transfer-{n:03}.sql"
            path.write_text(text)
            files += ["-f", f"{path}@1"]
        logs = work / "logs"
        logs.mkdir()
        argv = [
            str(PGBENCH),
            "--no-vacuum",
            "--protocol=simple",
            f"--client={concurrency}",
            f"--jobs={min(concurrency, os.cpu_count() or 1)}",
            f"--time={max(1, round(duration))}",
            f"--max-tries={PGBENCH_MAX_TRIES}",
            "--log",
            f"--log-prefix={logs}/pgb",
            *files,
            libpq_url(url),
        ]
        probe = _probe(deployment, "transfer")
        before = probe.snapshot()
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 120, cwd=work
        )
        after = probe.snapshot()
        if done.returncode not in (0, 2):  # 2: some transactions failed (reported below)
            raise BenchError(f"pgbench failed ({done.returncode}): {done.stderr[-2000:]}")
        latencies, failed = _pgbench_latencies(logs)
        sample = scripts[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = summarize(latencies, Counter({"failed": failed} if failed else {}))
    retried = re.search(r"number of transactions retried: (\d+)", done.stdout)
    tps = re.search(r"tps = ([0-9.]+)", done.stdout)
    cores = CpuProbe.cores(before, after)
    rate = len(latencies) / max(1, round(duration))
    result.update(
        calls_per_s=round(rate, 1),
        pgbench_tps=float(tps.group(1)) if tps else None,
        retried=int(retried.group(1)) if retried else 0,
        cpu_cores=cores,
        cpu_ms_per_call=_per_call(cores, rate),
        statements=sample.count(";\n"),
        script_sample=sample,
    )
    return result


# -- gRPC phases ----------------------------------------------------------------------------


def _probe(deployment: Deployment, service: str) -> CpuProbe:
    names = {
        "service": [i.name for i in deployment.replicas(service)],
        "sidecar": [f"{i.name}-sidecar" for i in deployment.replicas(service)],
        "edge": [f"{deployment.region}-edge"],
        "global": ["global"],
        "database": list(deployment.database),
    }
    return CpuProbe(
        {g: [deployment.pids[n] for n in ns if n in deployment.pids] for g, ns in names.items()}
    )


def _per_call(cores: dict[str, float], rate: float) -> dict[str, float | None]:
    return {
        k: round(v * 1000 / rate, 3) if rate else None
        for k, v in cores.items()
        if k not in ("machine", "other")
    }


def _targets(deployment: Deployment, service: str, path: str) -> list[str]:
    host = deployment.topology.host
    if path == "direct":
        return [f"{host}:{i.service_port}" for i in deployment.replicas(service)]
    return [deployment.global_grpc]


def grpc_phase(
    deployment: Deployment,
    fixture: Fixture,
    pool: Pool,
    op: str,
    path: str,
    duration: float,
    concurrency: int,
    run_id: str,
) -> dict[str, Any]:
    """``concurrency`` threads with their own channels, back to back for ``duration`` s."""
    fixture.refresh_token()
    service = "transfer" if op == "CreateTransfer" else "account"
    pairs = pool.pairs
    md = fixture.metadata
    # The service ports are plaintext on loopback; the global entry serves TLS only.
    credentials = None if path == "direct" else public_client.credentials(deployment.ca_file)
    channels = [
        [mesh_bench._channel(t, credentials, "") for t in _targets(deployment, service, path)]
        for _ in range(concurrency)
    ]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[Counter[str]] = [Counter() for _ in range(concurrency)]
    window: dict[str, float] = {}
    probe = _probe(deployment, service)
    shots: list[dict[str, float]] = []

    def caller(t: int) -> Callable[[], None]:
        rng = random.Random(t)  # noqa: S311 - picking account pairs, not secrets
        ids = itertools.count()
        if op == "CreateTransfer":
            stubs = itertools.cycle(
                [transfer_pb2_grpc.TransferServiceStub(c).CreateTransfer for c in channels[t]]
            )

            def transfer() -> None:
                source, destination = rng.choice(pairs)
                next(stubs)(
                    transfer_pb2.CreateTransferRequest(
                        request_id=f"bench-{run_id}-{path}-{t}-{next(ids)}",
                        source_account_id=source,
                        destination_account_id=destination,
                        amount_minor=1,
                        currency_code="USD",
                    ),
                    metadata=md,
                    timeout=CALL_TIMEOUT,
                )

            return transfer
        reads = itertools.cycle(
            [account_pb2_grpc.AccountServiceStub(c).GetAccount for c in channels[t]]
        )

        def read() -> None:
            next(reads)(
                account_pb2.GetAccountRequest(account_id=rng.choice(pool.accounts)),
                metadata=md,
                timeout=CALL_TIMEOUT,
            )

        return read

    calls = [caller(t) for t in range(concurrency)]

    def begin() -> None:
        shots.append(probe.snapshot())
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + duration

    barrier = threading.Barrier(concurrency + 1, action=begin)

    def worker(t: int) -> None:
        warm_until = time.perf_counter() + WARMUP_S
        while time.perf_counter() < warm_until:
            try:
                calls[t]()
            except grpc.RpcError as err:
                errors[t][f"warm-up {err.code().name}"] += 1
        barrier.wait()
        end = window["end"]
        while (start := time.perf_counter()) < end:
            try:
                calls[t]()
            except grpc.RpcError as err:
                if time.perf_counter() <= end:
                    errors[t][err.code().name] += 1
                continue
            done = time.perf_counter()
            if done <= end:
                latencies[t].append(done - start)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(concurrency)]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        time.sleep(max(0.0, window["end"] - time.perf_counter()))
        shots.append(probe.snapshot())
        for thread in threads:
            thread.join(CALL_TIMEOUT + 5)
    finally:
        for per_thread in channels:
            for channel in per_thread:
                channel.close()
    merged = [x for per_thread in latencies for x in per_thread]
    result = summarize(merged, sum(errors, Counter()))
    cores = CpuProbe.cores(shots[0], shots[1])
    rate = len(merged) / duration
    result.update(
        calls_per_s=round(rate, 1), cpu_cores=cores, cpu_ms_per_call=_per_call(cores, rate)
    )
    return result


# -- the report -------------------------------------------------------------------------------

PHASES: tuple[tuple[str, str, str], ...] = (
    ("db-ceiling", "", ""),
    ("CreateTransfer direct", "CreateTransfer", "direct"),
    ("CreateTransfer full", "CreateTransfer", "full"),
    ("GetAccount direct", "GetAccount", "direct"),
    ("GetAccount full", "GetAccount", "full"),
)


def run(
    duration: float, concurrency: int, accounts: int, say: Callable[[str], None]
) -> dict[str, Any]:
    deployment = mesh_bench.discover()
    run_id = uuid.uuid4().hex[:10]
    fixture = Fixture(deployment, run_id)
    started = datetime.now(UTC)
    load_start = os.getloadavg()
    say(f"opening and funding {accounts} accounts through the global entry")
    pool = open_pool(fixture, accounts, run_id)
    results: dict[str, dict[str, Any]] = {}
    for name, op, path in PHASES:
        say(f"{name}: {concurrency} clients x {duration:g} s")
        load = os.getloadavg()[0]
        if not op:
            results[name] = db_ceiling(deployment, pool, duration, concurrency, run_id)
        else:
            results[name] = grpc_phase(
                deployment, fixture, pool, op, path, duration, concurrency, run_id
            )
        results[name]["load_average_1m"] = load
    ceiling = results["db-ceiling"]
    for r in results.values():
        r["vs_db_ceiling"] = {
            "throughput": _ratio(r["calls_per_s"], ceiling["calls_per_s"]),
            "p50": _ratio(r["p50_ms"], ceiling["p50_ms"]),
            "p99": _ratio(r["p99_ms"], ceiling["p99_ms"]),
        }
    mesh = results["CreateTransfer full"]
    share = mesh["vs_db_ceiling"]["throughput"]
    return {
        "benchmark": "ledger",
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            **mesh_bench.machine(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "state_dir": str(deployment.state),
        "region": deployment.region,
        "settings": {"duration_s": duration, "concurrency": concurrency, "accounts": accounts},
        "results": results,
        "targets": {
            "mesh_transfer_share_of_db_min": TARGET_MESH_SHARE,
            "mesh_transfer_p99_ms_max": TARGET_MESH_P99_MS,
            "meets_share": share is not None and share >= TARGET_MESH_SHARE,
            "meets_p99": mesh["p99_ms"] is not None and mesh["p99_ms"] <= TARGET_MESH_P99_MS,
        },
    }


def _num(value: float | None, width: int = 8, digits: int = 2) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"ledger benchmark {report['date']}  ({m['cpus']} cores, {m['cpu_model']}; load average "
        f"{m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end)",
        f"region {report['region']}; {s['concurrency']} clients x {s['duration_s']:g} s per phase; "
        f"transfers of 1 minor unit over {s['accounts']} account pairs",
        "",
    ]
    header = (
        f"{'phase':23}{'calls/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}  "
        f"{'x tput':>7}{'x p50':>7}{'x p99':>7}  {'load':>5}   cores: "
        f"{'client':>6}{'svc':>5}{'envoy':>6}{'db':>5}{'other':>6}"
    )
    lines += [header, "-" * len(header)]
    for name, r in report["results"].items():
        ratio = r["vs_db_ceiling"]
        cpu = r["cpu_cores"]
        envoy = cpu["sidecar"] + cpu["edge"] + cpu["global"]
        lines.append(
            f"{name:23}{_num(r['calls_per_s'], 9, 1)}{_num(r['p50_ms'])}{_num(r['p99_ms'])}"
            f"{sum(r['errors'].values()):>8}  {_num(ratio['throughput'], 7)}"
            f"{_num(ratio['p50'], 7)}{_num(ratio['p99'], 7)}  {r['load_average_1m']:>5.1f}"
            f"          {cpu['client']:>6.2f}{cpu['service']:>5.2f}{envoy:>6.2f}"
            f"{cpu['database']:>5.2f}{cpu['other']:>6.2f}"
        )
    t = report["targets"]
    mesh = report["results"]["CreateTransfer full"]
    lines += [
        "",
        "x tput / x p50 / x p99: the phase's figure divided by the database ceiling's.",
        "cores: CPU used during the phase by this client, the replicas of the service under",
        "test, the Envoys on the path, the database (PostgreSQL, Patroni, etcd) and the rest of",
        "the machine (other tenants). pgbench's own CPU is in 'other' for the ceiling.",
        "",
        f"target: full-mesh CreateTransfer >= {t['mesh_transfer_share_of_db_min']:.0%} of the "
        f"database ceiling: {_num(mesh['vs_db_ceiling']['throughput'], 0)} -> "
        f"{'met' if t['meets_share'] else 'MISSED'}",
        f"target: its p99 <= {t['mesh_transfer_p99_ms_max']:g} ms at that load: "
        f"{_num(mesh['p99_ms'], 0)} ms -> {'met' if t['meets_p99'] else 'MISSED'}",
    ]
    for name, r in report["results"].items():
        if r["errors"]:
            codes = ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items()))
            lines.append(f"errors in {name}: {codes}")
    ceiling = report["results"]["db-ceiling"]
    lines.append(
        f"db-ceiling: {ceiling['statements']} statements per transaction, "
        f"{ceiling['retried']} transactions retried by pgbench (serialization failures)"
    )
    lines.append("CPU ms per call (service / envoys / database / client):")
    for name, r in report["results"].items():
        c = r["cpu_ms_per_call"]
        if c.get("database") is not None:
            envoy = c["sidecar"] + c["edge"] + c["global"]
            lines.append(
                f"  {name:23} {c['service']:5.2f} / {envoy:5.2f} / {c['database']:5.2f}"
                f" / {c['client']:5.2f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Database ceiling of the transfer transaction (pgbench) vs CreateTransfer "
        "direct and through the mesh, and GetAccount (needs `meshbank up --detach`).",
    )
    parser.add_argument("--duration", type=_positive(float), default=5.0, help="s per phase")
    parser.add_argument("--concurrency", type=_positive(int), default=8, help="clients")
    parser.add_argument(
        "--accounts",
        type=_positive(int),
        default=MAX_PGBENCH_SCRIPTS,
        help=f"accounts in the pool, 2 to {MAX_PGBENCH_SCRIPTS} (default {MAX_PGBENCH_SCRIPTS})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if not 2 <= args.accounts <= MAX_PGBENCH_SCRIPTS:
        parser.error(f"--accounts must be between 2 and {MAX_PGBENCH_SCRIPTS}")

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    try:
        report = run(args.duration, args.concurrency, args.accounts, say)
    except (BenchError, local.LocalError, TopologyError, pgbench_script.ScriptError) as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"bench.run: set-up call failed: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
