"""The multi-region mesh as a person runs it: real Envoys, real services, real PostgreSQL."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.e2e.conftest import VENV_BIN, Deployment
from tests.e2e.load import Load

ROLES = {"etcd", "db", "service", "sidecar", "edge", "global", "tracing", "auditor", "prometheus"}


def served_by(deployment: Deployment, address: str) -> str:
    with deployment.channel(address) as channel:
        _, call = auth_pb2_grpc.AuthServiceStub(channel).GetJwks.with_call(
            auth_pb2.GetJwksRequest(), timeout=10
        )
    return str(dict(call.initial_metadata())["x-meshbank-served-by"])


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_status_shows_every_region_healthy(deployment: Deployment) -> None:
    st = deployment.status()
    assert st["phase"] == "running"
    assert st["regions"] == ["us-east", "us-west", "eu-west"]
    assert {p["role"] for p in st["processes"]} == ROLES
    assert all(p["healthy"] and p["pid"] for p in st["processes"])
    services = [p for p in st["processes"] if p["role"] == "service"]
    assert len(services) == 18
    assert len([p for p in st["processes"] if p["role"] == "sidecar"]) == 18
    ep = st["endpoints"]
    assert ep["global_grpc"] == ep["global"]["us-east"]
    assert set(ep["edges"]) == set(ep["global"]) == set(st["regions"])
    for key in ("global_grpc", "global_rest"):
        host, port = ep[key].rsplit(":", 1)
        assert host == "127.0.0.1"
        assert port.isdigit()
    assert "curl" in deployment.up_output
    assert "grpcurl" in deployment.up_output


def test_calls_land_in_the_callers_nearest_region(deployment: Deployment) -> None:
    for location, address in deployment.status()["endpoints"]["global"].items():
        assert served_by(deployment, address).startswith(f"{location}/")


def rest(url: str, body: dict[str, Any] | None = None, token: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback URL built by the test
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}"} if token else {},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_rest_transfer_through_the_global_entry(deployment: Deployment) -> None:
    base = f"https://{deployment.status()['endpoints']['global_rest']}"
    secret = deployment.secrets
    code, login = rest(
        f"{base}/v1/auth:login", {"username": "demo", "password": secret["demo_password"]}
    )
    assert code == 200
    token = login["accessToken"]
    _, before = rest(f"{base}/v1/accounts/{secret['demo_savings']}", token=token)
    body = {
        "requestId": "rest-e2e-1",
        "sourceAccountId": secret["demo_checking"],
        "destinationAccountId": secret["demo_savings"],
        "amountMinor": "1234",
        "currencyCode": "USD",
    }
    code, created = rest(f"{base}/v1/transfers", body, token)
    assert code == 200, created
    assert created["transfer"]["amountMinor"] == "1234"  # int64 is a JSON string
    code, again = rest(f"{base}/v1/transfers", body, token)
    assert (code, again) == (200, created)  # replayed, not applied twice
    _, after = rest(f"{base}/v1/accounts/{secret['demo_savings']}", token=token)
    assert int(after["account"]["balanceMinor"]) == int(before["account"]["balanceMinor"]) + 1234
    code, listed = rest(
        f"{base}/v1/accounts/{secret['demo_savings']}/transfers?pageSize=1", token=token
    )
    assert listed["transfers"][0]["transferId"] == created["transfer"]["transferId"]

    # Errors: google.rpc.Status as JSON with grpc-gateway's HTTP status for each code.
    code, err = rest(
        f"{base}/v1/transfers", {**body, "requestId": "rest-e2e-2", "amountMinor": "0"}, token
    )
    assert code == 400
    assert err["code"] == 3
    assert {d["@type"].rsplit(".", 1)[-1] for d in err["details"]} >= {"BadRequest", "ErrorInfo"}
    code, err = rest(f"{base}/v1/accounts/{secret['demo_savings']}")
    assert code == 401
    code, err = rest(f"{base}/v1/transfers", {**body, "amountMinor": "99"}, token)
    assert code == 409  # ALREADY_EXISTS: request_id reused for another request
    code, _ = rest(f"{base}/v1/accounts/00000000-0000-4000-8000-000000000000", token=token)
    assert code == 404
    # An unknown path: refused by the edge's token check first (401, without a token),
    # and with a valid token by the transcoder (reject_unknown_method: 404, never 503).
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(f"{base}/v1/no-such-thing", timeout=10)  # noqa: S310
    assert unknown.value.code == 401
    authorized = urllib.request.Request(  # noqa: S310 - the test's own https:// URL
        f"{base}/v1/no-such-thing", headers={"authorization": f"Bearer {token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(authorized, timeout=10)  # noqa: S310
    assert unknown.value.code == 404


def test_grpcurl_lists_the_api_through_the_global_entry(deployment: Deployment) -> None:
    out = subprocess.run(
        [
            str(VENV_BIN / "grpcurl"),
            "-cacert",
            str(deployment.ca_file),
            deployment.status()["endpoints"]["global_grpc"],
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert {
        "meshbank.auth.v1.AuthService",
        "meshbank.account.v1.AccountService",
        "meshbank.transfer.v1.TransferService",
    } <= set(out.stdout.split())


def tls_handshake_ok(port: int, cert: str | None, key: str | None, ca: str) -> bool:
    """Open TLS to a sidecar and read its first HTTP/2 frame; False if refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # mesh certificates carry SPIFFE URIs, not host names
    context.load_verify_locations(ca)
    context.set_alpn_protocols(["h2"])
    if cert and key:
        context.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            return len(tls.recv(9)) == 9
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return False


def test_sidecars_refuse_plaintext_and_wrong_identities(deployment: Deployment) -> None:
    st = deployment.status()
    pki = deployment.state / "pki"
    mesh = deployment.state / "mesh"
    config = (mesh / "us-east-transfer-1-sidecar.yaml").read_text()
    import yaml

    inbound = yaml.safe_load(config)["static_resources"]["listeners"][0]["address"][
        "socket_address"
    ]["port_value"]
    ca = str(pki / "ca.crt")
    edge = (str(pki / "us-east-edge.crt"), str(pki / "us-east-edge.key"))
    other_service = (str(pki / "us-east-account.crt"), str(pki / "us-east-account.key"))
    assert tls_handshake_ok(inbound, *edge, ca)  # the control: an edge is let in
    assert not tls_handshake_ok(inbound, *other_service, ca)
    assert not tls_handshake_ok(inbound, None, None, ca)
    with grpc.insecure_channel(f"127.0.0.1:{inbound}") as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert st["phase"] == "running"


def steady_load(deployment: Deployment) -> Load:
    secret = deployment.secrets
    return Load(
        deployment.status()["endpoints"]["global_grpc"],
        deployment.ca_file,
        deployment.token(),
        secret["demo_checking"],
        secret["demo_savings"],
    )


def assert_writes_exactly_once(deployment: Deployment, load: Load) -> None:
    engine = sa.create_engine(deployment.database_url())
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT request_id, count(*) FROM transfers "
                    "WHERE request_id LIKE 'load-%' GROUP BY request_id"
                )
            ).all()
        counts = {str(row[0]): int(row[1]) for row in rows}
    finally:
        engine.dispose()
    writes = [o for o in load.outcomes if o.kind == "write"]
    assert writes
    for outcome in writes:
        if outcome.code == grpc.StatusCode.OK:
            assert counts.get(outcome.request_id) == 1, outcome
        else:
            assert outcome.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert counts.get(outcome.request_id, 0) <= 1
    assert max(counts.values()) == 1


def test_killing_one_instance_under_load_fails_no_call(deployment: Deployment) -> None:
    victim = next(p for p in deployment.status()["processes"] if p["name"] == "us-east-account-1")
    with steady_load(deployment) as load:
        time.sleep(1.5)
        import os
        import signal

        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(4)
    assert len(load.outcomes) > 50
    assert load.failed("read") == []
    assert load.failed("write") == []
    assert_writes_exactly_once(deployment, load)
    wait_for(lambda: all(p["healthy"] for p in deployment.status()["processes"]), 60, "recovery")


def test_a_dead_region_fails_over_and_comes_back(deployment: Deployment) -> None:
    with steady_load(deployment) as load:
        time.sleep(1.5)
        asked_at = time.monotonic()
        out = deployment.meshbank("region", "kill", "us-east", "--roles", "service")
        assert out.returncode == 0, out.stderr
        # The command has returned: every service process of us-east is dead (SIGKILL).
        # (Starting the CLI takes seconds on a busy machine, so the time it was asked
        # is not the time of the kill.)
        killed_at = time.monotonic()
        time.sleep(6)
        restored_at = time.monotonic()
        deployment.meshbank("region", "restore", "us-east")
        wait_for(
            lambda: all(p["healthy"] for p in deployment.status()["processes"]),
            90,
            "us-east to come back",
        )
        time.sleep(4)
        end = time.monotonic()
    assert load.regions_between(load.started, asked_at) == {"us-east"}
    # After the kill, the next region in us-east's failover order serves.
    assert load.regions_between(killed_at + 3, restored_at) == {"us-west"}
    assert load.regions_between(end - 2, end) == {"us-east"}
    assert load.failed("read") == []
    assert_writes_exactly_once(deployment, load)


def test_a_crashed_supervisor_leaves_nothing_behind_and_up_reuses_the_data(
    deployment: Deployment,
) -> None:
    """SIGKILL the supervisor: its children die with it (parent-death signal) and
    `meshbank down` kills what dropped privileges (Patroni and its PostgreSQL); no port
    is left listening, and `up` comes back on the same data.

    (`down` on a healthy deployment is checked by every deployment's teardown.)
    """
    import os
    import signal

    from regions import local, replication

    st = deployment.status()
    ports = [int(a.rsplit(":", 1)[1]) for a in st["endpoints"]["global"].values()]
    ports += [int(a.rsplit(":", 1)[1]) for a in st["endpoints"]["database"].values()]
    checking = deployment.secrets["demo_checking"]
    postmasters = [
        replication.postmaster_pid(member) for member in (deployment.state / "db").iterdir()
    ]
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    wait_for(lambda: not local.pid_alive(st["supervisor_pid"]), 10, "the supervisor to die")
    assert deployment.meshbank("down").returncode == 0
    assert deployment.status()["phase"] == "stopped"
    pids = [p["pid"] for p in st["processes"]] + [p for p in postmasters if p]
    wait_for(lambda: not any(local.pid_alive(pid) for pid in pids), 30, "every process to be gone")
    for port in ports:  # nothing left listening (TIME_WAIT remnants do not count)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The deployment is shared by the whole e2e session: bring it back on the same data.
    up = deployment.meshbank("up", "--detach", timeout=300)
    assert up.returncode == 0, up.stderr
    assert deployment.secrets["demo_checking"] == checking
