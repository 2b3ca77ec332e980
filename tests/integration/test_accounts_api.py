"""AccountService through the generated stubs over a real socket, on a real PostgreSQL."""

from __future__ import annotations

import uuid

import grpc
import pytest

from meshbank.account.v1 import account_pb2
from tests.integration.conftest import Caller, Stack
from tests.support import failure

Code = grpc.StatusCode


def create(stack: Stack, who: Caller, **fields: object) -> account_pb2.CreateAccountResponse:
    fields.setdefault("request_id", stack.unique("c-"))
    fields.setdefault("currency_code", "USD")
    return stack.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(**fields),  # type: ignore[arg-type]
        metadata=who.md,
    )


def test_create_get_and_close(stack: Stack) -> None:
    alice = stack.user()
    created = create(stack, alice, display_name="Checking").account
    assert created.owner == alice.name
    assert created.state == account_pb2.ACCOUNT_STATE_OPEN
    assert created.balance_minor == 0
    uuid.UUID(created.account_id)

    got = stack.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=created.account_id), metadata=alice.md
    ).account
    assert got == created

    closed = stack.accounts.CloseAccount(
        account_pb2.CloseAccountRequest(request_id="close-1", account_id=created.account_id),
        metadata=alice.md,
    ).account
    assert closed.state == account_pb2.ACCOUNT_STATE_CLOSED
    assert closed.HasField("close_time")
    again = failure(
        lambda: stack.accounts.CloseAccount(
            account_pb2.CloseAccountRequest(request_id="close-2", account_id=created.account_id),
            metadata=alice.md,
        )
    )
    assert (again.code, again.reason) == (Code.FAILED_PRECONDITION, "ACCOUNT_CLOSED")


def test_replayed_create_returns_the_original_account(stack: Stack) -> None:
    alice = stack.user()
    first = create(stack, alice, request_id="open-once", display_name="A")
    second = create(stack, alice, request_id="open-once", display_name="A")
    assert first == second
    listed = stack.accounts.ListAccounts(account_pb2.ListAccountsRequest(), metadata=alice.md)
    assert [a.account_id for a in listed.accounts] == [first.account.account_id]

    reused = failure(lambda: create(stack, alice, request_id="open-once", display_name="B"))
    assert (reused.code, reused.reason) == (Code.ALREADY_EXISTS, "REQUEST_ID_REUSED")


def test_list_accounts_paginates(stack: Stack) -> None:
    alice = stack.user()
    opened = [create(stack, alice).account.account_id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = stack.accounts.ListAccounts(
            account_pb2.ListAccountsRequest(page_size=2, page_token=token), metadata=alice.md
        )
        assert len(page.accounts) <= 2
        seen += [a.account_id for a in page.accounts]
        token = page.next_page_token
        if not token:
            break
    assert seen == opened

    bad = failure(
        lambda: stack.accounts.ListAccounts(
            account_pb2.ListAccountsRequest(page_token="garbage"), metadata=alice.md
        )
    )
    assert bad.code == Code.INVALID_ARGUMENT
    assert "page_token" in bad.field_violations


def test_close_needs_a_zero_balance(stack: Stack) -> None:
    alice = stack.user()
    account_id = create(stack, alice).account.account_id
    stack.fund(account_id, 1)
    err = failure(
        lambda: stack.accounts.CloseAccount(
            account_pb2.CloseAccountRequest(request_id="x", account_id=account_id),
            metadata=alice.md,
        )
    )
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "ACCOUNT_BALANCE_NOT_ZERO")


@pytest.mark.parametrize(
    ("fields", "bad_fields"),
    [
        ({"request_id": ""}, {"request_id"}),
        ({"request_id": "x" * 129}, {"request_id"}),
        ({"currency_code": "usd"}, {"currency_code"}),
        ({"currency_code": ""}, {"currency_code"}),
        ({"display_name": "x" * 201}, {"display_name"}),
        ({"display_name": "bell\x07"}, {"display_name"}),
        ({"owner": "root"}, {"owner"}),
        ({"overdraft_limit_minor": -1}, {"overdraft_limit_minor"}),
        ({"request_id": "", "currency_code": "dollars"}, {"request_id", "currency_code"}),
        ({"currency_code": "XTS"}, {"currency_code"}),  # well-formed but unsupported
    ],
)
def test_invalid_create_requests_name_their_fields(
    stack: Stack, fields: dict[str, object], bad_fields: set[str]
) -> None:
    alice = stack.user()
    err = failure(lambda: create(stack, alice, **fields))
    assert err.code == Code.INVALID_ARGUMENT
    assert set(err.field_violations) == bad_fields


def test_not_found_and_malformed_ids(stack: Stack) -> None:
    alice = stack.user()
    missing = failure(
        lambda: stack.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id=str(uuid.uuid4())), metadata=alice.md
        )
    )
    assert missing.code == Code.NOT_FOUND
    malformed = failure(
        lambda: stack.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id="acc-1"), metadata=alice.md
        )
    )
    assert malformed.code == Code.INVALID_ARGUMENT
    assert set(malformed.field_violations) == {"account_id"}


def test_authentication_is_required(stack: Stack) -> None:
    alice = stack.user()
    account_id = create(stack, alice).account.account_id
    request = account_pb2.GetAccountRequest(account_id=account_id)
    for metadata, reason in [
        ([], "TOKEN_MISSING"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "MALFORMED_AUTHORIZATION"),
        ([("authorization", "Bearer not-a-jwt")], "TOKEN_INVALID"),
        ([("authorization", f"Bearer {alice.token[:-4]}AAAA")], "TOKEN_INVALID"),
    ]:
        err = failure(lambda md=metadata: stack.accounts.GetAccount(request, metadata=md))  # type: ignore[misc]
        assert (err.code, err.reason) == (Code.UNAUTHENTICATED, reason), metadata


def test_users_only_see_their_own_accounts(stack: Stack) -> None:
    alice, mallory = stack.user(), stack.user()
    account_id = create(stack, alice).account.account_id
    err = failure(
        lambda: stack.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id=account_id), metadata=mallory.md
        )
    )
    assert (err.code, err.reason) == (Code.PERMISSION_DENIED, "NOT_ACCOUNT_OWNER")
    err = failure(
        lambda: stack.accounts.ListAccounts(
            account_pb2.ListAccountsRequest(owner=alice.name), metadata=mallory.md
        )
    )
    assert err.code == Code.PERMISSION_DENIED
    err = failure(
        lambda: stack.accounts.CloseAccount(
            account_pb2.CloseAccountRequest(request_id="c", account_id=account_id),
            metadata=mallory.md,
        )
    )
    assert err.code == Code.PERMISSION_DENIED
    err = failure(lambda: create(stack, mallory, overdraft_limit_minor=100))
    assert (err.code, err.reason) == (Code.PERMISSION_DENIED, "INSUFFICIENT_SCOPE")


def test_partner_scopes_are_enforced(stack: Stack) -> None:
    reader, _, _ = stack.partner(frozenset({"accounts.read"}))
    err = failure(lambda: create(stack, reader))
    assert (err.code, err.reason) == (Code.PERMISSION_DENIED, "INSUFFICIENT_SCOPE")
    assert err.metadata["required_scope"] == "accounts.write"
    listed = stack.accounts.ListAccounts(account_pb2.ListAccountsRequest(), metadata=reader.md)
    assert list(listed.accounts) == []


def test_bounded_staleness_reads(stack: Stack) -> None:
    from google.protobuf.duration_pb2 import Duration

    alice = stack.user()
    account_id = create(stack, alice).account.account_id
    reply = stack.accounts.GetAccount(
        account_pb2.GetAccountRequest(
            account_id=account_id,
            consistency=account_pb2.READ_CONSISTENCY_BOUNDED_STALENESS,
            max_staleness=Duration(seconds=5),
        ),
        metadata=alice.md,
    )
    assert reply.account.account_id == account_id
    assert reply.staleness.ToTimedelta().total_seconds() == 0  # read on a primary
    err = failure(
        lambda: stack.accounts.GetAccount(
            account_pb2.GetAccountRequest(
                account_id=account_id,
                consistency=account_pb2.READ_CONSISTENCY_BOUNDED_STALENESS,
                max_staleness=Duration(seconds=3600),
            ),
            metadata=alice.md,
        )
    )
    assert set(err.field_violations) == {"max_staleness"}
    err = failure(
        lambda: stack.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id=account_id, max_staleness=Duration(seconds=1)),
            metadata=alice.md,
        )
    )
    assert set(err.field_violations) == {"max_staleness"}
