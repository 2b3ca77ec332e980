"""One whole local deployment (`meshbank up --detach`) for the e2e session, on its own ports.

It is shared by every e2e module (one that needs another topology, e.g. small quotas,
defines ``TOPOLOGY``, gets its own and runs before the shared one starts): starting three
regions costs about a minute on these two cores, and `make test` must stay short. Tests
that break something (drills, killed regions, a crashed supervisor) restore it before they
return, and each waits for every process to be healthy again.

Whatever happens, the finalizer runs `meshbank down` and then kills by PID anything the
status file listed, so no Envoy, service or PostgreSQL is left holding a port.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from regions import local, public_client, topology

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

    @property
    def ca_file(self) -> Path:
        """The CA that verifies the edges and the global entry (TLS only)."""
        return public_client.ca_file(self.status())

    def channel(self, address: str | None = None) -> grpc.Channel:
        """A TLS channel to a public endpoint (default: the global entry)."""
        status = self.status()
        target = address or status["endpoints"]["global_grpc"]
        return public_client.grpc_channel(target, public_client.ca_file(status))

    def token(self, address: str | None = None) -> str:
        with self.channel(address) as channel:
            reply = auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(username="demo", password=self.secrets["demo_password"]),
                timeout=10,
            )
        return reply.access_token

    def database_url(self) -> str:
        """The current database leader's URL (found through Patroni)."""
        from regions import local

        return local.primary_url(self.state, local.load_topology(self.env))


E2E_PREFIX = "meshbank-e2e-"


def _reap_orphaned_deployments() -> None:
    """Take down deployments whose test runner was killed before its finalizer ran.

    The supervisor outlives `meshbank up --detach` on purpose, so a SIGKILLed pytest
    leaves its deployment running; the next session stops it. A folder whose owner is
    still alive (another session running now) is left alone.
    """
    for base_dir in Path(tempfile.gettempdir()).glob(E2E_PREFIX + "*"):
        try:
            owner = int((base_dir / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if local.pid_alive(owner):
            continue
        env = dict(os.environ, MESHBANK_STATE_DIR=str(base_dir / "state"))
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([MESHBANK, "down"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(base_dir, ignore_errors=True)


# The tests' plain urllib.request.urlopen calls verify the public endpoints against the
# CAs of the deployments this session started (each state folder has its own local CA),
# and nothing else: no system CAs, no unverified fallback.
_URLLIB_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_URLLIB_TLS.minimum_version = ssl.TLSVersion.TLSv1_2


_TRUSTED_CAS: list[bytes] = []


def _trust_in_urllib(ca_file: Path) -> None:
    _URLLIB_TLS.load_verify_locations(cafile=str(ca_file))
    handler = urllib.request.HTTPSHandler(context=_URLLIB_TLS)
    urllib.request.install_opener(urllib.request.build_opener(handler))
    _TRUSTED_CAS.append(ca_file.read_bytes())


def public_channel(address: str) -> grpc.Channel:
    """A TLS channel to a public endpoint of any deployment of this session, verified
    against those deployments' CAs (as the urllib calls are)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=b"".join(_TRUSTED_CAS))
    return grpc.secure_channel(address, credentials)


@contextlib.contextmanager
def _deployment(edit: Callable[[Any], Any] | None = None) -> Iterator[Deployment]:
    """``meshbank up --detach`` on a free port block, torn down whatever happens;
    ``edit(data) -> data`` changes the topology file it runs with (e.g. small quotas)."""
    _reap_orphaned_deployments()
    base_dir = Path(tempfile.mkdtemp(prefix=E2E_PREFIX))
    base_dir.chmod(0o755)  # the postgres user must reach its data directory
    (base_dir / "owner.pid").write_text(str(os.getpid()))
    env = dict(os.environ, MESHBANK_STATE_DIR=str(base_dir / "state"))
    if edit is not None:
        path = base_dir / "topology.yaml"
        path.write_text(
            yaml.safe_dump(
                edit(yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())), sort_keys=False
            )
        )
        env["MESHBANK_TOPOLOGY"] = str(path)
    default = topology.load(env.get("MESHBANK_TOPOLOGY"))
    # Blocks 250 apart: one deployment's port plan spans about 210 ports.
    candidates = (random.randrange(22000, 32400, 250) for _ in range(100))
    base = next(b for b in candidates if _block_free(topology.with_port_base(default, b)))
    env["MESHBANK_BASE_PORT"] = str(base)
    deployment = Deployment(env, base_dir / "state", "")
    used = False
    try:
        up = deployment.meshbank("up", "--detach", "--timeout", "420", timeout=480)
        assert up.returncode == 0, up.stdout + up.stderr
        deployment.up_output = up.stdout
        _trust_in_urllib(deployment.ca_file)
        yield deployment
        used = True
    finally:
        running = _processes(base_dir / "state" / "status.json")  # `down` clears the pids
        down = deployment.meshbank("down", timeout=180)
        survivors = _kill_survivors(running)
        shutil.rmtree(base_dir, ignore_errors=True)
    # Every deployment's teardown checks `meshbank down` on a running system: it stops
    # every process it started (the leftovers were killed above, whatever happens).
    if used:
        assert down.returncode == 0, down.stdout + down.stderr
        assert survivors == [], f"`meshbank down` left these running: {survivors}"


def _processes(status: Path) -> dict[str, int]:
    """The deployment's processes now running, by name."""
    if not status.exists():
        return {}
    procs = json.loads(status.read_text())["processes"]
    return {p["name"]: p["pid"] for p in procs if p.get("pid")}


def _kill_survivors(processes: dict[str, int]) -> list[str]:
    """SIGKILL those of ``processes`` still alive; their names."""
    survivors = []
    for name, pid in processes.items():
        if local.pid_alive(pid):
            survivors.append(name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return survivors


@pytest.fixture(scope="session")
def shared_deployment() -> Iterator[Deployment]:
    with _deployment() as deployment:
        yield deployment


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The session's shared deployment, or, for a test module that defines
    ``TOPOLOGY(data) -> data``, one of its own on that topology."""
    edit = getattr(request.module, "TOPOLOGY", None)
    if edit is None:
        yield request.getfixturevalue("shared_deployment")
        return
    with _deployment(edit) as deployment:
        yield deployment


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a deployment of their own (a ``TOPOLOGY``) run first, and the shared
    deployment starts after they are done: so only one deployment runs at a time (each
    idles at about a core of these two, its tracing UI most of it)."""
    items.sort(key=lambda item: not hasattr(getattr(item, "module", None), "TOPOLOGY"))
