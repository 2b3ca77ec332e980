"""AccountService over gRPC: translates protos to ledger use cases and back, nothing more."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from services.common import pagination, validation
from services.common.authn import Verifier, authenticate
from services.common.errors import Violations
from services.common.grpc_errors import translate_errors
from services.common.requests import request_key
from services.ledger.handlers import LedgerService, OpenAccount
from services.ledger.model import Account, AccountState

DEFAULT_MAX_STALENESS = 10.0
MAX_STALENESS = 60.0

_STATES = {
    AccountState.OPEN: account_pb2.ACCOUNT_STATE_OPEN,
    AccountState.CLOSED: account_pb2.ACCOUNT_STATE_CLOSED,
}


def to_proto(account: Account) -> account_pb2.Account:
    created = Timestamp()
    created.FromDatetime(account.created_at)
    message = account_pb2.Account(
        account_id=str(account.account_id),
        owner=account.owner,
        display_name=account.display_name,
        currency_code=account.currency_code,
        balance_minor=account.balance_minor,
        overdraft_limit_minor=account.overdraft_limit_minor,
        state=_STATES[account.state],
        create_time=created,
        home_region=account.home_region,
    )
    if account.closed_at is not None:
        message.close_time.FromDatetime(account.closed_at)
    return message


class AccountServicer(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, ledger: LedgerService, verifier: Verifier) -> None:
        self._ledger = ledger
        self._verifier = verifier

    @translate_errors
    def CreateAccount(
        self, request: account_pb2.CreateAccountRequest, context: grpc.ServicerContext
    ) -> account_pb2.CreateAccountResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        validation.check_request_id(v, request.request_id)
        validation.check_owner(v, "owner", request.owner)
        validation.check_currency(v, request.currency_code)
        validation.check_text(v, "display_name", request.display_name, 200)
        if request.overdraft_limit_minor < 0:
            v.add("overdraft_limit_minor", "must not be negative")
        v.raise_if_any()
        outcome = self._ledger.create_account(
            principal,
            OpenAccount(
                owner=request.owner,
                display_name=request.display_name,
                currency_code=request.currency_code,
                overdraft_limit_minor=request.overdraft_limit_minor,
            ),
            request_key("CreateAccount", request),
            lambda a: account_pb2.CreateAccountResponse(account=to_proto(a)).SerializeToString(),
        )
        return account_pb2.CreateAccountResponse.FromString(outcome.response)

    @translate_errors
    def GetAccount(
        self, request: account_pb2.GetAccountRequest, context: grpc.ServicerContext
    ) -> account_pb2.GetAccountResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        account_id = validation.parse_uuid(v, "account_id", request.account_id)
        max_staleness = None
        if request.consistency == account_pb2.READ_CONSISTENCY_BOUNDED_STALENESS:
            max_staleness = DEFAULT_MAX_STALENESS
            if request.HasField("max_staleness"):
                max_staleness = request.max_staleness.ToTimedelta().total_seconds()
                if not 0 < max_staleness <= MAX_STALENESS:
                    v.add("max_staleness", f"must be more than 0 s and at most {MAX_STALENESS} s")
        elif request.HasField("max_staleness"):
            v.add("max_staleness", "applies only to READ_CONSISTENCY_BOUNDED_STALENESS")
        if request.consistency not in account_pb2.ReadConsistency.values():
            v.add("consistency", "is not a known read consistency")
        v.raise_if_any()
        account, staleness = self._ledger.get_account(principal, account_id, max_staleness)
        reply = account_pb2.GetAccountResponse(account=to_proto(account))
        reply.staleness.FromTimedelta(timedelta(seconds=round(staleness, 3)))
        return reply

    @translate_errors
    def ListAccounts(
        self, request: account_pb2.ListAccountsRequest, context: grpc.ServicerContext
    ) -> account_pb2.ListAccountsResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        validation.check_owner(v, "owner", request.owner)
        size = validation.page_size(v, request.page_size)
        owner = request.owner or principal.name
        query = f"accounts?owner={owner}"
        after = pagination.decode(v, request.page_token, query)
        v.raise_if_any()
        page = self._ledger.list_accounts(principal, owner, after, size)
        return account_pb2.ListAccountsResponse(
            accounts=[to_proto(a) for a in page.items],
            next_page_token=pagination.encode(page.next_cursor, query),
        )

    @translate_errors
    def CloseAccount(
        self, request: account_pb2.CloseAccountRequest, context: grpc.ServicerContext
    ) -> account_pb2.CloseAccountResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        validation.check_request_id(v, request.request_id)
        account_id = validation.parse_uuid(v, "account_id", request.account_id)
        v.raise_if_any()
        outcome = self._ledger.close_account(
            principal,
            account_id,
            request_key("CloseAccount", request),
            lambda a: account_pb2.CloseAccountResponse(account=to_proto(a)).SerializeToString(),
        )
        return account_pb2.CloseAccountResponse.FromString(outcome.response)
