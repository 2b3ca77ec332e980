"""The transfer transaction's statements are compiled once, not on every call."""

from __future__ import annotations

from services.ledger import sql


def test_the_core_statements_have_a_cache_key() -> None:
    # SQLAlchemy compiles a statement without a cache key on every execution.
    for statement in (sql._LOCK_ACCOUNTS, sql._SAVE_ACCOUNT):
        assert statement._generate_cache_key() is not None


def test_the_uncacheable_inserts_are_compiled_for_psycopg() -> None:
    assert sql._INSERT_TRANSFER.sql.startswith("WITH new_transfer AS")
    assert sql._INSERT_TRANSFER.sql.count("%(e1_entry_id)s") == 1  # both entries' rows
    assert "ON CONFLICT (principal, request_id) DO NOTHING" in sql._ADD_KEY.sql
    assert "RETURNING idempotency_keys.request_id" in sql._ADD_KEY.sql
