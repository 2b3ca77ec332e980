"""The service and operator commands as real processes: config checks, SIGTERM, principals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.integration.conftest import KEY_PASSPHRASE, Stack
from tests.support import free_port

MESHBANK = str(Path(sys.executable).parent / "meshbank")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHBANK_")}
    env.update(extra)
    return env


def test_serve_refuses_to_start_without_its_configuration() -> None:
    out = subprocess.run(
        [MESHBANK, "serve", "auth"],
        env=clean_env(MESHBANK_LISTEN_ADDRESS="nowhere", MESHBANK_GRPC_WORKERS="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    for name in (
        "MESHBANK_DATABASE_URL",
        "MESHBANK_KEY_PASSPHRASE",
        "MESHBANK_LISTEN_ADDRESS",
        "MESHBANK_GRPC_WORKERS",
    ):
        assert name in out.stderr


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="meshbank.auth.v1.AuthService"), timeout=2
        )
    return int(reply.status)


def test_serve_shuts_down_gracefully_on_sigterm(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Its log goes to a file: a pipe nobody reads until the end would block the process
    # on a full buffer (64 KiB of log lines) and look like a hung shutdown.
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [MESHBANK, "serve", "auth"],
        env=clean_env(
            MESHBANK_DATABASE_URL=database_url,
            MESHBANK_KEY_PASSPHRASE=KEY_PASSPHRASE,
            MESHBANK_LISTEN_ADDRESS=address,
            MESHBANK_SHUTDOWN_GRACE_SECONDS="5",
        ),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if health(address) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the service never became healthy"
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        with grpc.insecure_channel(address) as channel:
            jwks = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest())
        assert jwks.keys
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("no exit 30 s after SIGTERM; its log:\n" + log_path.read_text()[-5000:])
        assert code == 0, log_path.read_text()[-5000:]
        assert "SIGTERM" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The port is free again: nothing was left holding it. SO_REUSEADDR: the server's
    # side of a connection it closed may sit in TIME_WAIT on this port, which fails a
    # plain bind though no process holds the port; a listener still fails it.
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_operators_create_users_and_partners(stack: Stack, database_url: str) -> None:
    env = clean_env(MESHBANK_DATABASE_URL=database_url)
    username = stack.unique("cli")
    made = subprocess.run(
        [MESHBANK, "users", "create", username],
        input="a long enough password\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    stack.auth.Login(auth_pb2.LoginRequest(username=username, password="a long enough password"))

    short = subprocess.run(
        [MESHBANK, "users", "create", stack.unique("cli")],
        input="short\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 1
    assert "password" in short.stderr

    partner = subprocess.run(
        [MESHBANK, "partners", "create", stack.unique("acme"), "--scopes", "accounts.read"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert partner.returncode == 0, partner.stderr
    fields = dict(
        line.split(":", 1) for line in partner.stdout.splitlines() if line.startswith("client_")
    )
    client_id, secret = fields["client_id"].strip(), fields["client_secret"].strip()
    token = stack.auth.IssueClientToken(
        auth_pb2.IssueClientTokenRequest(client_id=client_id, client_secret=secret)
    )
    assert list(token.scopes) == ["accounts.read"]
    assert secret.encode() not in _dump_partners(database_url)


def _dump_partners(database_url: str) -> bytes:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM partners")).all()
    finally:
        engine.dispose()
    return repr(rows).encode()
