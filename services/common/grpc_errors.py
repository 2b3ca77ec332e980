"""Translation of domain errors into ``google.rpc.Status`` with details.

This is the only place that decides which gRPC code an error becomes. Anything that
is not a ``DomainError`` is logged with its stack and reported as INTERNAL without
leaking its text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors

log = logging.getLogger(__name__)

_CODES: dict[type[errors.DomainError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.Unavailable: code_pb2.UNAVAILABLE,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(err: errors.DomainError) -> grpc.Status:
    """Build the rich status (code, message, details) for a domain error."""
    code = next(c for cls, c in _CODES.items() if isinstance(err, cls))
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=err.reason, domain=errors.ERROR_DOMAIN, metadata=err.metadata
            )
        )
    ]
    if isinstance(err, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in err.violations
                    ]
                )
            )
        )
    elif isinstance(err, errors.NotFound):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=err.resource_type, resource_name=err.resource_name
                )
            )
        )
    elif isinstance(err, errors.FailedPrecondition):
        details.append(
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=err.reason,
                            subject=err.metadata.get("subject", ""),
                            description=err.message,
                        )
                    ]
                )
            )
        )
    elif isinstance(err, errors.Unavailable):
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay={"nanos": 200_000_000})))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=err.message, details=details)
    )
    return status


def abort(context: grpc.ServicerContext, err: errors.DomainError) -> NoReturn:
    context.abort_with_status(to_status(err))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


F = TypeVar("F", bound=Callable[..., Any])


def translate_errors(method: F) -> F:
    """Decorate a servicer method so domain errors become rich gRPC statuses."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except errors.DomainError as err:
            abort(context, err)
        except Exception:
            # abort() itself raises a plain Exception to unwind the handler: re-raise it.
            if context.code() is not None:  # type: ignore[attr-defined]
                raise
            log.exception("unhandled error in %s", method.__qualname__)
            context.abort_with_status(
                rpc_status.to_status(
                    status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
                )
            )

    return wrapper  # type: ignore[return-value]
