"""The ledger's invariants, checked on the stored data (the auditor's SQL).

The database already refuses an unbalanced transfer (a deferred constraint trigger)
and any UPDATE or DELETE of entries. This check is the independent second line: it
proves from the data itself, in one snapshot, that

* the entries of every currency sum to zero (double entry: money is only moved);
* every account's stored ``balance_minor`` equals the sum of its entries (the
  materialised balance never drifts from the journal);
* every transfer has exactly two entries, summing to zero, in the transfer's currency:
  the debit of its amount on its source and the credit on its destination;
* every entry is in its account's currency.

It catches what the guards cannot: a trigger disabled or dropped, rows written by
hand, a bug that updates a balance without an entry, a restore from a bad backup, a
replica that diverged. It scans every entry, which is fine at this scale; a large
ledger would check incrementally (per day partition) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# How many offending ids a report keeps, for the log line an operator starts from.
EXAMPLES = 5

CURRENCY_SUMS = sa.text(
    """
    SELECT c.code AS currency, coalesce(sum(e.amount_minor), 0) AS total, count(e.entry_id) AS n
    FROM currencies c LEFT JOIN ledger_entries e ON e.currency_code = c.code
    GROUP BY c.code
    ORDER BY c.code
    """
)
MISMATCHED_BALANCES = sa.text(
    """
    SELECT a.account_id AS id, count(*) OVER () AS n
    FROM accounts a
    LEFT JOIN (
      SELECT account_id, sum(amount_minor) AS total FROM ledger_entries GROUP BY account_id
    ) e ON e.account_id = a.account_id
    WHERE a.balance_minor <> coalesce(e.total, 0)
    ORDER BY a.account_id
    LIMIT :examples
    """
)
UNBALANCED_TRANSFERS = sa.text(
    """
    SELECT t.transfer_id AS id, count(*) OVER () AS n
    FROM transfers t LEFT JOIN ledger_entries e ON e.transfer_id = t.transfer_id
    GROUP BY t.transfer_id, t.currency_code, t.source_account_id, t.destination_account_id,
      t.amount_minor
    HAVING count(e.entry_id) <> 2
        OR coalesce(sum(e.amount_minor), 0) <> 0
        OR coalesce(bool_or(e.currency_code <> t.currency_code), false)
        OR NOT coalesce(bool_or(e.account_id = t.source_account_id
                                AND e.amount_minor = -t.amount_minor), false)
        OR NOT coalesce(bool_or(e.account_id = t.destination_account_id
                                AND e.amount_minor = t.amount_minor), false)
    ORDER BY t.transfer_id
    LIMIT :examples
    """
)
FOREIGN_CURRENCY_ENTRIES = sa.text(
    """
    SELECT e.entry_id AS id, count(*) OVER () AS n
    FROM ledger_entries e JOIN accounts a ON a.account_id = e.account_id
    WHERE e.currency_code <> a.currency_code
    ORDER BY e.entry_id
    LIMIT :examples
    """
)

# The invariant label values of the auditor's violation gauge, in report order.
INVARIANTS = ("currency_sum", "account_balance", "transfer_balance", "entry_currency")


@dataclass(frozen=True)
class Violations:
    """How many rows break one invariant, and the first few of them."""

    count: int = 0
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class CurrencyTotal:
    currency: str
    entry_sum_minor: int
    entries: int


@dataclass(frozen=True)
class InvariantReport:
    currencies: tuple[CurrencyTotal, ...]
    violations: dict[str, Violations] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v.count == 0 for v in self.violations.values())

    def summary(self) -> str:
        if self.ok:
            entries = sum(c.entries for c in self.currencies)
            return f"ledger invariants hold ({entries} entries, {len(self.currencies)} currencies)"
        broken = [
            f"{name}: {v.count} (e.g. {', '.join(v.examples)})"
            for name, v in self.violations.items()
            if v.count
        ]
        return "LEDGER INVARIANTS BROKEN: " + "; ".join(broken)


def _violations(conn: Connection, query: sa.TextClause) -> Violations:
    rows = conn.execute(query, {"examples": EXAMPLES}).all()
    if not rows:
        return Violations()
    return Violations(int(rows[0].n), tuple(str(r.id) for r in rows))


def check(conn: Connection) -> InvariantReport:
    """Check every invariant; run inside one read-only snapshot (REPEATABLE READ or
    stronger) so that a transfer committing meanwhile is seen whole or not at all."""
    currencies = tuple(
        CurrencyTotal(str(r.currency), int(r.total), int(r.n)) for r in conn.execute(CURRENCY_SUMS)
    )
    unbalanced = [c for c in currencies if c.entry_sum_minor != 0]
    return InvariantReport(
        currencies,
        {
            "currency_sum": Violations(len(unbalanced), tuple(c.currency for c in unbalanced)),
            "account_balance": _violations(conn, MISMATCHED_BALANCES),
            "transfer_balance": _violations(conn, UNBALANCED_TRANSFERS),
            "entry_currency": _violations(conn, FOREIGN_CURRENCY_ENTRIES),
        },
    )
