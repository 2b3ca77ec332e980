"""What the auth use cases need from storage, as protocols.

``services.auth.sql`` implements them on SQLAlchemy Core; the unit tests implement them
in memory. A ``TransactionRunner`` runs a unit of work atomically (the SQL one re-runs
it whole on retryable database errors), so work functions must be safe to run twice and
must not raise a domain error after a write they want kept: an exception rolls the
transaction back.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class User:
    user_id: uuid.UUID
    username: str
    password_hash: str
    created_at: datetime


@dataclass(frozen=True)
class Partner:
    partner_id: uuid.UUID
    name: str
    client_id: str
    # SHA-256 of the client secret; the secret itself is never stored.
    secret_hash: bytes
    scopes: frozenset[str]
    created_at: datetime


@dataclass(frozen=True)
class StoredSigningKey:
    kid: str
    algorithm: str
    # PKCS#8 PEM encrypted with the deployment's passphrase.
    private_key_pem: str
    public_jwk: Mapping[str, str]
    created_at: datetime
    retired_at: datetime | None = None

    def __repr__(self) -> str:
        # The PEM is encrypted, but it has no business in logs either.
        return f"StoredSigningKey(kid={self.kid!r}, created_at={self.created_at!r})"


@dataclass(frozen=True)
class RefreshToken:
    token_id: uuid.UUID
    # SHA-256 of the opaque token; the token itself is only ever in the client's hands.
    token_hash: bytes
    # Every token rotated from one login shares the family id; reuse revokes them all.
    family_id: uuid.UUID
    subject: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    revoked_at: datetime | None = None


class UserRepository(Protocol):
    def get_by_username(self, username: str) -> User | None: ...

    def add(self, user: User) -> None:
        """Insert; raises ``errors.AlreadyExists`` (USER_EXISTS) on a duplicate username."""
        ...

    def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None: ...


class PartnerRepository(Protocol):
    def get_by_client_id(self, client_id: str) -> Partner | None: ...

    def get_by_name(self, name: str) -> Partner | None: ...

    def add(self, partner: Partner) -> None:
        """Insert; raises ``errors.AlreadyExists`` (PARTNER_EXISTS) on a duplicate name."""
        ...


class SigningKeyRepository(Protocol):
    def list_active(self) -> list[StoredSigningKey]:
        """Keys not retired, newest first: the first one signs, all of them verify."""
        ...

    def add(self, key: StoredSigningKey) -> None: ...

    def retire(self, kid: str, now: datetime) -> None: ...


class RefreshTokenRepository(Protocol):
    def get_by_hash(self, token_hash: bytes) -> RefreshToken | None:
        """The token with this hash, locked for update until the transaction ends."""
        ...

    def add(self, token: RefreshToken) -> None: ...

    def mark_used(self, token_id: uuid.UUID, now: datetime) -> bool:
        """Set used_at if it is still unset; False when another transaction used it first."""
        ...

    def revoke_family(self, family_id: uuid.UUID, now: datetime) -> int:
        """Set revoked_at on every not yet revoked token of the family; return how many."""
        ...


class AuthUnitOfWork(Protocol):
    @property
    def users(self) -> UserRepository: ...

    @property
    def partners(self) -> PartnerRepository: ...

    @property
    def signing_keys(self) -> SigningKeyRepository: ...

    @property
    def refresh_tokens(self) -> RefreshTokenRepository: ...


class TransactionRunner(Protocol):
    def __call__(self, work: Callable[[AuthUnitOfWork], T], *, readonly: bool = False) -> T: ...
