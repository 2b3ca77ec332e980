"""The AuthService gRPC servicer: proto <-> use cases, nothing else.

Validation, credentials and token rules live in ``services.auth.handlers``; domain errors
become rich statuses through ``translate_errors``.
"""

from __future__ import annotations

import grpc

from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.handlers import AuthService
from services.common.grpc_errors import translate_errors

TOKEN_TYPE = "Bearer"  # noqa: S105 - the OAuth token type, not a secret

_JWK_FIELDS = ("kty", "crv", "x", "kid", "alg", "use")


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth: AuthService) -> None:
        self._auth = auth

    @translate_errors
    def Login(
        self,
        request: auth_pb2.LoginRequest,
        context: grpc.ServicerContext,
    ) -> auth_pb2.LoginResponse:
        grant = self._auth.login(request.username, request.password)
        return auth_pb2.LoginResponse(
            access_token=grant.access_token,
            token_type=TOKEN_TYPE,
            expires_in_seconds=grant.expires_in_seconds,
            refresh_token=grant.refresh_token or "",
            scopes=grant.scopes,
        )

    @translate_errors
    def IssueClientToken(
        self,
        request: auth_pb2.IssueClientTokenRequest,
        context: grpc.ServicerContext,
    ) -> auth_pb2.IssueClientTokenResponse:
        grant = self._auth.issue_client_token(
            request.client_id, request.client_secret, request.scopes
        )
        return auth_pb2.IssueClientTokenResponse(
            access_token=grant.access_token,
            token_type=TOKEN_TYPE,
            expires_in_seconds=grant.expires_in_seconds,
            scopes=grant.scopes,
        )

    @translate_errors
    def RefreshToken(
        self,
        request: auth_pb2.RefreshTokenRequest,
        context: grpc.ServicerContext,
    ) -> auth_pb2.RefreshTokenResponse:
        grant = self._auth.refresh(request.refresh_token)
        return auth_pb2.RefreshTokenResponse(
            access_token=grant.access_token,
            token_type=TOKEN_TYPE,
            expires_in_seconds=grant.expires_in_seconds,
            refresh_token=grant.refresh_token or "",
            scopes=grant.scopes,
        )

    @translate_errors
    def RevokeToken(
        self,
        request: auth_pb2.RevokeTokenRequest,
        context: grpc.ServicerContext,
    ) -> auth_pb2.RevokeTokenResponse:
        self._auth.revoke(request.token)
        return auth_pb2.RevokeTokenResponse()

    @translate_errors
    def GetJwks(
        self,
        request: auth_pb2.GetJwksRequest,
        context: grpc.ServicerContext,
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(
            keys=[
                auth_pb2.JsonWebKey(**{f: jwk.get(f, "") for f in _JWK_FIELDS})
                for jwk in self._auth.jwks()
            ]
        )
