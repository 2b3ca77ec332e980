"""Demo data for ``meshbank up``, created through the public API and safe to re-run.

The demo user and partner are created with the operator use cases (like ``meshbank
users create``); everything else goes through the generated stubs with fixed
request_ids, so a second ``up`` replays instead of creating duplicates.
"""

from __future__ import annotations

import json
import secrets
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import local, public_client
from services import app
from services.common import errors
from services.common.principal import ALL_SCOPES

DEMO_USER = "demo"
DEMO_PARTNER = "demo-partner"


def seed_demo(state: Path, secret: dict[str, str], endpoints: Mapping[str, str]) -> dict[str, str]:
    """Create the demo user, partner, treasury and funded accounts once; return the secrets."""
    secret = dict(secret)
    admin = app.auth_admin(local.primary_url(state, local.load_topology()))
    if "demo_password" not in secret:
        secret["demo_password"] = secrets.token_urlsafe(12)
        try:
            admin.create_user(DEMO_USER, secret["demo_password"])
        except errors.AlreadyExists:
            secret.pop("demo_password")
            raise
        local.save_secrets(state, secret)
    if "demo_client_id" not in secret:
        client_id, client_secret = admin.create_partner(DEMO_PARTNER, sorted(ALL_SCOPES))
        secret.update(demo_client_id=client_id, demo_client_secret=client_secret)
        local.save_secrets(state, secret)

    # Through the global entry, like any client: this also proves the whole path works.
    with public_client.grpc_channel(endpoints["global_grpc"], endpoints["ca_cert"]) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        transfers = transfer_pb2_grpc.TransferServiceStub(channel)

        partner_token = auth.IssueClientToken(
            auth_pb2.IssueClientTokenRequest(
                client_id=secret["demo_client_id"], client_secret=secret["demo_client_secret"]
            )
        ).access_token
        user_token = auth.Login(
            auth_pb2.LoginRequest(username=DEMO_USER, password=secret["demo_password"])
        ).access_token
        as_partner = (("authorization", f"Bearer {partner_token}"),)
        as_user = (("authorization", f"Bearer {user_token}"),)

        def open_account(md: Any, request_id: str, name: str, overdraft: int = 0) -> str:
            reply = accounts.CreateAccount(
                account_pb2.CreateAccountRequest(
                    request_id=request_id,
                    display_name=name,
                    currency_code="USD",
                    overdraft_limit_minor=overdraft,
                ),
                metadata=md,
            )
            return reply.account.account_id

        treasury = open_account(as_partner, "seed-treasury-usd", "Treasury (USD)", 10**15)
        checking = open_account(as_user, "seed-checking", "Checking")
        savings = open_account(as_user, "seed-savings", "Savings")
        transfers.CreateTransfer(
            transfer_pb2.CreateTransferRequest(
                request_id="seed-fund-checking",
                source_account_id=treasury,
                destination_account_id=checking,
                amount_minor=100_000,
                currency_code="USD",
                description="Welcome bonus",
            ),
            metadata=as_partner,
        )
    secret.update(demo_checking=checking, demo_savings=savings, demo_treasury=treasury)
    local.save_secrets(state, secret)
    return secret


def print_quickstart(state: Path, status: Mapping[str, Any]) -> None:
    """Tell a person how to call the running system: REST with curl, gRPC with grpcurl."""
    secret = local.load_secrets(state)
    ep = status["endpoints"]
    entry = ep["global_rest"]
    ca = shlex.quote(ep["ca_cert"])
    venv_bin = Path(__file__).resolve().parent.parent / ".venv" / "bin"
    grpcurl = venv_bin / "grpcurl" if (venv_bin / "grpcurl").exists() else Path("grpcurl")
    login = shlex.quote(json.dumps({"username": DEMO_USER, "password": secret["demo_password"]}))
    # A fixed request_id: pasting a command twice replays the transfer, it does not move
    # the money twice.
    body = {
        "source_account_id": secret["demo_checking"],
        "destination_account_id": secret["demo_savings"],
        "amount_minor": "2500",
        "currency_code": "USD",
        "description": "from the quick start",
    }
    rest_body = shlex.quote(json.dumps({"request_id": f"rest-{secrets.token_hex(4)}", **body}))
    grpc_body = shlex.quote(json.dumps({"request_id": f"grpc-{secrets.token_hex(4)}", **body}))
    regions = ", ".join(status["regions"])
    per_location = "\n".join(f"    {r:8} {a}" for r, a in ep["global"].items())
    edges = "\n".join(f"    {r:8} {a}" for r, a in ep["edges"].items())
    running = sum(1 for p in status["processes"] if p["healthy"])
    print(
        f"""
meshbank is up: {running} processes healthy in {regions} (state in {state}).

  global entry (clients in {ep["default_location"]}): {ep["global_url"]}   gRPC and REST/JSON
  TLS only; clients verify the server with the CA {ep["ca_cert"]}
  global entry per client location:
{per_location}
  regional edges:
{edges}
  tracing UI (every request is one trace): {ep.get("tracing_ui", "-")}
  Prometheus (every process's metrics, the alert rules): {ep.get("prometheus", "-")}

Demo user 'demo' (password {secret["demo_password"]}) owns Checking
{secret["demo_checking"]} (funded with 1,000.00 USD) and Savings {secret["demo_savings"]}.

REST (the partner API):
  export MESHBANK_CA={ca}
  TOKEN=$(curl -s --cacert "$MESHBANK_CA" -X POST https://{entry}/v1/auth:login -d {login} \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["accessToken"])')
  curl -s --cacert "$MESHBANK_CA" -X POST https://{entry}/v1/transfers \\
      -H "authorization: Bearer $TOKEN" -d {rest_body}
  curl -s --cacert "$MESHBANK_CA" https://{entry}/v1/accounts/{secret["demo_checking"]}/transfers \\
      -H "authorization: Bearer $TOKEN"

gRPC (the internal API; the same methods):
  {grpcurl} -cacert "$MESHBANK_CA" -H "authorization: Bearer $TOKEN" -d {grpc_body} \\
      {entry} meshbank.transfer.v1.TransferService/CreateTransfer

From Python, with the generated stubs:
  import grpc, pathlib
  from meshbank.account.v1 import account_pb2, account_pb2_grpc
  from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
  ca = pathlib.Path("{ep["ca_cert"]}").read_bytes()
  channel = grpc.secure_channel("{ep["global_grpc"]}",
                                grpc.ssl_channel_credentials(root_certificates=ca))
  token = auth_pb2_grpc.AuthServiceStub(channel).Login(auth_pb2.LoginRequest(
      username="{DEMO_USER}", password="{secret["demo_password"]}")).access_token
  accounts = account_pb2_grpc.AccountServiceStub(channel)
  print(accounts.ListAccounts(account_pb2.ListAccountsRequest(),
                              metadata=[("authorization", "Bearer " + token)]))

`meshbank status` shows every process, `meshbank down` stops everything.
"""
    )
