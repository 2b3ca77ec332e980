"""Clients of the public endpoints (the global entry and the edges): TLS only.

Every tool, benchmark and test that calls meshbank the way a partner does builds its
connection here, so that all of them verify the server the same way: against the CA
file of the deployment (``meshbank status --json``: ``endpoints.ca_cert``; the local
CA by default, ``edge.tls.ca_file`` with one's own certificate) and by the host name or
address in the target, exactly as ``curl --cacert`` or ``grpcurl -cacert`` would.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]


def ca_file(status: Mapping[str, Any]) -> Path:
    """The CA file a deployment's ``status.json`` names for its public endpoints."""
    try:
        return Path(status["endpoints"]["ca_cert"])
    except (KeyError, TypeError):
        raise ValueError("the status has no endpoints.ca_cert: is meshbank running?") from None


def _read_ca(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the CA file {path}: {exc.strerror}") from None


def credentials(ca: Path | str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read_ca(ca))


def grpc_channel(target: str, ca: Path | str, options: ChannelOptions = ()) -> grpc.Channel:
    """A TLS channel to ``target`` (``host:port``), verifying the server against ``ca``."""
    return grpc.secure_channel(target, credentials(ca), options=list(options))


def ssl_context(ca: Path | str) -> ssl.SSLContext:
    """An HTTPS client context verifying the server against ``ca`` (TLS 1.2 or newer)."""
    context = ssl.create_default_context(cadata=_read_ca(ca).decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def url(target: str) -> str:
    """The HTTPS base URL of a public endpoint ``host:port``."""
    return f"https://{target}"


def urlopen(request: urllib.request.Request | str, ca: Path | str, timeout: float) -> Any:
    """``urllib.request.urlopen`` over TLS verified against ``ca`` (HTTPError as usual)."""
    return urllib.request.urlopen(request, timeout=timeout, context=ssl_context(ca))  # noqa: S310
