"""TransferService over gRPC: translates protos to ledger use cases and back, nothing more."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from services.common import pagination, validation
from services.common.authn import Verifier, authenticate
from services.common.errors import Violations
from services.common.grpc_errors import translate_errors
from services.common.requests import request_key
from services.ledger.handlers import LedgerService, MoveMoney
from services.ledger.model import Transfer


def to_proto(transfer: Transfer) -> transfer_pb2.Transfer:
    created = Timestamp()
    created.FromDatetime(transfer.created_at)
    return transfer_pb2.Transfer(
        transfer_id=str(transfer.transfer_id),
        request_id=transfer.request_id,
        source_account_id=str(transfer.source_account_id),
        destination_account_id=str(transfer.destination_account_id),
        amount_minor=transfer.amount_minor,
        currency_code=transfer.currency_code,
        description=transfer.description,
        state=transfer_pb2.TRANSFER_STATE_POSTED,
        initiated_by=transfer.initiated_by,
        create_time=created,
        entries=[
            transfer_pb2.LedgerEntry(
                account_id=str(e.account_id),
                amount_minor=e.amount_minor,
                currency_code=e.currency_code,
            )
            for e in transfer.entries
        ],
    )


class TransferServicer(transfer_pb2_grpc.TransferServiceServicer):
    def __init__(self, ledger: LedgerService, verifier: Verifier) -> None:
        self._ledger = ledger
        self._verifier = verifier

    @translate_errors
    def CreateTransfer(
        self, request: transfer_pb2.CreateTransferRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.CreateTransferResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        validation.check_request_id(v, request.request_id)
        source = validation.parse_uuid(v, "source_account_id", request.source_account_id)
        destination = validation.parse_uuid(
            v, "destination_account_id", request.destination_account_id
        )
        if request.amount_minor <= 0:
            v.add("amount_minor", "must be a positive number of minor units")
        validation.check_currency(v, request.currency_code)
        validation.check_text(v, "description", request.description, 500)
        if request.source_account_id and request.source_account_id == (
            request.destination_account_id
        ):
            v.add("destination_account_id", "must differ from source_account_id")
        v.raise_if_any()
        outcome = self._ledger.create_transfer(
            principal,
            MoveMoney(
                source_account_id=source,
                destination_account_id=destination,
                amount_minor=request.amount_minor,
                currency_code=request.currency_code,
                description=request.description,
            ),
            request_key("CreateTransfer", request),
            lambda t: transfer_pb2.CreateTransferResponse(transfer=to_proto(t)).SerializeToString(),
        )
        return transfer_pb2.CreateTransferResponse.FromString(outcome.response)

    @translate_errors
    def GetTransfer(
        self, request: transfer_pb2.GetTransferRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.GetTransferResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        transfer_id = validation.parse_uuid(v, "transfer_id", request.transfer_id)
        v.raise_if_any()
        return transfer_pb2.GetTransferResponse(
            transfer=to_proto(self._ledger.get_transfer(principal, transfer_id))
        )

    @translate_errors
    def ListTransfers(
        self, request: transfer_pb2.ListTransfersRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.ListTransfersResponse:
        principal = authenticate(context, self._verifier)
        v = Violations()
        account_id = validation.parse_uuid(v, "account_id", request.account_id)
        size = validation.page_size(v, request.page_size)
        query = f"transfers?account={account_id}"
        before = pagination.decode(v, request.page_token, query)
        v.raise_if_any()
        page = self._ledger.list_transfers(principal, account_id, before, size)
        return transfer_pb2.ListTransfersResponse(
            transfers=[to_proto(t) for t in page.items],
            next_page_token=pagination.encode(page.next_cursor, query),
        )
