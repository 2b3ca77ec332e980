"""AuthService over real sockets on the real database: tokens, rotation, revocation, keys."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import grpc
import sqlalchemy as sa

from meshbank.account.v1 import account_pb2
from meshbank.auth.v1 import auth_pb2
from services.auth.handlers import KEY_PUBLICATION_DELAY
from tests.integration.conftest import KEY_PASSPHRASE, Stack
from tests.support import failure

Code = grpc.StatusCode


def header(token: str) -> dict[str, str]:
    head = token.split(".")[0]
    decoded: dict[str, str] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return decoded


def login(stack: Stack, username: str, password: str) -> auth_pb2.LoginResponse:
    return stack.auth.Login(auth_pb2.LoginRequest(username=username, password=password))


def test_login_issues_a_jwt_verifiable_with_the_published_jwks(stack: Stack) -> None:
    username = stack.unique("u")
    stack.admin.create_user(username, "a fine long password")
    reply = login(stack, username, "a fine long password")
    assert reply.token_type == "Bearer"
    assert reply.expires_in_seconds == 900
    assert set(reply.scopes) == {
        "accounts.read",
        "accounts.write",
        "transfers.read",
        "transfers.write",
    }
    jwks = stack.auth.GetJwks(auth_pb2.GetJwksRequest()).keys
    kid = header(reply.access_token)["kid"]
    assert header(reply.access_token)["alg"] == "EdDSA"
    assert kid in {k.kid for k in jwks}
    assert all((k.kty, k.crv, k.alg, k.use) == ("OKP", "Ed25519", "EdDSA", "sig") for k in jwks)


def test_wrong_credentials_say_nothing_about_which_part(stack: Stack) -> None:
    username = stack.unique("u")
    stack.admin.create_user(username, "a fine long password")
    wrong_password = failure(lambda: login(stack, username, "not the password"))
    no_such_user = failure(lambda: login(stack, stack.unique("ghost"), "whatever it is"))
    assert wrong_password.code == no_such_user.code == Code.UNAUTHENTICATED
    assert wrong_password.message == no_such_user.message
    assert wrong_password.reason == no_such_user.reason == "INVALID_CREDENTIALS"
    empty = failure(lambda: login(stack, "", ""))
    assert empty.code == Code.INVALID_ARGUMENT
    assert {"username", "password"} <= set(empty.field_violations)


def test_refresh_rotates_and_reuse_revokes_the_family(stack: Stack) -> None:
    username = stack.unique("u")
    stack.admin.create_user(username, "a fine long password")
    first = login(stack, username, "a fine long password")
    second = stack.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)
    )
    assert second.refresh_token != first.refresh_token
    assert second.access_token

    reused = failure(
        lambda: stack.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)
        )
    )
    assert (reused.code, reused.reason) == (Code.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    # The thief's (or victim's) newer token died with the family.
    dead = failure(
        lambda: stack.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=second.refresh_token)
        )
    )
    assert dead.code == Code.UNAUTHENTICATED


def test_revoke_is_idempotent_and_final(stack: Stack) -> None:
    username = stack.unique("u")
    stack.admin.create_user(username, "a fine long password")
    session = login(stack, username, "a fine long password")
    for _ in range(2):
        stack.auth.RevokeToken(auth_pb2.RevokeTokenRequest(token=session.refresh_token))
    stack.auth.RevokeToken(auth_pb2.RevokeTokenRequest(token="never-issued"))
    err = failure(
        lambda: stack.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=session.refresh_token)
        )
    )
    assert (err.code, err.reason) == (Code.UNAUTHENTICATED, "INVALID_REFRESH_TOKEN")


def test_client_credentials(stack: Stack) -> None:
    caller, client_id, secret = stack.partner(frozenset({"accounts.read", "transfers.read"}))
    narrowed = stack.auth.IssueClientToken(
        auth_pb2.IssueClientTokenRequest(
            client_id=client_id, client_secret=secret, scopes=["accounts.read"]
        )
    )
    assert list(narrowed.scopes) == ["accounts.read"]
    assert narrowed.expires_in_seconds == 900
    too_much = failure(
        lambda: stack.auth.IssueClientToken(
            auth_pb2.IssueClientTokenRequest(
                client_id=client_id, client_secret=secret, scopes=["transfers.write"]
            )
        )
    )
    assert (too_much.code, too_much.reason) == (Code.PERMISSION_DENIED, "SCOPE_NOT_GRANTED")
    bad = failure(
        lambda: stack.auth.IssueClientToken(
            auth_pb2.IssueClientTokenRequest(client_id=client_id, client_secret=secret + "x")
        )
    )
    assert bad.code == Code.UNAUTHENTICATED
    assert caller.name == f"partners/{client_id}"


def test_rotated_keys_sign_new_tokens_while_old_tokens_keep_working(
    stack: Stack, database_url: str
) -> None:
    alice = stack.user()
    old_kid = header(alice.token)["kid"]
    _, client_id, secret = stack.partner()
    rotated_at = time.monotonic()
    new_kid = stack.admin.rotate_signing_key(KEY_PASSPHRASE)
    assert new_kid != old_kid
    # Published (GetJwks) at once, but not signing before the publication delay.
    assert new_kid in {k.kid for k in stack.auth.GetJwks(auth_pb2.GetJwksRequest()).keys}
    during = stack.auth.IssueClientToken(
        auth_pb2.IssueClientTokenRequest(client_id=client_id, client_secret=secret)
    ).access_token
    if time.monotonic() - rotated_at < KEY_PUBLICATION_DELAY.total_seconds():
        assert header(during)["kid"] == old_kid
    # Let the delay pass by moving the key's creation back, instead of waiting for it.
    # The old key moves back further if it is younger than that: the newest published
    # key signs, and a stack started moments ago has an old key newer than the new
    # one's moved-back creation (which then kept signing).
    published = datetime.now(UTC) - KEY_PUBLICATION_DELAY
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        move_back = "UPDATE signing_keys SET created_at = LEAST(created_at, :at) WHERE kid = :kid"
        conn.execute(sa.text(move_back), {"at": published - timedelta(seconds=2), "kid": old_kid})
        conn.execute(sa.text(move_back), {"at": published - timedelta(seconds=1), "kid": new_kid})
    engine.dispose()
    bob = stack.user()
    assert header(bob.token)["kid"] == new_kid
    for who in (alice, bob):  # both verify in the account service without a restart
        reply = stack.accounts.ListAccounts(account_pb2.ListAccountsRequest(), metadata=who.md)
        assert list(reply.accounts) == []
    assert {old_kid, new_kid} <= {k.kid for k in stack.auth.GetJwks(auth_pb2.GetJwksRequest()).keys}
