"""Take the runbook's screenshot: one transfer's trace that crossed regions in a failover.

Against a running deployment (``meshbank up --detach``; ``MESHBANK_STATE_DIR`` as for
every command): kill us-east's service processes (``meshbank region kill us-east
--roles service``), send one REST transfer through the global entry's us-east listener,
so that the us-east edge fails it over to the next region's sidecars, wait until the
trace is complete in the tracing UI, screenshot the UI's page of it with Debian's
headless chromium, and restore us-east. Prints the trace id, where each hop ran, and
the PNG's path.

    .venv/bin/python tools/failover_trace.py docs/tracing-failover.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from regions import local, public_client

CHROMIUM = "/usr/bin/chromium"
VICTIM = "us-east"


def meshbank(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "services.cli", *args], check=True, timeout=300)


def call(url: str, ca: Path, body: dict[str, Any], token: str = "") -> tuple[dict[str, str], Any]:
    request = urllib.request.Request(  # noqa: S310 - the deployment's own endpoint
        url,
        data=json.dumps(body).encode(),
        # x-client-trace-id: traced whatever the topology's sample rate.
        headers={
            "x-client-trace-id": uuid.uuid4().hex,
            **({"authorization": f"Bearer {token}"} if token else {}),
        },
        method="POST",
    )
    with public_client.urlopen(request, ca, timeout=30) as reply:
        return {k.lower(): v for k, v in reply.headers.items()}, json.loads(reply.read())


def spans(ui: str, trace_id: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"limit": "1000", "trace_id": trace_id})
    with urllib.request.urlopen(f"{ui}/v1/projects/default/spans?{query}", timeout=10) as r:  # noqa: S310
        found: list[dict[str, Any]] = json.loads(r.read())["data"]
    return found


def region_of(span: dict[str, Any]) -> str:
    attributes = span.get("attributes", {})
    meshbank_attrs = attributes.get("meshbank", {})
    return str(meshbank_attrs.get("region") or attributes.get("meshbank.region") or "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path)
    args = parser.parse_args()

    state = local.state_dir()
    status = local.read_status(state)
    if not status or status.get("phase") != "running":
        print("no running deployment: meshbank up --detach first", file=sys.stderr)
        return 1
    endpoints, secrets = status["endpoints"], local.load_secrets(state)
    ca = public_client.ca_file(status)
    base = public_client.url(endpoints["global"][VICTIM])
    ui = endpoints["tracing_ui"]
    _, login = call(
        f"{base}/v1/auth:login", ca, {"username": "demo", "password": secrets["demo_password"]}
    )
    meshbank("region", "kill", VICTIM, "--roles", "service")
    try:
        time.sleep(3)  # the edge's health checks mark the dead instances
        headers, created = call(
            f"{base}/v1/transfers",
            ca,
            {
                "requestId": f"failover-trace-{uuid.uuid4().hex[:12]}",
                "sourceAccountId": secrets["demo_checking"],
                "destinationAccountId": secrets["demo_savings"],
                "amountMinor": "250",
                "currencyCode": "USD",
            },
            login["accessToken"],
        )
        trace_id = headers["x-meshbank-trace-id"]
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = spans(ui, trace_id)
            if any(s["name"] == "COMMIT" for s in found):
                time.sleep(2)  # the last exporters flush
                found = spans(ui, trace_id)
                break
            time.sleep(0.5)
        page = f"{ui}/redirects/traces/{trace_id}"
        subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1600,1000",
                "--virtual-time-budget=20000",
                f"--screenshot={args.png.resolve()}",
                page,
            ],
            check=True,
            timeout=180,
            capture_output=True,
        )
    finally:
        meshbank("region", "restore", VICTIM)
    print(f"transfer {created['transfer']['transferId']}, trace {trace_id} ({len(found)} spans)")
    for span in sorted(found, key=lambda s: str(s.get("start_time"))):
        print(f"  {region_of(span):8} {span['name']}")
    print(f"screenshot: {args.png} ({args.png.stat().st_size // 1024} KiB) of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
