"""The benchmark's pgbench script is the service's transfer transaction, and it works.

It is recorded from one real transfer through the real use case on the real database,
then run by the real pgbench: each pgbench transaction must post exactly one transfer
the way the service does (two entries, both balances moved, the idempotency row).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench import pgbench_script, run
from regions import drills
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def _count(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def test_the_recorded_transaction_replays_under_pgbench(
    stack: Stack, engine: Engine, database_url: str, tmp_path: Path
) -> None:
    if not run.PGBENCH.exists():
        pytest.skip(f"{run.PGBENCH} is not installed")
    caller, _, _ = stack.partner()
    accounts = [stack.open(caller) for _ in range(3)]
    for account in accounts:
        stack.fund(account, 1_000)
    pairs = [(uuid.UUID(a), uuid.UUID(b)) for a, b in run.Pool(accounts).pairs]

    recording = pgbench_script.record_transfer(
        engine, caller.name, pairs[0][0], pairs[0][1], request_id=stack.unique("recorded-")
    )
    texts = [" ".join(s.sql.split()) for s in recording.statements]
    # The service's transaction, one round trip each: the locks, the transfer with its
    # entries, the two balances (one pipelined executemany), the stored reply.
    assert len(texts) == 4, texts
    assert texts[0].startswith("SELECT")
    assert texts[0].endswith("FOR UPDATE")
    assert texts[1].startswith("WITH new_transfer AS (INSERT INTO transfers")
    assert " INSERT INTO ledger_entries " in texts[1]
    assert texts[2].startswith("UPDATE accounts")
    assert recording.statements[2].executemany
    assert len(recording.statements[2].parameters) == 2
    assert texts[3].startswith("INSERT INTO idempotency_keys")

    scripts = pgbench_script.scripts(recording, pairs)
    assert len(scripts) == 3
    assert str(pairs[1][0]) in scripts[1]
    assert "BEGIN ISOLATION LEVEL SERIALIZABLE;" in scripts[0]
    assert scripts[0].count(" \\; ") == 1  # the two UPDATEs, one compound command
    files = []
    for n, text in enumerate(scripts):
        (tmp_path / f"s{n}.sql").write_text(text)
        files += ["-f", str(tmp_path / f"s{n}.sql")]
    before = _count(engine, "SELECT count(*) FROM transfers WHERE initiated_by = :p", p=caller.name)
    done = subprocess.run(
        [
            str(run.PGBENCH),
            "--no-vacuum",
            "--protocol=simple",
            "--client=2",
            "--transactions=15",
            f"--max-tries={run.PGBENCH_MAX_TRIES}",
            *files,
            run.libpq_url(database_url),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    after = _count(engine, "SELECT count(*) FROM transfers WHERE initiated_by = :p", p=caller.name)
    # A transaction that lost its serialization race twelve times is reported failed (and
    # rolled back, writing nothing); every one pgbench counts as processed wrote one transfer.
    counted = re.search(r"actually processed: (\d+)/30", done.stdout)
    assert counted, done.stdout
    processed = int(counted.group(1))
    assert processed >= 25, done.stdout
    assert after - before == processed
    keys = _count(
        engine,
        "SELECT count(*) FROM idempotency_keys "
        "WHERE principal = :p AND request_id LIKE 'pgbench-%'",
        p=caller.name,
    )
    assert keys == processed
    # Money only moved around the ring: the three balances still sum to what was funded.
    total = _count(
        engine,
        "SELECT sum(balance_minor) FROM accounts WHERE account_id = ANY(CAST(:ids AS uuid[]))",
        ids=accounts,
    )
    assert total == 3_000
    assert drills.ledger_violations(database_url) == []
