"""The auth service's use cases: credentials in, tokens out; free of gRPC and SQL.

Rules that shape the code below:

* Slow or CPU-bound work (Argon2 hashing, key generation, signing) happens outside the
  database transaction, so a retried transaction does not redo it and a transaction
  does not hold locks for the length of a password hash.
* A domain error raised inside a unit of work rolls it back. Refresh-token reuse must
  *keep* the family revocation it writes, so that path returns a verdict from the
  transaction and raises only after the commit.
* Failures of authentication say nothing about which part was wrong, and take the same
  time whether or not the user exists (``Passwords.verify_dummy``).
* Secrets (passwords, client secrets, refresh tokens) are stored as hashes only and never
  appear in messages, logs or reprs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from services.auth.keys import (
    ALGORITHM,
    KeyLoadError,
    SigningKey,
    generate_signing_key,
    load_signing_key,
)
from services.auth.passwords import Passwords
from services.auth.ports import (
    AuthUnitOfWork,
    Partner,
    RefreshToken,
    StoredSigningKey,
    TransactionRunner,
    User,
)
from services.auth.tokens import TokenIssuer
from services.common import errors
from services.common.principal import ALL_SCOPES, USER_SCOPES

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
IdFactory = Callable[[], uuid.UUID]
TokenFactory = Callable[[], str]

USERNAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{2,63}")
MIN_PASSWORD_LENGTH = 12
# Argon2 reads the whole password; a bound keeps one request from buying much CPU.
MAX_PASSWORD_LENGTH = 1024
MAX_PARTNER_NAME_LENGTH = 200
REFRESH_TOKEN_TTL = timedelta(days=30)
# Clock skew allowed between the auth instances that sign and the services that verify.
CLOCK_SKEW = timedelta(minutes=1)
# A rotated-in key is published (JWKS) this long before it signs anything: the edges
# cache the JWKS (mesh/edge_policy.py, JWKS_CACHE_SECONDS) and Envoy does not refetch
# on an unknown kid, so a token signed at once with the new key would be refused at an
# edge that has not refreshed yet. Several cache periods, so a failed fetch is retried.
KEY_PUBLICATION_DELAY = timedelta(seconds=15)

CLIENT_ID_PREFIX = "mbp_"
# Client ids are the prefix plus token_urlsafe(16); anything outside this cannot be one.
_PRINTABLE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A recognisable prefix lets secret scanners (and people) spot a leaked secret.
CLIENT_SECRET_PREFIX = "mbs_"  # noqa: S105 - a prefix, not a secret

INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
INVALID_REFRESH_TOKEN = "INVALID_REFRESH_TOKEN"  # noqa: S105 - an error reason, not a secret
REFRESH_TOKEN_REUSED = "REFRESH_TOKEN_REUSED"  # noqa: S105 - an error reason, not a secret

# Compared against when the client id is unknown, so both paths do the same work.
_DUMMY_SECRET_HASH = hashlib.sha256(b"meshbank: no such client").digest()


def hash_secret(secret: str) -> bytes:
    """SHA-256 of a high-entropy secret (client secret, refresh token).

    A slow hash adds nothing against guessing 256 random bits, and a fast one lets a
    refresh token be looked up by its hash.
    """
    return hashlib.sha256(secret.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenGrant:
    """What a successful login, client-credentials grant or refresh hands back."""

    access_token: str = field(repr=False)
    expires_in_seconds: int
    refresh_token: str | None = field(repr=False)
    scopes: tuple[str, ...]


class PartnerCredentials(NamedTuple):
    """A new partner's credentials; the secret is shown once and only its hash is kept."""

    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        return f"PartnerCredentials(client_id={self.client_id!r}, client_secret=<hidden>)"


def _required(violations: errors.Violations, name: str, value: str) -> None:
    if not value:
        violations.add(name, "is required")


def _bad_credentials() -> errors.Unauthenticated:
    return errors.Unauthenticated("the credentials are not valid", reason=INVALID_CREDENTIALS)


def _invalid_refresh_token() -> errors.Unauthenticated:
    return errors.Unauthenticated(
        "the refresh token is not valid (unknown, expired or revoked)",
        reason=INVALID_REFRESH_TOKEN,
    )


@dataclass(frozen=True)
class _Rotated:
    subject: str
    scopes: frozenset[str]
    key: StoredSigningKey


@dataclass(frozen=True)
class _Rejected:
    reason: str
    family_id: uuid.UUID | None = None
    revoked: int = 0


class AuthService:
    """Use cases of the auth service (and of the operator commands that feed it)."""

    def __init__(
        self,
        run: TransactionRunner,
        issuer: TokenIssuer,
        passwords: Passwords,
        *,
        key_passphrase: str | bytes | None = None,
        clock: Clock = lambda: datetime.now(UTC),
        new_id: IdFactory = uuid.uuid4,
        new_token: TokenFactory = lambda: secrets.token_urlsafe(32),
        refresh_ttl: timedelta = REFRESH_TOKEN_TTL,
        key_publication_delay: timedelta = KEY_PUBLICATION_DELAY,
        read_replica: TransactionRunner | None = None,
    ) -> None:
        self._run = run
        self._read_replica = read_replica
        # The last JWKS read from the database, and when: served while no member answers.
        self._published: tuple[datetime, list[dict[str, str]]] | None = None
        self._issuer = issuer
        self._passwords = passwords
        self._passphrase = key_passphrase
        self._clock = clock
        self._new_id = new_id
        self._new_token = new_token
        self._refresh_ttl = refresh_ttl
        self._publication_delay = key_publication_delay
        # Decrypted private keys by kid: decrypting per request would be wasted work,
        # and a kid names one key forever (it is derived from the public key).
        self._key_cache: dict[str, SigningKey] = {}
        self._key_lock = threading.Lock()

    # -- signing keys ----------------------------------------------------------------

    def _passphrase_or(self, passphrase: str | bytes | None) -> str | bytes:
        chosen = passphrase if passphrase is not None else self._passphrase
        if not chosen:
            raise KeyLoadError("no signing key passphrase is configured")
        return chosen

    def _decrypt(
        self, stored: StoredSigningKey, passphrase: str | bytes | None = None
    ) -> SigningKey:
        with self._key_lock:
            key = self._key_cache.get(stored.kid)
            if key is None:
                key = load_signing_key(
                    stored.kid, stored.private_key_pem, self._passphrase_or(passphrase)
                )
                self._key_cache[stored.kid] = key
            return key

    def _signing_key(self, uow: AuthUnitOfWork) -> StoredSigningKey:
        """The newest key published for at least the publication delay.

        A younger key only signs when no older one is left (the very first key, or
        every key rotated in moments ago: then the oldest, published longest).
        """
        active = uow.signing_keys.list_active()  # newest first
        if not active:
            raise errors.Unavailable(
                "no token signing key is configured yet", reason="NO_SIGNING_KEY"
            )
        published_before = self._clock() - self._publication_delay
        return next((k for k in active if k.created_at <= published_before), active[-1])

    def _new_stored_key(
        self, passphrase: str | bytes | None
    ) -> tuple[SigningKey, StoredSigningKey]:
        key = generate_signing_key()
        stored = StoredSigningKey(
            kid=key.kid,
            algorithm=ALGORITHM,
            private_key_pem=key.to_encrypted_pem(self._passphrase_or(passphrase)),
            public_jwk=key.public_jwk(),
            created_at=self._clock(),
        )
        return key, stored

    def ensure_signing_key(self, passphrase: str | bytes | None = None) -> str:
        """Create a signing key unless an active one exists; return the signing kid.

        When a key exists, it is decrypted with ``passphrase`` so that a deployment with
        the wrong passphrase fails here, at start-up, instead of at the first login.
        """
        key, stored = self._new_stored_key(passphrase)

        def work(uow: AuthUnitOfWork) -> StoredSigningKey:
            active = uow.signing_keys.list_active()
            if active:
                return active[0]
            uow.signing_keys.add(stored)
            return stored

        signing = self._run(work)
        if signing.kid == key.kid:
            with self._key_lock:
                self._key_cache[key.kid] = key
        else:
            self._decrypt(signing, passphrase)
        return signing.kid

    def rotate_signing_key(self, passphrase: str | bytes | None = None) -> str:
        """Add a new key: published at once, signing after the publication delay; older
        keys verify until retired."""
        key, stored = self._new_stored_key(passphrase)
        self._run(lambda uow: uow.signing_keys.add(stored))
        with self._key_lock:
            self._key_cache[key.kid] = key
        return key.kid

    def retire_signing_key(self, kid: str) -> None:
        """Stop publishing and trusting ``kid``, once no unexpired token can need it.

        A key stops signing once a newer one has been published for the publication
        delay; its last tokens expire one access token lifetime (plus clock skew) later.
        Retiring sooner would log those callers out, and retiring the only key would stop
        all logins, so both are refused.
        """
        now = self._clock()
        grace = self._publication_delay + timedelta(seconds=self._issuer.ttl_seconds) + CLOCK_SKEW

        def work(uow: AuthUnitOfWork) -> None:
            active = uow.signing_keys.list_active()
            target = next((k for k in active if k.kid == kid), None)
            if target is None:
                raise errors.NotFound("signing key", kid)
            successors = [k for k in active if k.created_at > target.created_at]
            if not any(k.created_at + grace <= now for k in successors):
                raise errors.FailedPrecondition(
                    "the key may still have unexpired tokens: rotate first and wait one "
                    "access token lifetime",
                    reason="SIGNING_KEY_IN_USE",
                    metadata={"subject": f"signingKeys/{kid}"},
                )
            uow.signing_keys.retire(kid, now)

        self._run(work)

    def jwks(self) -> list[dict[str, str]]:
        """The public JWKs of every key that may have signed a live token, newest first.

        Read from the region's replica when there is one (else, or when it fails, the
        primary): the edges fetch this every few seconds, and during a database failover
        they must keep getting it. When no member answers, the last set read is served
        if it is younger than the key publication delay: no key can have started signing
        since then without having been in it.
        """
        now = self._clock()
        for run in (self._read_replica, self._run):
            if run is None:
                continue
            try:
                active = run(lambda uow: uow.signing_keys.list_active(), readonly=True)
            except errors.Unavailable:
                continue
            published = [dict(k.public_jwk) for k in active]
            self._published = (now, published)
            return published
        if self._published is not None and now - self._published[0] < self._publication_delay:
            return self._published[1]
        raise errors.Unavailable(
            "the signing keys cannot be read right now; retry", reason="DATABASE_UNAVAILABLE"
        )

    def _grant(
        self,
        subject: str,
        scopes: frozenset[str],
        stored: StoredSigningKey,
        now: datetime,
        refresh_token: str | None,
    ) -> TokenGrant:
        access_token = self._issuer.issue(subject, scopes, self._decrypt(stored), now)
        return TokenGrant(
            access_token=access_token,
            expires_in_seconds=self._issuer.ttl_seconds,
            refresh_token=refresh_token,
            scopes=tuple(sorted(scopes)),
        )

    def _new_refresh_token(
        self,
        token: str,
        family_id: uuid.UUID,
        subject: str,
        scopes: frozenset[str],
        now: datetime,
    ) -> RefreshToken:
        return RefreshToken(
            token_id=self._new_id(),
            token_hash=hash_secret(token),
            family_id=family_id,
            subject=subject,
            scopes=scopes,
            created_at=now,
            expires_at=now + self._refresh_ttl,
        )

    # -- users -----------------------------------------------------------------------

    def create_user(self, username: str, password: str) -> None:
        violations = errors.Violations()
        if not username:
            violations.add("username", "is required")
        elif USERNAME_PATTERN.fullmatch(username) is None:
            violations.add(
                "username",
                "must be 3 to 64 characters: a lowercase letter, then lowercase letters, "
                "digits, '_', '.' or '-'",
            )
        if len(password) < MIN_PASSWORD_LENGTH:
            violations.add("password", f"must be at least {MIN_PASSWORD_LENGTH} characters")
        elif len(password) > MAX_PASSWORD_LENGTH:
            violations.add("password", f"must be at most {MAX_PASSWORD_LENGTH} characters")
        violations.raise_if_any()
        password_hash = self._passwords.hash(password)
        now = self._clock()

        def work(uow: AuthUnitOfWork) -> None:
            if uow.users.get_by_username(username) is not None:
                raise errors.AlreadyExists(
                    f"the user {username!r} already exists", reason="USER_EXISTS"
                )
            uow.users.add(User(self._new_id(), username, password_hash, now))

        self._run(work)

    def login(self, username: str, password: str) -> TokenGrant:
        violations = errors.Violations()
        _required(violations, "username", username)
        _required(violations, "password", password)
        if len(password) > MAX_PASSWORD_LENGTH:
            violations.add("password", f"must be at most {MAX_PASSWORD_LENGTH} characters")
        violations.raise_if_any()
        # A name create_user would refuse cannot exist: no database lookup (PostgreSQL text
        # cannot even hold a NUL, which failed the whole call), the same Argon2 work.
        user = (
            self._run(lambda uow: uow.users.get_by_username(username), readonly=True)
            if USERNAME_PATTERN.fullmatch(username)
            else None
        )
        if user is None:
            self._passwords.verify_dummy(password)
            raise _bad_credentials()
        if not self._passwords.verify(user.password_hash, password):
            raise _bad_credentials()
        # Upgrade hashes made with older cost parameters while we know the password.
        new_hash = (
            self._passwords.hash(password)
            if self._passwords.needs_rehash(user.password_hash)
            else None
        )
        now = self._clock()
        subject = f"users/{user.username}"
        scopes = USER_SCOPES
        refresh_token = self._new_token()

        def work(uow: AuthUnitOfWork) -> StoredSigningKey:
            stored = self._signing_key(uow)
            if new_hash is not None:
                uow.users.set_password_hash(user.user_id, new_hash)
            uow.refresh_tokens.add(
                self._new_refresh_token(refresh_token, self._new_id(), subject, scopes, now)
            )
            return stored

        stored = self._run(work)
        return self._grant(subject, scopes, stored, now, refresh_token)

    # -- partners --------------------------------------------------------------------

    def create_partner(self, name: str, scopes: Iterable[str]) -> PartnerCredentials:
        wanted = list(scopes)
        violations = errors.Violations()
        if not name:
            violations.add("name", "is required")
        elif name != name.strip() or len(name) > MAX_PARTNER_NAME_LENGTH:
            violations.add(
                "name",
                f"must be at most {MAX_PARTNER_NAME_LENGTH} characters without surrounding spaces",
            )
        if not wanted:
            violations.add("scopes", "at least one scope is required")
        unknown = sorted(set(wanted) - ALL_SCOPES)
        if unknown:
            violations.add(
                "scopes",
                f"unknown scopes {', '.join(repr(s) for s in unknown)}; known scopes are "
                f"{', '.join(sorted(ALL_SCOPES))}",
            )
        violations.raise_if_any()
        client_id = CLIENT_ID_PREFIX + secrets.token_urlsafe(16)
        client_secret = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()

        def work(uow: AuthUnitOfWork) -> None:
            if uow.partners.get_by_name(name) is not None:
                raise errors.AlreadyExists(
                    f"the partner {name!r} already exists", reason="PARTNER_EXISTS"
                )
            uow.partners.add(
                Partner(
                    partner_id=self._new_id(),
                    name=name,
                    client_id=client_id,
                    secret_hash=hash_secret(client_secret),
                    scopes=frozenset(wanted),
                    created_at=now,
                )
            )

        self._run(work)
        return PartnerCredentials(client_id, client_secret)

    def issue_client_token(
        self, client_id: str, client_secret: str, requested_scopes: Iterable[str]
    ) -> TokenGrant:
        """OAuth 2 client credentials grant: no refresh token, the partner just asks again."""
        requested = list(requested_scopes)
        violations = errors.Violations()
        _required(violations, "client_id", client_id)
        _required(violations, "client_secret", client_secret)
        for i, scope in enumerate(requested):
            if not scope:
                violations.add(f"scopes[{i}]", "must not be empty")
        violations.raise_if_any()

        # An id create_partner cannot have issued is unknown without asking the database
        # (PostgreSQL text cannot hold a NUL, which failed the whole call).
        possible = client_id.startswith(CLIENT_ID_PREFIX) and _PRINTABLE_ID.fullmatch(client_id)

        def work(uow: AuthUnitOfWork) -> tuple[Partner | None, StoredSigningKey]:
            partner = uow.partners.get_by_client_id(client_id) if possible else None
            return partner, self._signing_key(uow)

        partner, stored = self._run(work, readonly=True)
        expected = partner.secret_hash if partner is not None else _DUMMY_SECRET_HASH
        secret_ok = hmac.compare_digest(hash_secret(client_secret), expected)
        if partner is None or not secret_ok:
            raise _bad_credentials()
        wanted = frozenset(requested) if requested else partner.scopes
        missing = sorted(wanted - partner.scopes)
        if missing:
            listed = " ".join(missing)[:256]
            raise errors.PermissionDenied(
                f"the client is not granted the scopes: {listed}",
                reason="SCOPE_NOT_GRANTED",
                metadata={"scopes": listed},
            )
        return self._grant(f"partners/{partner.client_id}", wanted, stored, self._clock(), None)

    # -- refresh tokens --------------------------------------------------------------

    def refresh(self, refresh_token: str) -> TokenGrant:
        """Rotate a refresh token: the presented one is spent, a new one of its family returned.

        A spent token presented again means two parties hold the family (the client and
        a thief, and we cannot tell which is which), so the whole family is revoked.
        """
        violations = errors.Violations()
        _required(violations, "refresh_token", refresh_token)
        violations.raise_if_any()
        presented = hash_secret(refresh_token)
        new_token = self._new_token()
        successor = hash_secret(new_token)
        now = self._clock()

        def work(uow: AuthUnitOfWork) -> _Rotated | _Rejected:
            row = uow.refresh_tokens.get_by_hash(presented)
            if row is None:
                return _Rejected(INVALID_REFRESH_TOKEN)
            if row.used_at is not None and uow.refresh_tokens.get_by_hash(successor):
                # This very call spent it: an earlier attempt committed, but its outcome
                # was lost (a dropped connection at COMMIT) and the runner re-ran it.
                # Not a reuse: answer with the successor that attempt stored.
                return _Rotated(row.subject, row.scopes, self._signing_key(uow))
            if row.used_at is not None:
                revoked = uow.refresh_tokens.revoke_family(row.family_id, now)
                return _Rejected(REFRESH_TOKEN_REUSED, row.family_id, revoked)
            if row.revoked_at is not None or row.expires_at <= now:
                return _Rejected(INVALID_REFRESH_TOKEN)
            stored = self._signing_key(uow)
            if not uow.refresh_tokens.mark_used(row.token_id, now):
                # A concurrent refresh spent it first: that is a reuse as well.
                revoked = uow.refresh_tokens.revoke_family(row.family_id, now)
                return _Rejected(REFRESH_TOKEN_REUSED, row.family_id, revoked)
            uow.refresh_tokens.add(
                self._new_refresh_token(new_token, row.family_id, row.subject, row.scopes, now)
            )
            return _Rotated(row.subject, row.scopes, stored)

        outcome = self._run(work)
        if isinstance(outcome, _Rejected):
            if outcome.reason == REFRESH_TOKEN_REUSED:
                log.warning(
                    "refresh token reuse detected: revoked token family %s (%d tokens)",
                    outcome.family_id,
                    outcome.revoked,
                )
                raise errors.Unauthenticated(
                    "the refresh token was already used; the session has been revoked",
                    reason=REFRESH_TOKEN_REUSED,
                )
            raise _invalid_refresh_token()
        return self._grant(outcome.subject, outcome.scopes, outcome.key, now, new_token)

    def revoke(self, token: str) -> None:
        """Revoke the token's whole family; unknown tokens succeed silently (RFC 7009)."""
        violations = errors.Violations()
        _required(violations, "token", token)
        violations.raise_if_any()
        presented = hash_secret(token)
        now = self._clock()

        def work(uow: AuthUnitOfWork) -> None:
            row = uow.refresh_tokens.get_by_hash(presented)
            if row is not None:
                uow.refresh_tokens.revoke_family(row.family_id, now)

        self._run(work)
