"""The partner edge as partners meet it: tokens, quotas and limits on the real Envoys.

Every refusal is checked twice: the status the client gets, and the edge's own stats
(``jwt_authn.denied``, the quota's ``rate_limited``) moving while the counter of
requests the edge sent to the service (``cluster.<service>.upstream_rq_total``) does not.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import jwt
import pytest
import sqlalchemy as sa

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from regions import local, public_client
from regions.topology import Topology
from services.auth.keys import SigningKey, generate_signing_key, load_signing_key
from services.common.config import token_identity
from tests.e2e.conftest import VENV_BIN, Deployment, public_channel

# Small quotas and a short header timeout, so that limits are reached with a few calls.
EDGE_UNDER_TEST = {
    "quotas": {
        "partner": {"burst": 100, "refill": 50, "interval_seconds": 1},
        "login": {"burst": 5, "refill": 1, "interval_seconds": 2},
    },
    "limits": {"max_request_bytes": 16384, "request_headers_timeout_seconds": 2},
}
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "partners.md"


def TOPOLOGY(data: dict[str, Any]) -> dict[str, Any]:  # the name the deployment fixture uses
    # One replica per service and region is enough here (and half the processes).
    services = {name: {"replicas": 1} for name in data["services"]}
    return {**data, "services": services, "edge": EDGE_UNDER_TEST}


# -- helpers --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


def http(
    url: str, body: Any = None, headers: dict[str, str] | None = None, method: str = ""
) -> Reply:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback URL built by the test
        url, data=data, headers=headers or {}, method=method or ("POST" if data else "GET")
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310
            return Reply(
                reply.status,
                {k.lower(): v for k, v in reply.headers.items()},
                reply.read().decode(),
            )
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode())


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def topo(deployment: Deployment) -> Topology:
    return local.load_topology(deployment.env)


def edge_url(topo: Topology, region: str = "us-east") -> str:
    return f"https://{topo.host}:{topo.edge_port(region)}"


def edge_address(topo: Topology, region: str = "us-east") -> str:
    return f"{topo.host}:{topo.edge_port(region)}"


def edge_stats(topo: Topology, region: str = "us-east") -> dict[str, int]:
    admin = f"http://{topo.host}:{topo.edge_admin_port(region)}/stats"
    counters = {}
    for line in http(admin).text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            counters[name] = int(value)
    return counters


def jwt_denied(stats: dict[str, int], region: str = "us-east") -> int:
    return stats[f"http.edge_{region}.jwt_authn.denied"]


def sent_to_services(stats: dict[str, int]) -> int:
    """Requests the edge sent to the account and transfer services (retries not counted)."""
    return sum(
        stats[f"cluster.{s}.upstream_rq_total"] - stats[f"cluster.{s}.upstream_rq_retry"]
        for s in ("account", "transfer")
    )


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@dataclass
class Tokens:
    """Crafts access tokens, some signed with the deployment's real signing key."""

    key: SigningKey
    issuer: str
    audience: str
    subject: str = "users/demo"

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": self.subject,
            "scope": "accounts.read",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(changes)
        return claims

    def sign(self, claims: dict[str, Any], key: SigningKey | None = None) -> str:
        key = key or self.key
        return jwt.encode(
            claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, "typ": "at+jwt"}
        )


@pytest.fixture(scope="module")
def tokens(deployment: Deployment) -> Tokens:
    """The newest signing key, read from the database like the auth service does."""
    engine = sa.create_engine(deployment.database_url())
    try:
        with engine.connect() as conn:
            kid, pem = conn.execute(
                sa.text(
                    "SELECT kid, private_key_pem FROM signing_keys WHERE retired_at IS NULL "
                    "ORDER BY created_at DESC LIMIT 1"
                )
            ).one()
    finally:
        engine.dispose()
    issuer, audience = token_identity(deployment.env)
    return Tokens(
        load_signing_key(kid, pem, deployment.secrets["key_passphrase"]), issuer, audience
    )


def bad_tokens(tokens: Tokens, valid: str) -> dict[str, str | None]:
    now = int(time.time())
    header, payload, signature = valid.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return {
        "missing": None,
        "not a JWT": "not-a-jwt",
        "expired": tokens.sign(tokens.claims(iat=now - 4000, nbf=now - 4000, exp=now - 3600)),
        "wrong issuer": tokens.sign(tokens.claims(iss="https://issuer.example")),
        "wrong audience": tokens.sign(tokens.claims(aud="another-api")),
        "alg none": b64({"alg": "none", "typ": "at+jwt", "kid": tokens.key.kid})
        + "."
        + b64(tokens.claims())
        + ".",
        # A real token whose subject was changed after signing.
        "tampered": f"{header}.{b64({**claims, 'sub': 'users/mallory'})}.{signature}",
        "unknown kid": tokens.sign(tokens.claims(), generate_signing_key()),
    }


def rpc_metadata(token: str | None, **extra: str) -> tuple[tuple[str, str], ...]:
    md = [(k.replace("_", "-"), v) for k, v in extra.items()]
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    return tuple(md)


def get_account(address: str, token: str | None, account_id: str) -> grpc.StatusCode:
    with public_channel(address) as channel:
        try:
            account_pb2_grpc.AccountServiceStub(channel).GetAccount(
                account_pb2.GetAccountRequest(account_id=account_id),
                metadata=rpc_metadata(token),
                timeout=10,
            )
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def create_partner(deployment: Deployment, name: str) -> tuple[str, str]:
    out = deployment.meshbank(
        "partners", "create", name, "--scopes", "accounts.read,transfers.read"
    )
    assert out.returncode == 0, out.stderr
    client_id = re.search(r"client_id:\s+(\S+)", out.stdout)
    secret = re.search(r"client_secret:\s+(\S+)", out.stdout)
    assert client_id, out.stdout
    assert secret, out.stdout
    return client_id.group(1), secret.group(1)


def client_token(topo: Topology, client_id: str, secret: str) -> str:
    reply = http(f"{edge_url(topo)}/v1/auth:token", {"clientId": client_id, "clientSecret": secret})
    assert reply.status == 200, reply.text
    return str(reply.json["accessToken"])


# -- tokens -----------------------------------------------------------------------------------


def test_a_valid_token_passes_and_token_endpoints_need_none(
    deployment: Deployment, topo: Topology
) -> None:
    token = deployment.token(edge_address(topo))
    account = deployment.secrets["demo_checking"]
    reply = http(f"{edge_url(topo)}/v1/accounts/{account}", headers=bearer(token))
    assert reply.status == 200, reply.text
    assert get_account(edge_address(topo), token, account) is grpc.StatusCode.OK
    jwks = http(f"{edge_url(topo)}/v1/auth/jwks")
    assert jwks.status == 200
    assert {k["kty"] for k in jwks.json["keys"]} == {"OKP"}
    with public_channel(edge_address(topo)) as channel:
        reply_keys = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest())
    assert len(reply_keys.keys) == len(jwks.json["keys"])


@pytest.mark.parametrize("region", ["us-east", "eu-west"])
def test_every_bad_token_is_refused_at_the_edge(
    deployment: Deployment, topo: Topology, tokens: Tokens, region: str
) -> None:
    account = deployment.secrets["demo_checking"]
    cases = bad_tokens(tokens, deployment.token(edge_address(topo, region)))
    before = edge_stats(topo, region)
    for case, token in cases.items():
        reply = http(
            f"{edge_url(topo, region)}/v1/accounts/{account}",
            headers=bearer(token) if token is not None else {},
        )
        assert reply.status == 401, (case, reply.text)
        assert reply.headers["content-type"] == "application/json"
        status = reply.json
        assert status["code"] == 16, case  # google.rpc.Code UNAUTHENTICATED
        assert status["details"][0]["reason"] == "TOKEN_REJECTED"
        assert reply.headers["www-authenticate"].startswith("Bearer")
        code = get_account(edge_address(topo, region), token, account)
        assert code is grpc.StatusCode.UNAUTHENTICATED, case
    after = edge_stats(topo, region)
    assert jwt_denied(after, region) - jwt_denied(before, region) == 2 * len(cases)
    assert sent_to_services(after) == sent_to_services(before)  # no service saw any


def test_the_global_entry_forwards_refusals_from_the_edge(
    deployment: Deployment, topo: Topology, tokens: Tokens
) -> None:
    location = topo.default_location
    base = f"https://{deployment.status()['endpoints']['global_rest']}"
    forged = tokens.sign(tokens.claims(), generate_signing_key())
    before = edge_stats(topo, location)
    reply = http(
        f"{base}/v1/accounts/{deployment.secrets['demo_checking']}", headers=bearer(forged)
    )
    assert reply.status == 401
    assert reply.json["code"] == 16
    after = edge_stats(topo, location)
    assert jwt_denied(after, location) == jwt_denied(before, location) + 1
    assert sent_to_services(after) == sent_to_services(before)


# -- quotas ------------------------------------------------------------------------------------


def retry_after(call: grpc.Call) -> str:
    # A refusal without a body is a trailers-only response: its headers are trailers.
    metadata = [*(call.trailing_metadata() or ()), *(call.initial_metadata() or ())]
    return next((str(v) for k, v in metadata if k == "retry-after"), "")


def answer_or_none(url: str, token: str) -> Reply:
    """The reply, or status 0 when none came in time (a refusal at the edge is instant:
    a call that got no answer passed the quota and was slow beyond it)."""
    try:
        return http(url, headers=bearer(token))
    except OSError as exc:
        return Reply(0, {}, repr(exc))


def test_a_burst_gets_429_with_retry_after(deployment: Deployment, topo: Topology) -> None:
    quota = topo.edge.partner
    token = client_token(topo, *create_partner(deployment, f"burst-{uuid.uuid4().hex[:8]}"))
    other = deployment.token(edge_address(topo))
    # A malformed account id: what passes the quota is refused by the service's
    # validation (INVALID_ARGUMENT / 400) without a database query, so the one replica
    # per service of this deployment keeps up with the refill rate on a busy machine.
    url = f"{edge_url(topo)}/v1/accounts/not-an-account"
    before = edge_stats(topo)
    with public_channel(edge_address(topo)) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        request = account_pb2.GetAccountRequest(account_id="not-an-account")
        started = time.monotonic()
        # One subject, gRPC and REST at once: one bucket. gRPC calls (one connection)
        # keep the bucket drained, twice as fast as it refills, while REST calls
        # (slower: urllib opens a TLS connection for each) go out beside them, until one
        # of them is refused. Both loops are bounded.
        calls: list[Any] = []  # grpc futures (also grpc.Call)
        rest: list[Reply] = []
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set() and len(calls) < 30 * quota.burst:
                calls.extend(
                    accounts.GetAccount.future(request, metadata=rpc_metadata(token), timeout=30)
                    for _ in range(quota.refill)
                )
                time.sleep(quota.interval_seconds / 2)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()

        def grpc_limited() -> bool:
            return any(
                c.done() and c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for c in list(calls)
            )

        # Until both sides have been refused: whichever is refused first waits for the
        # other (REST alone can empty the bucket between two gRPC batches).
        deadline = time.monotonic() + 120
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                while len(rest) < 10 * quota.burst and time.monotonic() < deadline:
                    if not any(r.status == 429 for r in rest):
                        rest += pool.map(lambda _: answer_or_none(url, token), range(16))
                    elif grpc_limited():
                        break
                    else:
                        time.sleep(0.1)
        finally:
            stop.set()
            drainer.join(30)
        errors = [c.exception() for c in calls]
        elapsed = time.monotonic() - started
        # Another subject has its own bucket.
        assert get_account(edge_address(topo), other, deployment.secrets["demo_checking"]) is (
            grpc.StatusCode.OK
        )
    # A future's exception is the call itself (grpc.RpcError and grpc.Call).
    failed = [cast(grpc.Call, e) for e in errors if e is not None]
    limited = [e for e in failed if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]
    limited_rest = [r for r in rest if r.status == 429]
    assert limited, "no gRPC call was rate limited"
    assert limited_rest, "no REST call was rate limited"
    passed = len(calls) + len(rest) - len(limited) - len(limited_rest)
    refills = int(elapsed // quota.interval_seconds) + 1
    assert quota.burst <= passed <= quota.burst + refills * quota.refill
    assert {retry_after(e) for e in limited} == {str(quota.interval_seconds)}
    for reply in limited_rest:
        assert reply.headers["retry-after"] == str(quota.interval_seconds)
        assert reply.json["code"] == 8  # RESOURCE_EXHAUSTED, as google.rpc.Status JSON
        assert reply.json["details"][0]["reason"] == "RATE_LIMITED"
    after = edge_stats(topo)
    rate_limited = "partner_quota.http_local_rate_limit.rate_limited"
    assert after[rate_limited] - before[rate_limited] == len(limited) + len(limited_rest)
    # Only the calls that passed the quota reached a service (+1: the other subject's):
    # at least every one a service answered (INVALID_ARGUMENT), at most every one that
    # was not limited (on a busy machine a few can time out on their way).
    served = sum(1 for e in failed if e.code() is grpc.StatusCode.INVALID_ARGUMENT)
    served += sum(1 for r in rest if r.status == 400)
    reached = sent_to_services(after) - sent_to_services(before) - 1
    assert served <= reached <= passed, (served, reached, passed)
    time.sleep(quota.interval_seconds)
    assert http(url, headers=bearer(token)).status == 400  # after Retry-After: passes again


def test_credential_checks_are_limited_per_client_address(topo: Topology) -> None:
    """Client addresses come from X-Forwarded-For, which the edge trusts from the
    global entry's host: loopback here, so the test can play several clients.

    Each refused guess costs the service a password hash, slow on a busy machine, so
    the bucket may refill while the burst is in flight: every bound below allows the
    refills that the elapsed time explains, and no more.
    """
    quota = topo.edge.login
    url = f"{edge_url(topo)}/v1/auth:token"
    guess = {"clientId": "mbp_nobody", "clientSecret": "mbs_wrong"}
    address = "198.51.100.7"

    def attempt(address: str) -> Reply:
        return http(url, guess, {"x-forwarded-for": address})

    def refills_since(started: float) -> int:
        return (int((time.monotonic() - started) // quota.interval_seconds) + 1) * quota.refill

    # Passed the quota: refused by the service (401), or answered 504 by the edge when
    # the service's password hash outlasted the route timeout on a busy machine (over
    # gRPC: UNAUTHENTICATED, or DEADLINE_EXCEEDED).
    passed_quota = (401, 504)
    passed_quota_grpc = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.DEADLINE_EXCEEDED)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = [r.status for r in pool.map(attempt, [address] * (quota.burst + 4))]
    assert statuses.count(429) >= 1
    passes = sum(statuses.count(s) for s in passed_quota)
    assert statuses.count(429) + passes == len(statuses), statuses
    assert quota.burst <= passes <= quota.burst + refills_since(started)
    # Limited now: only refills pass until the next refusal, which carries Retry-After.
    limited_at = time.monotonic()
    for passed in range(quota.burst):  # bounded: a machine slower than the refill never ends
        if (over := attempt(address)).status not in passed_quota:
            break
        assert passed + 1 <= refills_since(limited_at)
    assert over.status == 429, over.text
    assert over.headers["retry-after"] == str(quota.interval_seconds)
    assert over.json["details"][0]["reason"] == "RATE_LIMITED"
    # gRPC Login from the same address shares the bucket: it is refused after at most
    # the refills (a bucket of its own would let a whole burst through first).
    limited_at = time.monotonic()
    with public_channel(edge_address(topo)) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        for passed in range(quota.burst):
            with pytest.raises(grpc.RpcError) as refused:
                auth.Login(
                    auth_pb2.LoginRequest(username="nobody", password="wrong password!"),
                    metadata=rpc_metadata(None, x_forwarded_for=address),
                    timeout=10,
                )
            if refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
            assert refused.value.code() in passed_quota_grpc
            assert passed + 1 <= refills_since(limited_at)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert attempt("198.51.100.8").status == 401  # wrong credentials, but not limited


# -- limits ------------------------------------------------------------------------------------


def test_oversized_requests_are_refused(deployment: Deployment, topo: Topology) -> None:
    token = deployment.token(edge_address(topo))
    big = {"requestId": "too-big", "displayName": "x" * topo.edge.max_request_bytes}
    global_rest = f"https://{deployment.status()['endpoints']['global_rest']}"
    for base in (edge_url(topo), global_rest):
        before = sent_to_services(edge_stats(topo))
        reply = http(f"{base}/v1/accounts", big, bearer(token))
        assert reply.status == 413, reply.text
        assert reply.json["details"][0]["reason"] == "REQUEST_TOO_LARGE"
        assert sent_to_services(edge_stats(topo)) == before
        huge_header = {
            **bearer(token),
            "x-padding": "p" * (topo.edge.max_request_headers_kb * 1024),
        }
        reply = http(f"{base}/v1/auth/jwks", headers=huge_header)
        assert reply.status == 431


def test_a_client_that_never_finishes_its_headers_is_cut_off(
    deployment: Deployment, topo: Topology
) -> None:
    limit = topo.edge.request_headers_timeout_seconds
    tls = public_client.ssl_context(deployment.ca_file)
    address = (topo.host, topo.edge_port("us-east"))
    with (
        socket.create_connection(address, timeout=limit + 10) as raw,
        tls.wrap_socket(raw, server_hostname=topo.host) as s,
    ):
        s.sendall(b"GET /v1/auth/jwks HTTP/1.1\r\nhost: edge\r\n")  # no blank line: not done
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"REQUEST_TIMEOUT"' in answer
    assert waited < limit + 10


# -- key rotation ------------------------------------------------------------------------------


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


@dataclass
class RotationLoad:
    """Reads through every edge with the newest token (refreshed every second) and one
    thread holding on to the token it got before the rotation."""

    addresses: list[str]
    account: str
    old_token: str
    refresh_token: str
    refresh_url: str
    login: Callable[[], tuple[str, str]]  # a new (access, refresh) token pair
    token: str = ""
    lost_replies: list[str] = field(default_factory=list)
    outcomes: list[tuple[str, str, grpc.StatusCode]] = field(default_factory=list)
    refresh_failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reader(self, address: str, fixed: str | None) -> None:
        with public_channel(address) as channel:
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            while not self.stop.is_set():
                token = fixed or self.token
                try:
                    accounts.GetAccount(
                        account_pb2.GetAccountRequest(account_id=self.account),
                        metadata=rpc_metadata(token),
                        timeout=10,
                    )
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                with self.lock:
                    self.outcomes.append((address, kid_of(token), code))
                # ~10 calls/s per reader: well inside the partner quota under test.
                time.sleep(0.1)

    def refresher(self) -> None:
        while not self.stop.wait(1.0):
            try:
                reply = http(self.refresh_url, {"refreshToken": self.refresh_token})
            except OSError as exc:
                # No answer (a timeout on a busy machine): the refresh token may have
                # been used up by the request that got lost, so start a new session.
                self.lost_replies.append(repr(exc))
                self.token, self.refresh_token = self.login()
                continue
            if reply.status != 200:
                self.refresh_failures.append(reply.text)
                continue
            self.refresh_token = reply.json["refreshToken"]
            self.token = reply.json["accessToken"]

    @property
    def threads(self) -> Iterator[threading.Thread]:
        for address in self.addresses:
            yield threading.Thread(target=self.reader, args=(address, None), daemon=True)
        yield threading.Thread(
            target=self.reader, args=(self.addresses[0], self.old_token), daemon=True
        )
        yield threading.Thread(target=self.refresher, daemon=True)


def test_key_rotation_under_load_fails_no_request(deployment: Deployment, topo: Topology) -> None:
    def log_in() -> tuple[str, str]:
        login = http(
            f"{edge_url(topo)}/v1/auth:login",
            {"username": "demo", "password": deployment.secrets["demo_password"]},
        )
        assert login.status == 200, login.text
        return login.json["accessToken"], login.json["refreshToken"]

    old_token, refresh_token = log_in()
    old_kid = kid_of(old_token)
    load = RotationLoad(
        [edge_address(topo, r) for r in topo.region_names],
        deployment.secrets["demo_checking"],
        old_token,
        refresh_token,
        f"{edge_url(topo)}/v1/auth:refresh",
        log_in,
        token=old_token,
    )
    threads = list(load.threads)
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        rotated = deployment.meshbank("auth", "rotate-keys")
        assert rotated.returncode == 0, rotated.stderr
        announced = re.search(r"new signing key ([\w-]+)", rotated.stdout)
        assert announced, rotated.stdout
        new_kid = announced.group(1)
        assert new_kid != old_kid
        # Published at once, signing after the publication delay.
        deadline = time.monotonic() + 90
        while kid_of(load.token) != new_kid and time.monotonic() < deadline:
            time.sleep(0.5)
        assert kid_of(load.token) == new_kid, (
            "new tokens never used the new key",
            load.refresh_failures[-3:],
            load.lost_replies[-3:],
        )
        time.sleep(5)
    finally:
        load.stop.set()
        for t in threads:
            t.join(30)
    failed = [o for o in load.outcomes if o[2] is not grpc.StatusCode.OK]
    assert failed == []
    assert load.refresh_failures == []
    used = {(address, kid) for address, kid, _ in load.outcomes}
    for address in load.addresses:  # every edge took tokens of both keys
        assert {(address, old_kid), (address, new_kid)} <= used
    for region in topo.region_names:
        kids = {k["kid"] for k in http(f"{edge_url(topo, region)}/v1/auth/jwks").json["keys"]}
        assert {old_kid, new_kid} <= kids


# -- the partner guide -------------------------------------------------------------------------


def guide_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def test_the_guide_has_curls_to_run() -> None:
    assert sum("curl" in block for block in guide_blocks()) >= 6


def test_every_curl_in_the_partner_guide_works(deployment: Deployment, topo: Topology) -> None:
    """The guide's shell blocks run in order in one shell, as a partner would paste them,
    with MESHBANK_URL pointing at the global entry (``set -e``: any failure fails)."""
    script = "set -euo pipefail\n" + "\n".join(guide_blocks())
    env = dict(
        deployment.env,
        MESHBANK_URL=f"https://{deployment.status()['endpoints']['global_rest']}",
        MESHBANK_CA=str(deployment.ca_file),
        # `meshbank` (partners create) is the venv's, as after `pip install`.
        PATH=f"{VENV_BIN}:{deployment.env['PATH']}",
    )
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
