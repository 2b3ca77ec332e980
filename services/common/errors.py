"""Errors the domain raises, free of gRPC: the servicers translate them to statuses.

Each class maps to exactly one gRPC code (see ``services.common.grpc_errors``); the
``reason`` strings are stable, machine-readable values that clients may switch on
(they travel as ``google.rpc.ErrorInfo.reason``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ERROR_DOMAIN = "meshbank.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, named by its proto field path."""

    field: str
    description: str


class DomainError(Exception):
    """Base class: an expected failure with a stable reason and a safe message."""

    reason: str = "UNSPECIFIED"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    """The request is malformed; ``violations`` says which fields and why."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}")
        self.violations = violations


class NotFound(DomainError):
    """The named resource does not exist."""

    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str) -> None:
        super().__init__(f"{resource_type} {resource_name!r} not found")
        self.resource_type = resource_type
        self.resource_name = resource_name


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the operation (a ledger rule said no)."""


class AlreadyExists(DomainError):
    """The thing the caller tried to create (or the request id it reused) already exists."""


class Unauthenticated(DomainError):
    """No credentials, or credentials that do not verify."""


class PermissionDenied(DomainError):
    """Valid credentials that do not allow this operation on this resource."""


class Unavailable(DomainError):
    """A dependency is down or the transaction could not be completed; safe to retry."""


@dataclass(frozen=True)
class Violations:
    """Collects field violations so a request reports every bad field at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_name: str, description: str) -> None:
        self.items.append(FieldViolation(field_name, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(list(self.items))
