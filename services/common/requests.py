"""Helpers that turn an incoming proto request into an idempotency key."""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from services.ledger.handlers import RequestKey


def request_key(method: str, request: Message) -> RequestKey:
    """Key a mutating request by its request_id and a digest of everything else in it.

    Deterministic serialization makes equal requests hash equally; the request_id
    itself is left out so the fingerprint describes what the request *does*.
    """
    body = type(request)()
    body.CopyFrom(request)
    request_id: str = getattr(request, "request_id")  # noqa: B009 - every mutating request has it
    body.ClearField("request_id")
    digest = hashlib.sha256(method.encode() + b"\0" + body.SerializeToString(deterministic=True))
    return RequestKey(request_id=request_id, method=method, fingerprint=digest.digest())
