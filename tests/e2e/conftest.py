"""A whole local deployment (`meshbank up --detach`) per test module, on its own ports.

Whatever happens, the finalizer runs `meshbank down` and then kills by PID anything the
status file still lists, so no Envoy, service or PostgreSQL is left holding a port.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from regions import topology

VENV_BIN = Path(sys.executable).parent
MESHBANK = str(VENV_BIN / "meshbank")


def _block_free(t: topology.Topology) -> bool:
    for port in t.all_ports():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@dataclass
class Deployment:
    env: dict[str, str]
    state: Path
    up_output: str

    def meshbank(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MESHBANK, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.meshbank("status", "--json").stdout)
        return result

    @property
    def secrets(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.state / "secrets.json").read_text())
        return data

    def token(self, address: str | None = None) -> str:
        address = address or self.status()["endpoints"]["global_grpc"]
        with grpc.insecure_channel(address) as channel:
            reply = auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(username="demo", password=self.secrets["demo_password"]),
                timeout=10,
            )
        return reply.access_token

    def database_url(self) -> str:
        """The current database leader's URL (found through Patroni)."""
        from regions import local

        return local.primary_url(self.state, local.load_topology(self.env))


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A test module may define ``TOPOLOGY(data) -> data`` to change the topology file
    its deployment runs with (e.g. small quotas); ports are shifted as usual."""
    base_dir = Path(tempfile.mkdtemp(prefix="meshbank-e2e-"))
    base_dir.chmod(0o755)  # the postgres user must reach its data directory
    env = dict(os.environ, MESHBANK_STATE_DIR=str(base_dir / "state"))
    edit = getattr(request.module, "TOPOLOGY", None)
    if edit is not None:
        path = base_dir / "topology.yaml"
        path.write_text(
            yaml.safe_dump(
                edit(yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())), sort_keys=False
            )
        )
        env["MESHBANK_TOPOLOGY"] = str(path)
    default = topology.load(env.get("MESHBANK_TOPOLOGY"))
    candidates = (random.randrange(22000, 32400, 200) for _ in range(100))
    base = next(b for b in candidates if _block_free(topology.with_port_base(default, b)))
    env["MESHBANK_BASE_PORT"] = str(base)
    deployment = Deployment(env, base_dir / "state", "")
    try:
        up = deployment.meshbank("up", "--detach", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        deployment.up_output = up.stdout
        yield deployment
    finally:
        deployment.meshbank("down", timeout=180)
        status = base_dir / "state" / "status.json"
        if status.exists():
            for proc in json.loads(status.read_text())["processes"]:
                if proc.get("pid"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc["pid"], signal.SIGKILL)
        shutil.rmtree(base_dir, ignore_errors=True)
