"""A pgbench script of the transfer transaction, derived from the service's own SQL.

The database ceiling of CreateTransfer is what PostgreSQL does when it runs exactly the
statements the transfer service sends, with nothing in front of it. Rather than keep a
hand-written copy of that SQL (which would drift from ``services/ledger/sql.py``), the
statements are *recorded*: one real transfer runs through the real use case
(``LedgerService.create_transfer`` over ``SqlUnitOfWork``) against the real database,
an SQLAlchemy ``before_cursor_execute`` hook keeps every statement with its parameters,
and each parameter becomes a literal of the same type:

* the two account ids: the literal ids of one account pair (one script per pair;
  pgbench picks a script at random for every transaction);
* the new transfer and entry ids and the request_id: built from pgbench random
  variables (pgbench substitutes ``:name`` inside literals too), unique per transaction;
* ``created_at``: ``now()``; bytea values (fingerprint, stored response): a literal of the
  recorded bytes, so rows have the service's size;
* the two ``UPDATE accounts SET balance_minor = <new balance>``: the service computes the
  new balance from the row it locked; pgbench cannot carry a value from a SELECT into
  the next statement for two rows, so the script says ``balance_minor - amount`` /
  ``+ amount``, the same row change.

The statements, their order, the tables, the locks (``SELECT ... FOR UPDATE`` in
account-id order) and the SERIALIZABLE isolation are the service's. Differences, all
in the service's disfavour or neutral: pgbench uses the simple query protocol with
literals (psycopg binds parameters and prepares repeated statements), the two account
UPDATEs, which psycopg pipelines into one round trip, are one compound pgbench command
(joined by ``\\;``, one round trip too), and pgbench talks to the primary directly while
the service goes through its sidecar's database proxy.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event

from meshbank.transfer.v1 import transfer_pb2
from services.common import db
from services.common.principal import ALL_SCOPES, Principal
from services.ledger import sql
from services.ledger.handlers import LedgerService, MoveMoney, RequestKey
from services.transfer.servicer import to_proto

# Three 8-digit and two 4-digit random groups, unique per transaction; decimal digits
# are hex digits, so they also spell UUIDs.
_RANDOM_GROUPS = {"ra": 8, "rb": 4, "rc": 3, "rd": 3, "re": 12}
_SETS = "\n".join(
    f"\\set {name} random({10 ** (width - 1)}, {10**width - 1})"
    for name, width in _RANDOM_GROUPS.items()
)
# Version nibble 4; the variant nibble tells the three new ids apart.
_NEW_IDS = {
    "transfer": "':ra-:rb-4:rc-8:rd-:re'",
    "debit": "':ra-:rb-4:rc-9:rd-:re'",
    "credit": "':ra-:rb-4:rc-a:rd-:re'",
}
REQUEST_ID = "'pgbench-:ra:rb:rc:rd:re'"


class ScriptError(RuntimeError):
    """The recorded transaction is not the shape this module knows how to replay."""


@dataclass(frozen=True)
class Statement:
    sql: str
    parameters: Any  # a mapping, or a list of mappings for executemany
    executemany: bool


@dataclass(frozen=True)
class Recording:
    """One transfer's statements and the values that played each role in them."""

    statements: list[Statement]
    source: uuid.UUID
    destination: uuid.UUID
    ids: Mapping[uuid.UUID, str]  # new id -> role ("transfer", "debit", "credit")
    request_id: str
    amount_minor: int


def record_transfer(
    engine: sa.Engine,
    principal: str,
    source: uuid.UUID,
    destination: uuid.UUID,
    *,
    request_id: str,
    amount_minor: int = 1,
    currency_code: str = "USD",
) -> Recording:
    """Run one real transfer through the service's use case and keep its SQL."""
    ids = {uuid.uuid4(): role for role in ("transfer", "debit", "credit")}
    new_ids = iter(ids)
    statements: list[Statement] = []

    def keep(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool
    ) -> None:
        statements.append(Statement(statement, parameters, many))

    ledger = LedgerService(sql.transaction_runner(engine), new_id=lambda: next(new_ids))
    event.listen(engine, "before_cursor_execute", keep)
    try:
        ledger.create_transfer(
            Principal(principal, ALL_SCOPES),
            MoveMoney(source, destination, amount_minor, currency_code, "pgbench"),
            RequestKey(request_id, "CreateTransfer", b"\x00" * 32),
            lambda t: transfer_pb2.CreateTransferResponse(transfer=to_proto(t)).SerializeToString(),
        )
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    return Recording(statements, source, destination, ids, request_id, amount_minor)


def _literal(value: Any, rec: Recording, pair: tuple[uuid.UUID, uuid.UUID]) -> str:
    if isinstance(value, psycopg.Binary):  # how SQLAlchemy hands psycopg a bytea value
        value = value.obj
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, uuid.UUID):
        if value == rec.source:
            return f"'{pair[0]}'"
        if value == rec.destination:
            return f"'{pair[1]}'"
        if value in rec.ids:
            return _NEW_IDS[rec.ids[value]]
        raise ScriptError(f"a UUID parameter of unknown role: {value}")
    if isinstance(value, datetime):
        return "now()"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"'\\x{bytes(value).hex()}'::bytea"
    if isinstance(value, str):
        if value == rec.request_id:
            return REQUEST_ID
        if ":" in value:
            raise ScriptError(f"a text parameter pgbench would substitute into: {value!r}")
        return "'" + value.replace("'", "''") + "'"
    raise ScriptError(f"a parameter of unsupported type {type(value).__name__}: {value!r}")


def _render(statement: Statement, rec: Recording, pair: tuple[uuid.UUID, uuid.UUID]) -> str:
    text = " ".join(statement.sql.split())
    if not statement.executemany:
        return _render_one(text, statement.parameters or {}, rec, pair)
    if text.startswith("INSERT"):
        # One multi-row INSERT for the rows psycopg pipelines in one round trip.
        head, sep, values = text.partition(" VALUES ")
        if not sep:
            raise ScriptError(f"an executemany INSERT without VALUES: {text}")
        rows = [
            values % {k: _literal(v, rec, pair) for k, v in p.items()} for p in statement.parameters
        ]
        return f"{head} VALUES {', '.join(rows)}"
    if text.startswith("UPDATE"):
        # psycopg pipelines the UPDATEs into one round trip; pgbench sends commands
        # joined by "\;" as one query, one round trip too.
        return " \\; ".join(_render_one(text, p, rec, pair) for p in statement.parameters)
    raise ScriptError(f"an executemany that is neither an INSERT nor an UPDATE: {text}")


def _render_one(
    text: str, params: Mapping[str, Any], rec: Recording, pair: tuple[uuid.UUID, uuid.UUID]
) -> str:
    if text.startswith("UPDATE accounts SET balance_minor="):
        # Which account this UPDATE writes: debit the source, credit the destination.
        account = next(v for v in params.values() if v in (rec.source, rec.destination))
        sign = "-" if account == rec.source else "+"
        literals = {k: _literal(v, rec, pair) for k, v in params.items()}
        literals["balance_minor"] = f"balance_minor {sign} {rec.amount_minor}"
        return text % literals
    return text % {k: _literal(v, rec, pair) for k, v in params.items()}


def scripts(rec: Recording, pairs: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> list[str]:
    """One pgbench script per account pair: the recorded transaction with literals."""
    kinds = [" ".join(s.sql.split()).split(" ")[0] for s in rec.statements]
    if "INSERT" not in kinds or "UPDATE" not in kinds:
        raise ScriptError(f"the recorded transaction is not a transfer: {kinds}")
    out = []
    for pair in pairs:
        body = ";\n".join(_render(s, rec, pair) for s in rec.statements)
        out.append(
            f"-- The transfer transaction of services/ledger (recorded {datetime.now(UTC):%F}).\n"
            f"{_SETS}\nBEGIN ISOLATION LEVEL SERIALIZABLE;\n{body};\nCOMMIT;\n"
        )
    return out


def engine_for(url: str) -> sa.Engine:
    """The service's engine settings (SERIALIZABLE, the notices hook), small pool."""
    return db.make_engine(url, pool_size=1, application_name="meshbank-bench-record")
