"""Who is calling: the authenticated principal and the scopes its token carries."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from services.common import errors


class Scope(StrEnum):
    """OAuth scopes understood by the account and transfer services."""

    ACCOUNTS_READ = "accounts.read"
    ACCOUNTS_WRITE = "accounts.write"
    ACCOUNTS_ADMIN = "accounts.admin"
    TRANSFERS_READ = "transfers.read"
    TRANSFERS_WRITE = "transfers.write"


ALL_SCOPES = frozenset(s.value for s in Scope)
# A user acts for itself: everything but administration.
USER_SCOPES = frozenset(ALL_SCOPES - {Scope.ACCOUNTS_ADMIN.value})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller, named ``users/{username}`` or ``partners/{client_id}``."""

    name: str
    scopes: frozenset[str]

    @property
    def is_partner(self) -> bool:
        return self.name.startswith("partners/")

    def has(self, scope: Scope) -> bool:
        return scope.value in self.scopes

    def require(self, scope: Scope) -> None:
        """Raise PermissionDenied unless the token carries ``scope``."""
        if not self.has(scope):
            raise errors.PermissionDenied(
                f"the token lacks the {scope.value!r} scope",
                reason="INSUFFICIENT_SCOPE",
                metadata={"required_scope": scope.value},
            )
