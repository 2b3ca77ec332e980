"""SQLAlchemy Core implementation of the auth ports, and the key loader for verifiers.

Every unit of work runs through ``services.common.db.run_transaction`` (SERIALIZABLE,
whole-transaction retries), so these repositories only translate rows <-> dataclasses.
Unique violations become ``AlreadyExists``: under SERIALIZABLE two concurrent inserts of
one username may surface as 23505 rather than as a retryable 40001.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import Connection, Engine

from services.auth.keys import public_key_from_jwk
from services.auth.ports import (
    Partner,
    RefreshToken,
    StoredSigningKey,
    User,
)
from services.common import errors
from services.common.db import (
    DEFAULT_POLICY,
    RetryObserver,
    RetryPolicy,
    UnitOfWorkRunner,
    run_transaction,
)
from services.common.schema import partners, refresh_tokens, signing_keys, users

log = logging.getLogger(__name__)


UNIQUE_VIOLATION = "23505"


def _is_unique_violation(exc: sa.exc.IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION


class SqlUserRepository:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get_by_username(self, username: str) -> User | None:
        row = self._conn.execute(sa.select(users).where(users.c.username == username)).one_or_none()
        if row is None:
            return None
        return User(row.user_id, row.username, row.password_hash, row.created_at)

    def add(self, user: User) -> None:
        try:
            self._conn.execute(
                users.insert().values(
                    user_id=user.user_id,
                    username=user.username,
                    password_hash=user.password_hash,
                    created_at=user.created_at,
                )
            )
        except sa.exc.IntegrityError as exc:
            if _is_unique_violation(exc):
                raise errors.AlreadyExists(
                    f"the user {user.username!r} already exists", reason="USER_EXISTS"
                ) from exc
            raise

    def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        self._conn.execute(
            users.update().where(users.c.user_id == user_id).values(password_hash=password_hash)
        )


def _partner(row: Any) -> Partner:
    return Partner(
        partner_id=row.partner_id,
        name=row.name,
        client_id=row.client_id,
        secret_hash=bytes(row.secret_hash),
        scopes=frozenset(row.scopes),
        created_at=row.created_at,
    )


class SqlPartnerRepository:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get_by_client_id(self, client_id: str) -> Partner | None:
        row = self._conn.execute(
            sa.select(partners).where(partners.c.client_id == client_id)
        ).one_or_none()
        return None if row is None else _partner(row)

    def get_by_name(self, name: str) -> Partner | None:
        row = self._conn.execute(sa.select(partners).where(partners.c.name == name)).one_or_none()
        return None if row is None else _partner(row)

    def add(self, partner: Partner) -> None:
        try:
            self._conn.execute(
                partners.insert().values(
                    partner_id=partner.partner_id,
                    name=partner.name,
                    client_id=partner.client_id,
                    secret_hash=partner.secret_hash,
                    scopes=sorted(partner.scopes),
                    created_at=partner.created_at,
                )
            )
        except sa.exc.IntegrityError as exc:
            if _is_unique_violation(exc):
                raise errors.AlreadyExists(
                    f"the partner {partner.name!r} already exists", reason="PARTNER_EXISTS"
                ) from exc
            raise


class SqlSigningKeyRepository:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def list_active(self) -> list[StoredSigningKey]:
        rows = self._conn.execute(
            sa.select(signing_keys)
            .where(signing_keys.c.retired_at.is_(None))
            .order_by(signing_keys.c.created_at.desc(), signing_keys.c.kid.desc())
        ).all()
        return [
            StoredSigningKey(
                kid=row.kid,
                algorithm=row.algorithm,
                private_key_pem=row.private_key_pem,
                public_jwk={str(k): str(v) for k, v in row.public_jwk.items()},
                created_at=row.created_at,
                retired_at=row.retired_at,
            )
            for row in rows
        ]

    def add(self, key: StoredSigningKey) -> None:
        self._conn.execute(
            signing_keys.insert().values(
                kid=key.kid,
                algorithm=key.algorithm,
                private_key_pem=key.private_key_pem,
                public_jwk=dict(key.public_jwk),
                created_at=key.created_at,
                retired_at=key.retired_at,
            )
        )

    def retire(self, kid: str, now: datetime) -> None:
        self._conn.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == kid, signing_keys.c.retired_at.is_(None))
            .values(retired_at=now)
        )


class SqlRefreshTokenRepository:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get_by_hash(self, token_hash: bytes) -> RefreshToken | None:
        # FOR UPDATE: two refreshes of one token queue up here instead of both reading
        # "unused" and one of them failing later with a serialization error.
        row = self._conn.execute(
            sa.select(refresh_tokens)
            .where(refresh_tokens.c.token_hash == token_hash)
            .with_for_update()
        ).one_or_none()
        if row is None:
            return None
        return RefreshToken(
            token_id=row.token_id,
            token_hash=bytes(row.token_hash),
            family_id=row.family_id,
            subject=row.subject,
            scopes=frozenset(row.scopes),
            created_at=row.created_at,
            expires_at=row.expires_at,
            used_at=row.used_at,
            revoked_at=row.revoked_at,
        )

    def add(self, token: RefreshToken) -> None:
        self._conn.execute(
            refresh_tokens.insert().values(
                token_id=token.token_id,
                token_hash=token.token_hash,
                family_id=token.family_id,
                subject=token.subject,
                scopes=sorted(token.scopes),
                created_at=token.created_at,
                expires_at=token.expires_at,
                used_at=token.used_at,
                revoked_at=token.revoked_at,
            )
        )

    def mark_used(self, token_id: uuid.UUID, now: datetime) -> bool:
        result = self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.token_id == token_id, refresh_tokens.c.used_at.is_(None))
            .values(used_at=now)
        )
        return result.rowcount == 1

    def revoke_family(self, family_id: uuid.UUID, now: datetime) -> int:
        result = self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return result.rowcount


class SqlAuthUnitOfWork:
    """The auth repositories over one connection inside one transaction."""

    def __init__(self, conn: Connection) -> None:
        self._users = SqlUserRepository(conn)
        self._partners = SqlPartnerRepository(conn)
        self._signing_keys = SqlSigningKeyRepository(conn)
        self._refresh_tokens = SqlRefreshTokenRepository(conn)

    @property
    def users(self) -> SqlUserRepository:
        return self._users

    @property
    def partners(self) -> SqlPartnerRepository:
        return self._partners

    @property
    def signing_keys(self) -> SqlSigningKeyRepository:
        return self._signing_keys

    @property
    def refresh_tokens(self) -> SqlRefreshTokenRepository:
        return self._refresh_tokens


def transaction_runner(
    engine: Engine,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    on_retry: RetryObserver | None = None,
) -> UnitOfWorkRunner[SqlAuthUnitOfWork]:
    """The auth service's TransactionRunner: its unit of work over the retry helper."""
    return UnitOfWorkRunner(engine, SqlAuthUnitOfWork, policy=policy, on_retry=on_retry)


KEY_LOAD_POLICY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)


def load_public_keys(engine: Engine) -> dict[str, Ed25519PublicKey]:
    """Every non-retired public key by kid, for ``tokens.CachingKeySource``.

    Reads only the public JWKs, so verifying services never need the key passphrase.
    A malformed row is skipped (and logged) rather than breaking every verification.
    """

    def work(conn: Connection) -> list[tuple[str, Any]]:
        rows = conn.execute(
            sa.select(signing_keys.c.kid, signing_keys.c.public_jwk).where(
                signing_keys.c.retired_at.is_(None)
            )
        ).all()
        return [(row.kid, row.public_jwk) for row in rows]

    keys: dict[str, Ed25519PublicKey] = {}
    # Few retries: a caller that already has keys keeps using them if this fails, and
    # one that has none gets UNAVAILABLE quickly instead of waiting out a failover.
    for kid, jwk in run_transaction(engine, work, readonly=True, policy=KEY_LOAD_POLICY):
        try:
            if not isinstance(jwk, dict) or jwk.get("kid") != kid:
                raise ValueError("the JWK's kid does not match the row")
            keys[kid] = public_key_from_jwk(jwk)
        except ValueError as exc:
            log.warning("skipping signing key %r: %s", kid, exc)
    return keys
