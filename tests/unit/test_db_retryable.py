"""Which database errors re-run the whole transaction (services/common/db.py)."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa

from services.common import db


def _wrapped(orig: Exception) -> BaseException:
    """The exception SQLAlchemy raises for ``orig`` from the driver."""
    return sa.exc.DBAPIError.instance("COMMIT", {}, orig, psycopg.Error)


def test_serializable_on_a_hot_standby_is_retried() -> None:
    # What a write gets when it reaches a just-demoted leader (region-partition drill).
    orig = psycopg.errors.FeatureNotSupported("cannot use serializable mode in a hot standby")
    assert db.is_retryable(_wrapped(orig))


def test_other_unsupported_features_are_not_retried() -> None:
    orig = psycopg.errors.FeatureNotSupported("cannot use COPY here")
    assert not db.is_retryable(_wrapped(orig))


def test_read_only_standby_is_retried() -> None:
    orig = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
    assert db.is_retryable(_wrapped(orig))
