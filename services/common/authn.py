"""Bearer-token authentication of incoming RPCs (every account and transfer call)."""

from __future__ import annotations

from typing import Protocol

import grpc

from services.common import errors
from services.common.principal import Principal


class Verifier(Protocol):
    def verify(self, token: str) -> Principal: ...


def bearer_token(context: grpc.ServicerContext) -> str:
    """The token of the ``authorization: Bearer ...`` metadata, or raise UNAUTHENTICATED."""
    for key, value in context.invocation_metadata():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.Unauthenticated(
                    "the authorization metadata must be 'Bearer <access token>'",
                    reason="MALFORMED_AUTHORIZATION",
                )
            return token.strip()
    raise errors.Unauthenticated(
        "this call needs an access token in the authorization metadata",
        reason="TOKEN_MISSING",
    )


def authenticate(context: grpc.ServicerContext, verifier: Verifier) -> Principal:
    return verifier.verify(bearer_token(context))
