"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

T = TypeVar("T")


def free_port() -> int:
    """A port that was free a moment ago (callers retry if it is taken meanwhile)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class RpcFailure:
    """A failed call's code and decoded ``google.rpc.Status`` details."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    field_violations: dict[str, str]
    metadata: dict[str, str]


def failure(call: Callable[[], Any]) -> RpcFailure:
    """Run ``call``, which must fail, and decode its rich status."""
    try:
        call()
    except grpc.RpcError as err:
        status = rpc_status.from_call(err)
        reason = None
        violations: dict[str, str] = {}
        metadata: dict[str, str] = {}
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    metadata = dict(info.metadata)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations = {v.field: v.description for v in bad.field_violations}
        return RpcFailure(err.code(), err.details() or "", reason, violations, metadata)
    raise AssertionError("the call succeeded but was expected to fail")
