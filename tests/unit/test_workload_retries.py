"""The clients' retry helpers: re-send on retryable gRPC statuses, give up otherwise."""

from __future__ import annotations

import grpc
import pytest

from regions.workload import call_retrying, retry_same_request


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_retry_same_request_stops_at_the_first_final_result() -> None:
    results = iter([1, 1, 2, 1])
    delays: list[float] = []
    got = retry_same_request(
        lambda: next(results), lambda r: r == 1, window=60, sleep=delays.append
    )
    assert got == [1, 1, 2]
    assert delays == [0.05, 0.1]  # exponential backoff from first_delay


def test_retry_same_request_gives_up_after_max_attempts() -> None:
    got = retry_same_request(
        lambda: 1, lambda r: r == 1, window=60, max_attempts=3, sleep=lambda _: None
    )
    assert got == [1, 1, 1]


def test_call_retrying_re_sends_on_retryable_statuses() -> None:
    answers: list[object] = [
        Refused(grpc.StatusCode.UNAVAILABLE),
        Refused(grpc.StatusCode.DEADLINE_EXCEEDED),
        "ok",
    ]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Refused):
            raise answer
        return str(answer)

    assert call_retrying(call, window=30) == "ok"
    assert answers == []


def test_call_retrying_raises_a_final_status_at_once() -> None:
    calls = 0

    def call() -> str:
        nonlocal calls
        calls += 1
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(Refused) as caught:
        call_retrying(call, window=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert calls == 1
