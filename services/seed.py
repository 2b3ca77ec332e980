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

import grpc

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import local
from services import app
from services.common import errors
from services.common.principal import ALL_SCOPES

DEMO_USER = "demo"
DEMO_PARTNER = "demo-partner"


def seed_demo(state: Path, secret: dict[str, str], endpoints: Mapping[str, str]) -> dict[str, str]:
    """Create the demo user, partner, treasury and funded accounts once; return the secrets."""
    secret = dict(secret)
    admin = app.auth_admin(local.postgres_node(state, local.Ports.from_env(), secret).url())
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

    with (
        grpc.insecure_channel(endpoints["auth_grpc"]) as auth_ch,
        grpc.insecure_channel(endpoints["account_grpc"]) as account_ch,
        grpc.insecure_channel(endpoints["transfer_grpc"]) as transfer_ch,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(auth_ch)
        accounts = account_pb2_grpc.AccountServiceStub(account_ch)
        transfers = transfer_pb2_grpc.TransferServiceStub(transfer_ch)

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
    """Tell a person how to call the running system (grpcurl and Python)."""
    secret = local.load_secrets(state)
    ep = status["endpoints"]
    venv_bin = Path(__file__).resolve().parent.parent / ".venv" / "bin"
    grpcurl = venv_bin / "grpcurl" if (venv_bin / "grpcurl").exists() else Path("grpcurl")
    login = shlex.quote(f'{{"username":"demo","password":"{secret["demo_password"]}"}}')
    # A fixed request_id: pasting the command twice replays the transfer, it does not
    # move the money twice.
    transfer = shlex.quote(
        json.dumps(
            {
                "request_id": f"quickstart-{secrets.token_hex(4)}",
                "source_account_id": secret["demo_checking"],
                "destination_account_id": secret["demo_savings"],
                "amount_minor": "2500",
                "currency_code": "USD",
                "description": "from the quick start",
            }
        )
    )
    list_transfers = shlex.quote(json.dumps({"account_id": secret["demo_checking"]}))
    extract = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])'"
    print(
        f"""
meshbank is up (state in {state}).

  auth      {ep["auth_grpc"]}   meshbank.auth.v1.AuthService
  account   {ep["account_grpc"]}   meshbank.account.v1.AccountService
  transfer  {ep["transfer_grpc"]}   meshbank.transfer.v1.TransferService
  postgres  {ep["postgres"]}

Demo user 'demo', password {secret["demo_password"]}; accounts Checking
{secret["demo_checking"]} (funded with 1,000.00 USD) and Savings {secret["demo_savings"]}.
Demo partner client_id {secret["demo_client_id"]} (secret in {state / "secrets.json"}).

List the services by reflection:
  {grpcurl} -plaintext {ep["account_grpc"]} list

Log in, then move 25.00 USD from Checking to Savings and read it back:
  TOKEN=$({grpcurl} -plaintext -d {login} {ep["auth_grpc"]} \\
      meshbank.auth.v1.AuthService/Login | {extract})
  {grpcurl} -plaintext -H "authorization: Bearer $TOKEN" -d {transfer} \\
      {ep["transfer_grpc"]} meshbank.transfer.v1.TransferService/CreateTransfer
  {grpcurl} -plaintext -H "authorization: Bearer $TOKEN" -d {list_transfers} \\
      {ep["transfer_grpc"]} meshbank.transfer.v1.TransferService/ListTransfers

From Python, with the generated stubs:
  import grpc
  from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
  from meshbank.account.v1 import account_pb2, account_pb2_grpc
  token = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel("{ep["auth_grpc"]}")).Login(
      auth_pb2.LoginRequest(username="demo", password="{secret["demo_password"]}")).access_token
  accounts = account_pb2_grpc.AccountServiceStub(grpc.insecure_channel("{ep["account_grpc"]}"))
  print(accounts.ListAccounts(account_pb2.ListAccountsRequest(),
                              metadata=[("authorization", f"Bearer {{token}}")]))

`meshbank status` shows the processes, `meshbank down` stops everything.
"""
    )
