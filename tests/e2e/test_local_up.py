"""`meshbank up --detach` / `status` / `down` as a person runs them, with real processes.

The state folder and ports are the test's own; whatever happens, the finalizer runs
`meshbank down` and kills anything the status file still lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

VENV_BIN = Path(sys.executable).parent
MESHBANK = str(VENV_BIN / "meshbank")
GRPCURL = str(VENV_BIN / "grpcurl")


def _ports_free(base: int) -> bool:
    for port in (base + 32, base + 51, base + 52, base + 53):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture(scope="module")
def deployment() -> Iterator[dict[str, Any]]:
    state = Path(tempfile.mkdtemp(prefix="meshbank-e2e-"))
    state.chmod(0o755)
    base = next(
        b for b in (random.randrange(20000, 30000, 100) for _ in range(50)) if _ports_free(b)
    )
    env = dict(os.environ, MESHBANK_STATE_DIR=str(state / "state"), MESHBANK_BASE_PORT=str(base))
    try:
        up = subprocess.run(
            [MESHBANK, "up", "--detach"], env=env, capture_output=True, text=True, timeout=180
        )
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"env": env, "state": state / "state", "up": up.stdout}
    finally:
        subprocess.run([MESHBANK, "down"], env=env, capture_output=True, timeout=120)
        status = state / "state" / "status.json"
        if status.exists():
            for proc in json.loads(status.read_text())["processes"]:
                if proc.get("pid"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc["pid"], signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)


def status(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [MESHBANK, "status", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def grpcurl(address: str, method: str, body: dict[str, Any], token: str | None = None) -> Any:
    args = [GRPCURL, "-plaintext", "-d", json.dumps(body)]
    if token:
        args += ["-H", f"authorization: Bearer {token}"]
    out = subprocess.run([*args, address, method], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_up_runs_everything_healthy(deployment: dict[str, Any]) -> None:
    st = status(deployment["env"])
    assert st["phase"] == "running"
    roles = {(p["role"], p["service"]) for p in st["processes"]}
    assert roles == {
        ("db", "postgres"),
        ("service", "auth"),
        ("service", "account"),
        ("service", "transfer"),
    }
    assert all(p["healthy"] for p in st["processes"])
    assert "grpcurl" in deployment["up"]
    assert "meshbank down" in deployment["up"]


def test_reflection_lists_the_three_services(deployment: dict[str, Any]) -> None:
    ep = status(deployment["env"])["endpoints"]
    listed = set()
    for name in ("auth_grpc", "account_grpc", "transfer_grpc"):
        out = subprocess.run(
            [GRPCURL, "-plaintext", ep[name], "list"], capture_output=True, text=True, timeout=30
        )
        listed |= set(out.stdout.split())
    assert {
        "meshbank.auth.v1.AuthService",
        "meshbank.account.v1.AccountService",
        "meshbank.transfer.v1.TransferService",
        "grpc.health.v1.Health",
    } <= listed


def test_a_grpcurl_transfer_shows_in_get_and_list_with_balances_moved(
    deployment: dict[str, Any],
) -> None:
    ep = status(deployment["env"])["endpoints"]
    secret = json.loads((deployment["state"] / "secrets.json").read_text())
    token = grpcurl(
        ep["auth_grpc"],
        "meshbank.auth.v1.AuthService/Login",
        {"username": "demo", "password": secret["demo_password"]},
    )["access_token"]
    checking, savings = secret["demo_checking"], secret["demo_savings"]

    def balance(account_id: str) -> int:
        reply = grpcurl(
            ep["account_grpc"],
            "meshbank.account.v1.AccountService/GetAccount",
            {"account_id": account_id},
            token,
        )
        return int(reply["account"].get("balance_minor", "0"))

    before = balance(checking), balance(savings)
    created = grpcurl(
        ep["transfer_grpc"],
        "meshbank.transfer.v1.TransferService/CreateTransfer",
        {
            "request_id": "e2e-1",
            "source_account_id": checking,
            "destination_account_id": savings,
            "amount_minor": "2500",
            "currency_code": "USD",
        },
        token,
    )["transfer"]
    got = grpcurl(
        ep["transfer_grpc"],
        "meshbank.transfer.v1.TransferService/GetTransfer",
        {"transfer_id": created["transfer_id"]},
        token,
    )["transfer"]
    assert got == created
    listed = grpcurl(
        ep["transfer_grpc"],
        "meshbank.transfer.v1.TransferService/ListTransfers",
        {"account_id": checking},
        token,
    )["transfers"]
    assert listed[0]["transfer_id"] == created["transfer_id"]
    assert (balance(checking), balance(savings)) == (before[0] - 2500, before[1] + 2500)


def test_supervisor_restarts_a_crashed_service(deployment: dict[str, Any]) -> None:
    import time

    env = deployment["env"]
    victim = next(p for p in status(env)["processes"] if p["service"] == "transfer")
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = next(p for p in status(env)["processes"] if p["service"] == "transfer")
        if now["pid"] != victim["pid"] and now["healthy"]:
            return
        time.sleep(0.5)
    raise AssertionError("the transfer service was not restarted")


def test_down_then_up_reuses_the_data(deployment: dict[str, Any]) -> None:
    env = deployment["env"]
    pids = [p["pid"] for p in status(env)["processes"]]
    down = subprocess.run([MESHBANK, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0
    assert status(env)["phase"] == "stopped"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    secret_before = json.loads((deployment["state"] / "secrets.json").read_text())
    up = subprocess.run(
        [MESHBANK, "up", "--detach"], env=env, capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stderr
    secret_after = json.loads((deployment["state"] / "secrets.json").read_text())
    assert secret_after["demo_checking"] == secret_before["demo_checking"]
