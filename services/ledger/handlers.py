"""The ledger's use cases: authorization, idempotency and the ledger rules, in one place.

Each mutating use case runs inside one transaction that applies the effect and stores
the response under the caller's request_id, unless that request_id is already stored:
then it is a replay, the effect is rolled back and the stored bytes are the answer (the
same request_id with another request fails). See ``LedgerService._idempotent`` for why
the key is looked up after the effect, not before.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from services.common import errors
from services.common.principal import Principal, Scope
from services.ledger.model import Account, AccountState, Transfer, post_transfer
from services.ledger.ports import (
    Cursor,
    LedgerEvents,
    LedgerUnitOfWork,
    NoEvents,
    StoredResponse,
    TransactionRunner,
)

Clock = Callable[[], datetime]
IdFactory = Callable[[], uuid.UUID]


@dataclass(frozen=True)
class RequestKey:
    """An AIP-155 request id with the fingerprint of the request it came with."""

    request_id: str
    method: str
    fingerprint: bytes


@dataclass(frozen=True)
class Outcome:
    """The serialized response and whether it was replayed from an earlier request."""

    response: bytes
    replayed: bool


@dataclass(frozen=True)
class OpenAccount:
    owner: str
    display_name: str
    currency_code: str
    overdraft_limit_minor: int


@dataclass(frozen=True)
class MoveMoney:
    source_account_id: uuid.UUID
    destination_account_id: uuid.UUID
    amount_minor: int
    currency_code: str
    description: str


ItemT = TypeVar("ItemT")


@dataclass(frozen=True)
class Page(Generic[ItemT]):
    items: list[ItemT]
    next_cursor: Cursor | None


class _Replay(Exception):
    """A request_id that is already stored: roll back the effect, answer ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("replay")
        self.outcome = outcome


def _replay_of(stored: StoredResponse, key: RequestKey) -> Outcome:
    if stored.method != key.method or stored.fingerprint != key.fingerprint:
        raise errors.AlreadyExists(
            "this request_id was already used for a different request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": key.request_id},
        )
    return Outcome(stored.response, replayed=True)


def _not_owner(principal: Principal, account: Account) -> errors.PermissionDenied:
    return errors.PermissionDenied(
        f"{principal.name} does not own account {account.account_id}",
        reason="NOT_ACCOUNT_OWNER",
        metadata={"account_id": str(account.account_id)},
    )


def _owns_or_admin(principal: Principal, account: Account) -> bool:
    return account.owner == principal.name or principal.has(Scope.ACCOUNTS_ADMIN)


class LedgerService:
    """Use cases of the account and transfer services."""

    def __init__(
        self,
        run: TransactionRunner,
        *,
        read_replica: TransactionRunner | None = None,
        region: str = "",
        clock: Clock = lambda: datetime.now(UTC),
        new_id: IdFactory = uuid.uuid4,
        events: LedgerEvents | None = None,
    ) -> None:
        self._run = run
        self._events: LedgerEvents = events or NoEvents()
        self._read_replica = read_replica
        self._region = region
        self._clock = clock
        self._new_id = new_id

    # -- idempotency -----------------------------------------------------------------

    @staticmethod
    def _idempotent(
        uow: LedgerUnitOfWork, principal: Principal, key: RequestKey, effect: Callable[[], bytes]
    ) -> Outcome:
        """Apply ``effect`` and store its response under ``key``, unless ``key`` is stored.

        The effect runs first, and the key is stored with an insert that does nothing
        if the key exists. A lookup comes only when one is needed: when the insert found
        the key, or when the effect refused the request (a replay of a request that
        succeeded answers as it did, even if the request would be refused now). Looking
        the key up first, on every request, made concurrent requests fail each other
        under SERIALIZABLE: a lookup that finds nothing locks the index page (SSI's
        predicate lock), every concurrent insert of a key into that page conflicts with
        it, and two such requests abort one of the two (measured in docs/benchmarks.md).

        A replay raises ``_Replay``, which rolls the effect back; ``_transact`` answers
        with the stored response.
        """
        try:
            response = effect()
        except errors.DomainError:
            stored = uow.idempotency.get(principal.name, key.request_id)
            if stored is None:
                raise
            raise _Replay(_replay_of(stored, key)) from None
        if uow.idempotency.add(
            principal.name, key.request_id, key.method, key.fingerprint, response
        ):
            return Outcome(response, replayed=False)
        stored = uow.idempotency.get(principal.name, key.request_id)
        if stored is None:  # the insert saw a key this transaction's snapshot does not
            raise RuntimeError(f"request_id {key.request_id!r} is stored but not visible")
        raise _Replay(_replay_of(stored, key))

    def _transact(self, key: RequestKey, work: Callable[[LedgerUnitOfWork], Outcome]) -> Outcome:
        """Run a mutating use case's transaction; a replay answers with the stored response."""
        try:
            return self._run(work)
        except _Replay as replay:
            self._events.request_replayed(key.method)
            return replay.outcome

    # -- accounts --------------------------------------------------------------------

    def create_account(
        self,
        principal: Principal,
        cmd: OpenAccount,
        key: RequestKey,
        encode: Callable[[Account], bytes],
    ) -> Outcome:
        principal.require(Scope.ACCOUNTS_WRITE)
        owner = cmd.owner or principal.name
        if owner != principal.name or cmd.overdraft_limit_minor != 0:
            principal.require(Scope.ACCOUNTS_ADMIN)

        def work(uow: LedgerUnitOfWork) -> Outcome:
            def effect() -> bytes:
                if not uow.accounts.currency_exists(cmd.currency_code):
                    raise errors.InvalidArgument(
                        [errors.FieldViolation("currency_code", "is not a supported currency")]
                    )
                account = Account(
                    account_id=self._new_id(),
                    owner=owner,
                    display_name=cmd.display_name,
                    currency_code=cmd.currency_code,
                    balance_minor=0,
                    overdraft_limit_minor=cmd.overdraft_limit_minor,
                    state=AccountState.OPEN,
                    created_at=self._clock(),
                    home_region=self._region,
                )
                uow.accounts.add(account)
                return encode(account)

            return self._idempotent(uow, principal, key, effect)

        return self._transact(key, work)

    def get_account(
        self, principal: Principal, account_id: uuid.UUID, max_staleness: float | None = None
    ) -> tuple[Account, float]:
        """The account and an upper bound (seconds) on how stale it may be.

        With ``max_staleness`` set, the read goes to the region's replica when that is
        at most so far behind, and to the primary otherwise (or if the replica is down).
        """
        principal.require(Scope.ACCOUNTS_READ)
        found: tuple[Account | None, float] | None = None
        if max_staleness is not None and self._read_replica is not None:
            try:
                found = self._read_replica(
                    lambda uow: (uow.accounts.get(account_id), uow.staleness_seconds()),
                    readonly=True,
                )
            except errors.Unavailable:
                found = None
            if found is not None and found[1] > max_staleness:
                found = None
        if found is None:
            found = (self._run(lambda uow: uow.accounts.get(account_id), readonly=True), 0.0)
        account, staleness = found
        if account is None:
            raise errors.NotFound("account", str(account_id))
        if not _owns_or_admin(principal, account):
            raise _not_owner(principal, account)
        return account, staleness

    def list_accounts(
        self, principal: Principal, owner: str, after: Cursor | None, limit: int
    ) -> Page[Account]:
        principal.require(Scope.ACCOUNTS_READ)
        owner = owner or principal.name
        if owner != principal.name and not principal.has(Scope.ACCOUNTS_ADMIN):
            raise errors.PermissionDenied(
                f"{principal.name} may only list its own accounts",
                reason="NOT_ACCOUNT_OWNER",
                metadata={"owner": owner},
            )
        rows = self._run(
            lambda uow: uow.accounts.list_by_owner(owner, after, limit + 1), readonly=True
        )
        items = rows[:limit]
        more = len(rows) > limit
        return Page(items, (items[-1].created_at, items[-1].account_id) if more else None)

    def close_account(
        self,
        principal: Principal,
        account_id: uuid.UUID,
        key: RequestKey,
        encode: Callable[[Account], bytes],
    ) -> Outcome:
        principal.require(Scope.ACCOUNTS_WRITE)

        def work(uow: LedgerUnitOfWork) -> Outcome:
            def effect() -> bytes:
                account = uow.accounts.lock([account_id]).get(account_id)
                if account is None:
                    raise errors.NotFound("account", str(account_id))
                if not _owns_or_admin(principal, account):
                    raise _not_owner(principal, account)
                closed = account.close(self._clock())
                uow.accounts.save(closed)
                return encode(closed)

            return self._idempotent(uow, principal, key, effect)

        return self._transact(key, work)

    # -- transfers -------------------------------------------------------------------

    def create_transfer(
        self,
        principal: Principal,
        cmd: MoveMoney,
        key: RequestKey,
        encode: Callable[[Transfer], bytes],
    ) -> Outcome:
        principal.require(Scope.TRANSFERS_WRITE)

        def work(uow: LedgerUnitOfWork) -> Outcome:
            def effect() -> bytes:
                if cmd.source_account_id == cmd.destination_account_id:
                    raise errors.InvalidArgument(
                        [
                            errors.FieldViolation(
                                "destination_account_id", "must differ from source_account_id"
                            )
                        ]
                    )
                locked = uow.accounts.lock([cmd.source_account_id, cmd.destination_account_id])
                source = locked.get(cmd.source_account_id)
                destination = locked.get(cmd.destination_account_id)
                if source is None:
                    raise errors.NotFound("account", str(cmd.source_account_id))
                if destination is None:
                    raise errors.NotFound("account", str(cmd.destination_account_id))
                # Only the owner debits an account; anyone may pay into one.
                if source.owner != principal.name:
                    raise _not_owner(principal, source)
                posting = post_transfer(
                    transfer_id=self._new_id(),
                    request_id=key.request_id,
                    initiated_by=principal.name,
                    source=source,
                    destination=destination,
                    amount_minor=cmd.amount_minor,
                    currency_code=cmd.currency_code,
                    description=cmd.description,
                    now=self._clock(),
                    entry_ids=(self._new_id(), self._new_id()),
                )
                uow.transfers.add(posting.transfer)
                uow.accounts.save(posting.source, posting.destination)
                return encode(posting.transfer)

            return self._idempotent(uow, principal, key, effect)

        outcome = self._transact(key, work)
        if not outcome.replayed:
            self._events.transfer_committed(cmd.currency_code, cmd.amount_minor)
        return outcome

    def get_transfer(self, principal: Principal, transfer_id: uuid.UUID) -> Transfer:
        principal.require(Scope.TRANSFERS_READ)

        def work(uow: LedgerUnitOfWork) -> tuple[Transfer | None, list[Account]]:
            transfer = uow.transfers.get(transfer_id)
            if transfer is None:
                return None, []
            sides = [
                uow.accounts.get(transfer.source_account_id),
                uow.accounts.get(transfer.destination_account_id),
            ]
            return transfer, [a for a in sides if a is not None]

        transfer, sides = self._run(work, readonly=True)
        if transfer is None:
            raise errors.NotFound("transfer", str(transfer_id))
        if not any(_owns_or_admin(principal, a) for a in sides):
            raise errors.PermissionDenied(
                f"{principal.name} owns neither account of transfer {transfer_id}",
                reason="NOT_ACCOUNT_OWNER",
                metadata={"transfer_id": str(transfer_id)},
            )
        return transfer

    def list_transfers(
        self, principal: Principal, account_id: uuid.UUID, before: Cursor | None, limit: int
    ) -> Page[Transfer]:
        principal.require(Scope.TRANSFERS_READ)

        def work(uow: LedgerUnitOfWork) -> tuple[Account | None, list[Transfer]]:
            account = uow.accounts.get(account_id)
            if account is None or not _owns_or_admin(principal, account):
                return account, []
            return account, uow.transfers.list_for_account(account_id, before, limit + 1)

        account, rows = self._run(work, readonly=True)
        if account is None:
            raise errors.NotFound("account", str(account_id))
        if not _owns_or_admin(principal, account):
            raise _not_owner(principal, account)
        items = rows[:limit]
        more = len(rows) > limit
        return Page(items, (items[-1].created_at, items[-1].transfer_id) if more else None)
