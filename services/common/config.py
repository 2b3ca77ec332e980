"""Service configuration, read once from the environment at start-up and validated.

Nothing has a default that is a secret: a missing secret stops the process with the
name of the variable. Every problem is reported at once, not one per restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_TOKEN_ISSUER = "meshbank-auth"  # noqa: S105 - a name, not a secret
DEFAULT_TOKEN_AUDIENCE = "meshbank-api"  # noqa: S105 - a name, not a secret


def token_identity(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The (issuer, audience) of access tokens: the auth service signs them, the services
    and the edges (``jwt_authn``) check them; one source so they cannot disagree."""
    env = os.environ if env is None else env
    return (
        env.get("MESHBANK_TOKEN_ISSUER") or DEFAULT_TOKEN_ISSUER,
        env.get("MESHBANK_TOKEN_AUDIENCE") or DEFAULT_TOKEN_AUDIENCE,
    )


class ConfigError(Exception):
    """The environment does not describe a runnable service; the message lists why."""


@dataclass(frozen=True)
class ServiceConfig:
    database_url: str
    read_database_url: str | None
    listen_address: str
    token_issuer: str
    token_audience: str
    key_passphrase: str | None
    db_pool_size: int
    grpc_workers: int
    shutdown_grace_seconds: float
    instance_id: str
    region: str = ""
    # Where /metrics is served (host:port); None serves none (tests, one-off commands).
    metrics_address: str | None = None


def _int(
    env: Mapping[str, str], name: str, default: int, problems: list[str], lo: int, hi: int
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not an integer")
        return default
    if not lo <= value <= hi:
        problems.append(f"{name}={value} must be between {lo} and {hi}")
    return value


def _metrics_address(env: Mapping[str, str], problems: list[str]) -> str | None:
    value = env.get("MESHBANK_METRICS_ADDRESS") or None
    if value is not None:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            problems.append(f"MESHBANK_METRICS_ADDRESS={value!r} must be host:port (port 0 = any)")
    return value


def _listen(env: Mapping[str, str], problems: list[str]) -> str:
    value = env.get("MESHBANK_LISTEN_ADDRESS", "127.0.0.1:50051")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.append(f"MESHBANK_LISTEN_ADDRESS={value!r} must be host:port (port 0 = any)")
    return value


def load(
    env: Mapping[str, str] | None = None, *, needs_key_passphrase: bool = False
) -> ServiceConfig:
    """Build the configuration from ``env`` (default: ``os.environ``) or raise ConfigError."""
    env = os.environ if env is None else env
    problems: list[str] = []
    database_url = env.get("MESHBANK_DATABASE_URL", "")
    if not database_url:
        problems.append(
            "MESHBANK_DATABASE_URL is not set "
            "(e.g. postgresql+psycopg://meshbank@127.0.0.1:55432/meshbank)"
        )
    elif not database_url.startswith(("postgresql+psycopg://", "cockroachdb+psycopg://")):
        problems.append(
            "MESHBANK_DATABASE_URL must use postgresql+psycopg:// or cockroachdb+psycopg://"
        )
    passphrase = env.get("MESHBANK_KEY_PASSPHRASE") or None
    if needs_key_passphrase:
        if passphrase is None:
            problems.append(
                "MESHBANK_KEY_PASSPHRASE is not set (it encrypts the token signing keys)"
            )
        elif len(passphrase) < 16:
            problems.append("MESHBANK_KEY_PASSPHRASE must be at least 16 characters")
    read_url = env.get("MESHBANK_DATABASE_READ_URL") or None
    if read_url and not read_url.startswith(("postgresql+psycopg://", "cockroachdb+psycopg://")):
        problems.append(
            "MESHBANK_DATABASE_READ_URL must use postgresql+psycopg:// or cockroachdb+psycopg://"
        )
    config = ServiceConfig(
        database_url=database_url,
        read_database_url=read_url,
        listen_address=_listen(env, problems),
        token_issuer=token_identity(env)[0],
        token_audience=token_identity(env)[1],
        key_passphrase=passphrase,
        db_pool_size=_int(env, "MESHBANK_DB_POOL_SIZE", 10, problems, 1, 200),
        grpc_workers=_int(env, "MESHBANK_GRPC_WORKERS", 16, problems, 1, 256),
        shutdown_grace_seconds=_int(env, "MESHBANK_SHUTDOWN_GRACE_SECONDS", 10, problems, 0, 300),
        instance_id=env.get("MESHBANK_INSTANCE_ID", f"{os.uname().nodename}-{os.getpid()}"),
        region=env.get("MESHBANK_REGION", ""),
        metrics_address=_metrics_address(env, problems),
    )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config
