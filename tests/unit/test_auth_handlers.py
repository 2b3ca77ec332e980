"""Auth use cases over in-memory fakes of the ports, and the servicer's translation.

The fake runner gives each unit of work a copy of the state and keeps it only when the
work returns, so a test sees exactly what a committed (or rolled back) transaction
would leave behind; read-only work that writes fails the test.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import argon2
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshbank.auth.v1 import auth_pb2
from services.auth.handlers import KEY_PUBLICATION_DELAY, AuthService, TokenGrant
from services.auth.keys import KeyLoadError, public_key_from_jwk
from services.auth.passwords import Passwords
from services.auth.ports import (
    AuthUnitOfWork,
    Partner,
    RefreshToken,
    StoredSigningKey,
    User,
)
from services.auth.servicer import AuthServicer
from services.auth.tokens import CachingKeySource, TokenIssuer, TokenVerifier
from services.common import errors
from services.common.principal import ALL_SCOPES, USER_SCOPES, Principal
from tests.fakes.passwords import FAST

T = TypeVar("T")

ISSUER = "https://auth.meshbank.test"
AUDIENCE = "meshbank"
PASSPHRASE = "unit test passphrase"
PASSWORD = "correct horse battery"


# -- fakes -------------------------------------------------------------------------------


@dataclass
class State:
    users: dict[str, User] = field(default_factory=dict)
    partners: dict[str, Partner] = field(default_factory=dict)
    signing_keys: list[StoredSigningKey] = field(default_factory=list)
    refresh_tokens: dict[bytes, RefreshToken] = field(default_factory=dict)
    lookups: int = field(default=0, compare=False)  # users, partners looked up by name or id


def _like_postgres(text: str) -> str:
    """PostgreSQL cannot store or compare a NUL in text: psycopg raises, so do the fakes."""
    if "\x00" in text:
        raise ValueError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    return text


class FakeUsers:
    def __init__(self, state: State) -> None:
        self._s = state

    def get_by_username(self, username: str) -> User | None:
        self._s.lookups += 1
        return self._s.users.get(_like_postgres(username))

    def add(self, user: User) -> None:
        if user.username in self._s.users:
            raise errors.AlreadyExists("duplicate", reason="USER_EXISTS")
        self._s.users[user.username] = user

    def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        for name, user in self._s.users.items():
            if user.user_id == user_id:
                self._s.users[name] = dataclasses.replace(user, password_hash=password_hash)


class FakePartners:
    def __init__(self, state: State) -> None:
        self._s = state

    def get_by_client_id(self, client_id: str) -> Partner | None:
        self._s.lookups += 1
        return self._s.partners.get(_like_postgres(client_id))

    def get_by_name(self, name: str) -> Partner | None:
        return next((p for p in self._s.partners.values() if p.name == name), None)

    def add(self, partner: Partner) -> None:
        if self.get_by_name(partner.name) is not None:
            raise errors.AlreadyExists("duplicate", reason="PARTNER_EXISTS")
        self._s.partners[partner.client_id] = partner


class FakeSigningKeys:
    def __init__(self, state: State) -> None:
        self._s = state

    def list_active(self) -> list[StoredSigningKey]:
        active = [k for k in reversed(self._s.signing_keys) if k.retired_at is None]
        return sorted(active, key=lambda k: k.created_at, reverse=True)

    def add(self, key: StoredSigningKey) -> None:
        self._s.signing_keys.append(key)

    def retire(self, kid: str, now: datetime) -> None:
        self._s.signing_keys = [
            dataclasses.replace(k, retired_at=now) if k.kid == kid else k
            for k in self._s.signing_keys
        ]


class FakeRefreshTokens:
    def __init__(self, state: State) -> None:
        self._s = state

    def get_by_hash(self, token_hash: bytes) -> RefreshToken | None:
        return self._s.refresh_tokens.get(token_hash)

    def add(self, token: RefreshToken) -> None:
        assert token.token_hash not in self._s.refresh_tokens
        self._s.refresh_tokens[token.token_hash] = token

    def mark_used(self, token_id: uuid.UUID, now: datetime) -> bool:
        for h, t in self._s.refresh_tokens.items():
            if t.token_id == token_id and t.used_at is None:
                self._s.refresh_tokens[h] = dataclasses.replace(t, used_at=now)
                return True
        return False

    def revoke_family(self, family_id: uuid.UUID, now: datetime) -> int:
        count = 0
        for h, t in self._s.refresh_tokens.items():
            if t.family_id == family_id and t.revoked_at is None:
                self._s.refresh_tokens[h] = dataclasses.replace(t, revoked_at=now)
                count += 1
        return count


class FakeUnitOfWork:
    def __init__(self, state: State) -> None:
        self.users = FakeUsers(state)
        self.partners = FakePartners(state)
        self.signing_keys = FakeSigningKeys(state)
        self.refresh_tokens: FakeRefreshTokens = FakeRefreshTokens(state)


class FakeRunner:
    """Runs work on a copy of the state; commits the copy only if the work returns."""

    def __init__(self) -> None:
        self.state = State()
        self.transactions = 0
        self.uow_factory: Callable[[State], FakeUnitOfWork] = FakeUnitOfWork
        # Transactions whose COMMIT succeeds but whose answer is lost (the connection
        # drops during it): like run_transaction, the runner then runs the work again.
        self.lost_commit_replies = 0
        self.down = False  # no database member answers: the retry helper gives up

    def __call__(self, work: Callable[[AuthUnitOfWork], T], *, readonly: bool = False) -> T:
        if self.down:
            raise errors.Unavailable("down", reason="DATABASE_UNAVAILABLE")
        self.transactions += 1
        draft = copy.deepcopy(self.state)
        result = work(self.uow_factory(draft))
        if readonly:
            assert draft == self.state, "read-only work wrote"
        else:
            self.state = draft
        if self.lost_commit_replies:
            self.lost_commit_replies -= 1
            return self(work, readonly=readonly)
        return result


class FakeClock:
    def __init__(self) -> None:
        # Real time, so tokens issued "now" also verify with PyJWT's clock.
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class CountingPasswords(Passwords):
    def __init__(self, parameters: argon2.Parameters) -> None:
        super().__init__(parameters)
        self.dummy_calls = 0

    def verify_dummy(self, password: str) -> None:
        self.dummy_calls += 1
        super().verify_dummy(password)


@dataclass
class Env:
    runner: FakeRunner
    clock: FakeClock
    passwords: CountingPasswords
    auth: AuthService

    @property
    def state(self) -> State:
        return self.runner.state

    def verifier(self, leeway_seconds: int = 5) -> TokenVerifier:
        def load_all() -> dict[str, Ed25519PublicKey]:
            return {
                k.kid: public_key_from_jwk(k.public_jwk)
                for k in FakeSigningKeys(self.runner.state).list_active()
            }

        return TokenVerifier(
            ISSUER, AUDIENCE, CachingKeySource(load_all, 0.0), leeway_seconds=leeway_seconds
        )

    def verify(self, token: str) -> Principal:
        return self.verifier().verify(token)


def make_env(*, with_key: bool = True, passwords: CountingPasswords | None = None) -> Env:
    runner = FakeRunner()
    clock = FakeClock()
    pw = passwords or CountingPasswords(FAST)
    auth = AuthService(
        runner, TokenIssuer(ISSUER, AUDIENCE), pw, key_passphrase=PASSPHRASE, clock=clock
    )
    if with_key:
        auth.ensure_signing_key()
    return Env(runner, clock, pw, auth)


@pytest.fixture
def env() -> Env:
    return make_env()


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def violation_fields(caught: pytest.ExceptionInfo[errors.InvalidArgument]) -> list[str]:
    return [v.field for v in caught.value.violations]


def header_kid(token: str) -> str:
    kid = jwt.get_unverified_header(token)["kid"]
    assert isinstance(kid, str)
    return kid


# -- users and login ---------------------------------------------------------------------


def test_login_issues_access_and_refresh_tokens(env: Env) -> None:
    env.auth.create_user("alice", PASSWORD)
    grant = env.auth.login("alice", PASSWORD)
    assert grant.expires_in_seconds == 900
    assert grant.scopes == tuple(sorted(USER_SCOPES))
    assert "accounts.admin" not in grant.scopes
    assert env.verify(grant.access_token) == Principal("users/alice", USER_SCOPES)
    assert grant.refresh_token
    stored = env.state.refresh_tokens[sha256(grant.refresh_token)]
    assert stored.subject == "users/alice"
    assert stored.scopes == USER_SCOPES
    assert stored.expires_at == env.clock.now + timedelta(days=30)
    assert stored.used_at is None
    assert stored.revoked_at is None
    # Only hashes are stored: neither secret appears anywhere in the state.
    assert grant.refresh_token not in repr(env.state)
    assert PASSWORD not in repr(env.state)


def test_grant_repr_hides_tokens(env: Env) -> None:
    env.auth.create_user("alice", PASSWORD)
    grant = env.auth.login("alice", PASSWORD)
    assert grant.access_token not in repr(grant)
    assert grant.refresh_token is not None
    assert grant.refresh_token not in repr(grant)


def test_wrong_password_and_unknown_user_fail_the_same_way(env: Env) -> None:
    env.auth.create_user("alice", PASSWORD)
    with pytest.raises(errors.Unauthenticated) as wrong_password:
        env.auth.login("alice", PASSWORD + "!")
    assert env.passwords.dummy_calls == 0
    with pytest.raises(errors.Unauthenticated) as unknown_user:
        env.auth.login("bob", PASSWORD)
    assert env.passwords.dummy_calls == 1  # same Argon2 work as a real user
    assert wrong_password.value.reason == unknown_user.value.reason == "INVALID_CREDENTIALS"
    assert wrong_password.value.message == unknown_user.value.message
    assert env.state.refresh_tokens == {}


def test_login_requires_both_fields(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.login("", "")
    assert violation_fields(caught) == ["username", "password"]


def test_login_upgrades_an_outdated_password_hash() -> None:
    old = make_env(passwords=CountingPasswords(dataclasses.replace(FAST, time_cost=1)))
    old.auth.create_user("alice", PASSWORD)
    old_hash = old.state.users["alice"].password_hash
    stronger = CountingPasswords(dataclasses.replace(FAST, time_cost=2))
    upgraded = AuthService(
        old.runner,
        TokenIssuer(ISSUER, AUDIENCE),
        stronger,
        key_passphrase=PASSPHRASE,
        clock=old.clock,
    )
    upgraded.login("alice", PASSWORD)
    new_hash = old.state.users["alice"].password_hash
    assert new_hash != old_hash
    assert ",t=2," in new_hash
    assert stronger.verify(new_hash, PASSWORD)
    upgraded.login("alice", PASSWORD)
    assert old.state.users["alice"].password_hash == new_hash  # no rehash when current


def test_login_without_a_signing_key_is_unavailable() -> None:
    env = make_env(with_key=False)
    env.auth.create_user("alice", PASSWORD)
    with pytest.raises(errors.Unavailable) as caught:
        env.auth.login("alice", PASSWORD)
    assert caught.value.reason == "NO_SIGNING_KEY"
    assert env.state.refresh_tokens == {}


def test_create_user_stores_an_argon2id_hash(env: Env) -> None:
    env.auth.create_user("alice", PASSWORD)
    user = env.state.users["alice"]
    assert user.password_hash.startswith("$argon2id$")
    assert user.created_at == env.clock.now


@pytest.mark.parametrize(
    "username",
    ["ab", "Alice", "1alice", "_alice", "al ice", "alice\n", "alicé", "a" * 65, "al/ice"],
)
def test_create_user_rejects_bad_usernames(env: Env, username: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.create_user(username, PASSWORD)
    assert violation_fields(caught) == ["username"]
    assert env.state.users == {}


@pytest.mark.parametrize("username", ["abc", "a" * 64, "alice.smith-2_x"])
def test_create_user_accepts_good_usernames(env: Env, username: str) -> None:
    env.auth.create_user(username, PASSWORD)
    assert username in env.state.users


@pytest.mark.parametrize("password", ["", "x" * 11, "x" * 1025])
def test_create_user_rejects_bad_passwords(env: Env, password: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.create_user("alice", password)
    assert violation_fields(caught) == ["password"]


def test_create_user_reports_every_bad_field(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.create_user("", "short")
    assert violation_fields(caught) == ["username", "password"]


def test_duplicate_user(env: Env) -> None:
    env.auth.create_user("alice", PASSWORD)
    with pytest.raises(errors.AlreadyExists) as caught:
        env.auth.create_user("alice", "another long password")
    assert caught.value.reason == "USER_EXISTS"
    assert env.auth.login("alice", PASSWORD).access_token  # the original is untouched


# -- partners ----------------------------------------------------------------------------


def test_create_partner_returns_credentials_and_stores_only_a_hash(env: Env) -> None:
    creds = env.auth.create_partner("Acme Payments", ["accounts.read", "transfers.write"])
    assert creds.client_id.startswith("mbp_")
    assert len(creds.client_id) > 20
    assert creds.client_secret.startswith("mbs_")
    assert len(creds.client_secret) > 40
    partner = env.state.partners[creds.client_id]
    assert partner.name == "Acme Payments"
    assert partner.secret_hash == sha256(creds.client_secret)
    assert partner.scopes == {"accounts.read", "transfers.write"}
    assert creds.client_secret not in repr(env.state)
    assert creds.client_secret not in repr(creds)
    other = env.auth.create_partner("Other", ["accounts.read"])
    assert other.client_id != creds.client_id
    assert other.client_secret != creds.client_secret


@pytest.mark.parametrize(
    ("name", "scopes", "fields"),
    [
        ("", ["accounts.read"], ["name"]),
        (" Acme", ["accounts.read"], ["name"]),
        ("x" * 201, ["accounts.read"], ["name"]),
        ("Acme", [], ["scopes"]),
        ("Acme", ["accounts.read", "money.print"], ["scopes"]),
        ("", ["bogus"], ["name", "scopes"]),
    ],
)
def test_create_partner_validation(
    env: Env, name: str, scopes: list[str], fields: list[str]
) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.create_partner(name, scopes)
    assert violation_fields(caught) == fields
    assert env.state.partners == {}


def test_duplicate_partner(env: Env) -> None:
    env.auth.create_partner("Acme", ["accounts.read"])
    with pytest.raises(errors.AlreadyExists) as caught:
        env.auth.create_partner("Acme", ["accounts.write"])
    assert caught.value.reason == "PARTNER_EXISTS"
    assert len(env.state.partners) == 1


def test_client_token_with_all_granted_scopes(env: Env) -> None:
    creds = env.auth.create_partner("Acme", ["accounts.read", "transfers.read"])
    grant = env.auth.issue_client_token(creds.client_id, creds.client_secret, [])
    assert grant.refresh_token is None
    assert grant.scopes == ("accounts.read", "transfers.read")
    assert env.verify(grant.access_token) == Principal(
        f"partners/{creds.client_id}", frozenset({"accounts.read", "transfers.read"})
    )
    assert env.state.refresh_tokens == {}


def test_client_token_with_a_subset_of_scopes(env: Env) -> None:
    creds = env.auth.create_partner("Acme", sorted(ALL_SCOPES))
    grant = env.auth.issue_client_token(creds.client_id, creds.client_secret, ["accounts.read"])
    assert env.verify(grant.access_token).scopes == {"accounts.read"}


@pytest.mark.parametrize("requested", [["accounts.admin"], ["accounts.read", "nonsense"]])
def test_client_token_scope_not_granted(env: Env, requested: list[str]) -> None:
    creds = env.auth.create_partner("Acme", ["accounts.read"])
    with pytest.raises(errors.PermissionDenied) as caught:
        env.auth.issue_client_token(creds.client_id, creds.client_secret, requested)
    assert caught.value.reason == "SCOPE_NOT_GRANTED"
    assert requested[-1] in caught.value.message


def test_client_token_bad_credentials_fail_the_same_way(env: Env) -> None:
    creds = env.auth.create_partner("Acme", ["accounts.read"])
    with pytest.raises(errors.Unauthenticated) as wrong_secret:
        env.auth.issue_client_token(creds.client_id, creds.client_secret + "x", [])
    with pytest.raises(errors.Unauthenticated) as unknown_client:
        env.auth.issue_client_token("mbp_nobody", creds.client_secret, [])
    assert wrong_secret.value.reason == unknown_client.value.reason == "INVALID_CREDENTIALS"
    assert wrong_secret.value.message == unknown_client.value.message


def test_bad_credentials_are_checked_before_scopes(env: Env) -> None:
    creds = env.auth.create_partner("Acme", ["accounts.read"])
    with pytest.raises(errors.Unauthenticated):
        env.auth.issue_client_token(creds.client_id, "wrong", ["accounts.admin"])


def test_client_token_requires_fields(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.issue_client_token("", "", ["accounts.read", ""])
    assert violation_fields(caught) == ["client_id", "client_secret", "scopes[1]"]


# -- refresh tokens ----------------------------------------------------------------------


def login(env: Env, username: str = "alice") -> TokenGrant:
    if username not in env.state.users:
        env.auth.create_user(username, PASSWORD)
    return env.auth.login(username, PASSWORD)


def refresh_token_of(grant: TokenGrant) -> str:
    assert grant.refresh_token is not None
    return grant.refresh_token


def test_refresh_rotates_the_token(env: Env) -> None:
    first = refresh_token_of(login(env))
    env.clock.advance(seconds=2)  # within the verifier's leeway of the real clock
    grant = env.auth.refresh(first)
    second = refresh_token_of(grant)
    assert second != first
    assert env.verify(grant.access_token) == Principal("users/alice", USER_SCOPES)
    assert grant.scopes == tuple(sorted(USER_SCOPES))
    old = env.state.refresh_tokens[sha256(first)]
    new = env.state.refresh_tokens[sha256(second)]
    assert old.used_at == env.clock.now
    assert old.revoked_at is None
    assert new.family_id == old.family_id
    assert new.token_id != old.token_id
    assert new.used_at is None
    assert new.expires_at == env.clock.now + timedelta(days=30)
    third = refresh_token_of(env.auth.refresh(second))
    assert env.state.refresh_tokens[sha256(third)].family_id == old.family_id


def test_reusing_a_spent_refresh_token_revokes_the_family(env: Env) -> None:
    first = refresh_token_of(login(env))
    other_session = refresh_token_of(login(env))
    second = refresh_token_of(env.auth.refresh(first))
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.refresh(first)
    assert caught.value.reason == "REFRESH_TOKEN_REUSED"
    # The revocation was committed although the call failed.
    family = env.state.refresh_tokens[sha256(first)].family_id
    members = [t for t in env.state.refresh_tokens.values() if t.family_id == family]
    assert len(members) == 2
    assert all(t.revoked_at == env.clock.now for t in members)
    # The thief's (or the victim's) current token is dead too ...
    with pytest.raises(errors.Unauthenticated) as after:
        env.auth.refresh(second)
    assert after.value.reason == "INVALID_REFRESH_TOKEN"
    # ... but another session of the same user is not.
    assert env.auth.refresh(other_session).access_token


def test_a_concurrently_spent_token_counts_as_reuse(env: Env) -> None:
    token = refresh_token_of(login(env))

    class LosingRace(FakeRefreshTokens):
        def mark_used(self, token_id: uuid.UUID, now: datetime) -> bool:  # noqa: ARG002
            return False  # another transaction set used_at between our read and update

    def racing_uow(state: State) -> FakeUnitOfWork:
        uow = FakeUnitOfWork(state)
        uow.refresh_tokens = LosingRace(state)
        return uow

    env.runner.uow_factory = racing_uow
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.refresh(token)
    assert caught.value.reason == "REFRESH_TOKEN_REUSED"
    assert env.state.refresh_tokens[sha256(token)].revoked_at is not None
    assert len(env.state.refresh_tokens) == 1  # no new token was issued


def test_a_refresh_re_run_after_a_lost_commit_is_not_a_reuse(env: Env) -> None:
    """The re-run of a refresh whose COMMIT answer was lost finds the successor its
    first run stored: not a reuse, and the session is not revoked."""
    token = refresh_token_of(login(env))
    env.runner.lost_commit_replies = 1
    grant = env.auth.refresh(token)
    assert env.runner.lost_commit_replies == 0  # the work did run twice
    new = env.state.refresh_tokens[sha256(refresh_token_of(grant))]
    assert new.revoked_at is None
    assert env.state.refresh_tokens[sha256(token)].revoked_at is None
    assert len(env.state.refresh_tokens) == 2  # the spent one and its single successor
    assert env.verify(grant.access_token) == Principal("users/alice", USER_SCOPES)
    # Presented again by anyone else, it is a reuse as before.
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.refresh(token)
    assert caught.value.reason == "REFRESH_TOKEN_REUSED"


def test_unknown_refresh_token(env: Env) -> None:
    login(env)
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.refresh("not-a-token-we-issued")
    assert caught.value.reason == "INVALID_REFRESH_TOKEN"


def test_expired_refresh_token(env: Env) -> None:
    token = refresh_token_of(login(env))
    env.clock.advance(days=30)
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.refresh(token)
    assert caught.value.reason == "INVALID_REFRESH_TOKEN"
    assert env.state.refresh_tokens[sha256(token)].used_at is None


def test_refresh_token_just_before_expiry_still_works() -> None:
    env = make_env()
    token = refresh_token_of(login(env))
    env.clock.advance(days=30, seconds=-1)
    assert env.auth.refresh(token).refresh_token


def test_refresh_requires_a_token(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.refresh("")
    assert violation_fields(caught) == ["refresh_token"]


def test_revoke_kills_the_whole_family_only(env: Env) -> None:
    first = refresh_token_of(login(env))
    other_session = refresh_token_of(login(env))
    second = refresh_token_of(env.auth.refresh(first))
    env.auth.revoke(second)
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.refresh(second)
    assert caught.value.reason == "INVALID_REFRESH_TOKEN"
    family = env.state.refresh_tokens[sha256(first)].family_id
    assert all(
        t.revoked_at is not None for t in env.state.refresh_tokens.values() if t.family_id == family
    )
    assert env.state.refresh_tokens[sha256(other_session)].revoked_at is None
    assert env.auth.refresh(other_session).refresh_token


def test_revoking_an_old_token_revokes_its_descendants(env: Env) -> None:
    first = refresh_token_of(login(env))
    second = refresh_token_of(env.auth.refresh(first))
    env.auth.revoke(first)
    assert env.state.refresh_tokens[sha256(second)].revoked_at is not None


def test_revoke_unknown_or_revoked_token_succeeds(env: Env) -> None:
    token = refresh_token_of(login(env))
    env.auth.revoke("never-issued")
    env.auth.revoke(token)
    revoked_at = env.state.refresh_tokens[sha256(token)].revoked_at
    env.clock.advance(minutes=1)
    env.auth.revoke(token)
    assert env.state.refresh_tokens[sha256(token)].revoked_at == revoked_at


def test_revoke_requires_a_token(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.revoke("")
    assert violation_fields(caught) == ["token"]


# -- signing keys ------------------------------------------------------------------------


def test_ensure_signing_key_is_idempotent(env: Env) -> None:
    kid = env.state.signing_keys[0].kid
    assert env.auth.ensure_signing_key() == kid
    assert env.auth.ensure_signing_key(PASSPHRASE) == kid
    assert len(env.state.signing_keys) == 1
    stored = env.state.signing_keys[0]
    assert stored.private_key_pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stored.algorithm == "EdDSA"


def test_ensure_signing_key_fails_fast_on_the_wrong_passphrase(env: Env) -> None:
    fresh = AuthService(
        env.runner,
        TokenIssuer(ISSUER, AUDIENCE),
        env.passwords,
        key_passphrase="not the passphrase",
        clock=env.clock,
    )
    with pytest.raises(KeyLoadError):
        fresh.ensure_signing_key()


def test_signing_needs_a_passphrase() -> None:
    env = make_env(with_key=False)
    bare = AuthService(env.runner, TokenIssuer(ISSUER, AUDIENCE), env.passwords, clock=env.clock)
    with pytest.raises(KeyLoadError, match="passphrase"):
        bare.ensure_signing_key()
    assert bare.ensure_signing_key(PASSPHRASE)


def test_rotation_publishes_the_new_key_before_it_signs(env: Env) -> None:
    old_kid = env.state.signing_keys[0].kid
    verifier = env.verifier()
    before = login(env).access_token
    env.clock.advance(seconds=1)
    new_kid = env.auth.rotate_signing_key()
    assert new_kid != old_kid
    # Published at once (the edges' JWKS caches pick it up) but not signing yet.
    assert [k["kid"] for k in env.auth.jwks()] == [new_kid, old_kid]
    during = login(env).access_token
    assert header_kid(before) == header_kid(during) == old_kid
    env.clock.advance(seconds=KEY_PUBLICATION_DELAY.total_seconds() - 2)
    assert header_kid(login(env).access_token) == old_kid
    env.clock.advance(seconds=2)
    after = login(env).access_token
    assert header_kid(after) == new_kid
    assert verifier.verify(before).name == "users/alice"
    assert verifier.verify(during).name == "users/alice"
    # Issued by the fake clock KEY_PUBLICATION_DELAY ahead of the real one.
    lenient = env.verifier(leeway_seconds=int(KEY_PUBLICATION_DELAY.total_seconds()) + 5)
    assert lenient.verify(after).name == "users/alice"  # found by reloading the keys


def test_a_key_signs_once_published_long_enough_even_if_a_newer_one_is_not(env: Env) -> None:
    old_kid = env.state.signing_keys[0].kid
    env.clock.advance(seconds=1)
    second = env.auth.rotate_signing_key()
    env.clock.advance(seconds=1)
    env.auth.rotate_signing_key()
    assert header_kid(login(env).access_token) == old_kid
    env.clock.advance(seconds=KEY_PUBLICATION_DELAY.total_seconds() - 1)
    assert header_kid(login(env).access_token) == second


def test_jwks_are_public_only(env: Env) -> None:
    (jwk,) = env.auth.jwks()
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert jwk["kty"] == "OKP"
    assert jwk["crv"] == "Ed25519"
    assert jwk["alg"] == "EdDSA"


def with_replica(env: Env) -> tuple[AuthService, FakeRunner]:
    """The same service with a read replica: a copy of the primary's state now."""
    replica = FakeRunner()
    replica.state = copy.deepcopy(env.state)
    auth = AuthService(
        env.runner,
        TokenIssuer(ISSUER, AUDIENCE),
        env.passwords,
        key_passphrase=PASSPHRASE,
        clock=env.clock,
        read_replica=replica,
    )
    return auth, replica


def test_jwks_are_read_from_the_replica_when_there_is_one(env: Env) -> None:
    auth, replica = with_replica(env)
    before = env.runner.transactions
    assert [k["kid"] for k in auth.jwks()] == [env.state.signing_keys[0].kid]
    assert (env.runner.transactions, replica.transactions) == (before, 1)
    replica.down = True  # a replica that fails: the primary answers
    assert [k["kid"] for k in auth.jwks()] == [env.state.signing_keys[0].kid]
    assert env.runner.transactions == before + 1


def test_jwks_survive_a_database_failover_for_the_publication_delay(env: Env) -> None:
    auth, replica = with_replica(env)
    served = auth.jwks()
    replica.down = env.runner.down = True  # an election: no member answers
    env.clock.advance(seconds=KEY_PUBLICATION_DELAY.total_seconds() - 1)
    assert auth.jwks() == served
    # Older than the delay, a key published since could already sign: not served.
    env.clock.advance(seconds=1)
    with pytest.raises(errors.Unavailable):
        auth.jwks()
    env.runner.down = False
    assert auth.jwks() == served


def test_jwks_with_no_database_and_nothing_read_yet_are_unavailable(env: Env) -> None:
    env.runner.down = True
    with pytest.raises(errors.Unavailable) as caught:
        env.auth.jwks()
    assert caught.value.reason == "DATABASE_UNAVAILABLE"


def test_retiring_a_key_waits_for_its_tokens_to_expire(env: Env) -> None:
    old_kid = env.state.signing_keys[0].kid
    old_token = login(env).access_token
    with pytest.raises(errors.FailedPrecondition) as only_key:
        env.auth.retire_signing_key(old_kid)
    assert only_key.value.reason == "SIGNING_KEY_IN_USE"
    env.clock.advance(seconds=1)
    new_kid = env.auth.rotate_signing_key()
    env.clock.advance(seconds=900 + KEY_PUBLICATION_DELAY.total_seconds())
    with pytest.raises(errors.FailedPrecondition):
        env.auth.retire_signing_key(old_kid)  # tokens may live on for the clock skew
    env.clock.advance(seconds=60)
    env.auth.retire_signing_key(old_kid)
    assert [k["kid"] for k in env.auth.jwks()] == [new_kid]
    with pytest.raises(errors.Unauthenticated) as caught:
        env.verifier().verify(old_token)
    assert caught.value.reason in {"UNKNOWN_SIGNING_KEY", "TOKEN_EXPIRED"}
    with pytest.raises(errors.NotFound):
        env.auth.retire_signing_key(old_kid)


def test_the_newest_key_cannot_be_retired(env: Env) -> None:
    env.clock.advance(seconds=1)
    new_kid = env.auth.rotate_signing_key()
    env.clock.advance(days=1)
    with pytest.raises(errors.FailedPrecondition):
        env.auth.retire_signing_key(new_kid)


# -- servicer ----------------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status)
        self.status = status


class FakeContext:
    def abort_with_status(self, status: grpc.Status) -> None:
        raise Aborted(status)

    def code(self) -> None:
        return None


@pytest.fixture
def servicer(env: Env) -> AuthServicer:
    return AuthServicer(env.auth)


def ctx() -> grpc.ServicerContext:
    return cast(grpc.ServicerContext, FakeContext())


def abort_status(call: Callable[[], object]) -> grpc.Status:
    with pytest.raises(Aborted) as caught:
        call()
    return caught.value.status


def test_servicer_login_and_refresh(env: Env, servicer: AuthServicer) -> None:
    env.auth.create_user("alice", PASSWORD)
    response = servicer.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD), ctx())
    assert response.token_type == "Bearer"
    assert response.expires_in_seconds == 900
    assert list(response.scopes) == sorted(USER_SCOPES)
    assert env.verify(response.access_token).name == "users/alice"
    refreshed = servicer.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=response.refresh_token), ctx()
    )
    assert refreshed.token_type == "Bearer"
    assert refreshed.refresh_token
    assert refreshed.refresh_token != response.refresh_token
    assert (
        servicer.RevokeToken(auth_pb2.RevokeTokenRequest(token=refreshed.refresh_token), ctx())
        == auth_pb2.RevokeTokenResponse()
    )


def test_servicer_client_token_and_jwks(env: Env, servicer: AuthServicer) -> None:
    creds = env.auth.create_partner("Acme", ["accounts.read"])
    response = servicer.IssueClientToken(
        auth_pb2.IssueClientTokenRequest(
            client_id=creds.client_id, client_secret=creds.client_secret
        ),
        ctx(),
    )
    assert response.token_type == "Bearer"
    assert list(response.scopes) == ["accounts.read"]
    jwks = servicer.GetJwks(auth_pb2.GetJwksRequest(), ctx())
    assert [k.kid for k in jwks.keys] == [k["kid"] for k in env.auth.jwks()]
    assert jwks.keys[0].kty == "OKP"
    assert jwks.keys[0].use == "sig"
    public_key_from_jwk(
        {f: getattr(jwks.keys[0], f) for f in ("kty", "crv", "x", "kid", "alg", "use")}
    )


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (
            lambda s: s.Login(auth_pb2.LoginRequest(username="alice", password="wrong!"), ctx()),
            grpc.StatusCode.UNAUTHENTICATED,
            "the credentials are not valid",
        ),
        (
            lambda s: s.Login(auth_pb2.LoginRequest(), ctx()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid request: username, password",
        ),
        (
            lambda s: s.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token="nope"), ctx()),
            grpc.StatusCode.UNAUTHENTICATED,
            "the refresh token is not valid (unknown, expired or revoked)",
        ),
        (
            lambda s: s.IssueClientToken(
                auth_pb2.IssueClientTokenRequest(client_id="x", client_secret="y"), ctx()
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "the credentials are not valid",
        ),
    ],
)
def test_servicer_errors_become_statuses(
    env: Env,
    servicer: AuthServicer,
    call: Callable[[AuthServicer], object],
    code: grpc.StatusCode,
    message: str,
) -> None:
    env.auth.create_user("alice", PASSWORD)
    status = abort_status(lambda: call(servicer))
    assert status.code == code
    assert status.details == message


@pytest.mark.parametrize("username", ["demo\x00", "\x00", "Alice", "a" * 65, "al ice"])
def test_login_with_a_name_no_user_can_have_is_bad_credentials_without_a_lookup(
    env: Env, username: str
) -> None:
    """Found by the fuzzer: a NUL reached PostgreSQL (which cannot store one) as INTERNAL."""
    env.auth.create_user("alice", PASSWORD)
    lookups = env.state.lookups
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.login(username, PASSWORD)
    assert caught.value.reason == "INVALID_CREDENTIALS"
    assert env.state.lookups == lookups
    assert env.passwords.dummy_calls == 1  # the same Argon2 work as for a real user


def test_login_refuses_an_over_long_password(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        env.auth.login("alice", "p" * 1025)
    assert violation_fields(caught) == ["password"]


@pytest.mark.parametrize("client_id", ["mbp_\x00", "\x00", "nobody", "mbp_" + "x" * 200, "mbp_a b"])
def test_client_token_for_an_impossible_client_id_is_bad_credentials_without_a_lookup(
    env: Env, client_id: str
) -> None:
    with pytest.raises(errors.Unauthenticated) as caught:
        env.auth.issue_client_token(client_id, "mbs_secret", [])
    assert caught.value.reason == "INVALID_CREDENTIALS"
    assert env.state.lookups == 0
